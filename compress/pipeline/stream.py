"""Models larger than memory, streamed block by block (`--stream`).

The model is built as a skeleton on the meta device (no weights). The embeddings, final norm and head are read from
the folder's safetensors when the capture and the evaluation need them; decoder block i is materialised from the
safetensors when the engine reaches it (each file opened, read and closed again for that block, so no mapping of
the whole model stays resident), compressed, its tensors written to the output checkpoint's shard i, and freed
(moved back to meta) before block i+1. Peak memory is one block's float weights and its compressed form, the
calibration activations and the non-block modules, whatever the number of blocks.

The engine, the methods and the checkpoint layout are the in-memory run's: a streamed run writes the same tensors
and the same quantization_config as `save_checkpoint` after an in-memory run (tests/test_stream.py checks it bit for
bit). `StreamedModel` also reads this project's native checkpoints block by block (each block's compressed modules
rebuilt from its quantization_config entries), which is how a streamed result is evaluated (evals.perplexity).
"""
from __future__ import annotations

import gc
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from compress.core.errors import CompressError, ConfigError, ModelError
from compress.core.readers import read_json_object, safetensors_files
from compress.formats.base import AtomicFolder, build_empty_model, record_stages, state_for_saving, write_model_folder
from compress.formats.native import ShardWriter, native_quantization_config
from compress.layers.experts import fused_experts_modules, fused_to_split
from compress.layers.kernels import select_kernels
from compress.layers.types import MODULE_TYPES, compressed_modules
from compress.model.arch import find_blocks
from compress.model.surgery import set_module
from compress.pipeline.method import Method

log = logging.getLogger("compress")


def release_freed_memory_promptly() -> None:
    """Have glibc serve every allocation of 1 MiB or more with its own mapping, unmapped when freed. Its default
    threshold grows up to 32 MiB after large frees, so a block's weights and working tensors then come from the heap,
    whose freed holes stay resident and fragment: over 24 blocks the peak RSS crept up block after block. With a fixed
    threshold each block's memory goes back to the system when the block is freed. No effect off glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (malloc.h), fixed: disables the dynamic threshold
    except (OSError, AttributeError):
        pass


def folder_weight_bytes(folder: str | os.PathLike) -> int:
    """Bytes of the safetensors files of a transformers folder."""
    return sum((Path(folder) / f).stat().st_size for f in safetensors_files(folder) if (Path(folder) / f).is_file())


def meta_skeleton(config: dict[str, Any], dtype: torch.dtype) -> nn.Module:
    """The model of `config` with every parameter and persistent buffer on the meta device; modules holding computed
    (non-persistent) buffers, such as the rotary embedding's inv_freq, are built for real on the CPU."""
    with torch.device("meta"):
        model = build_empty_model(config, dtype)
    for name, mod in list(model.named_modules()):
        meta_bufs = [b for b, t in mod.named_buffers(recurse=False) if t.is_meta and b in mod._non_persistent_buffers_set]
        if not meta_bufs:
            continue
        try:
            with torch.device("cpu"):
                real = type(mod)(config=model.config)
        except Exception as e:  # noqa: BLE001 - one line naming the module
            raise ModelError(f"--stream: cannot rebuild {name} ({type(mod).__name__}), whose buffer {meta_bufs[0]} is "
                             f"computed, not stored ({type(e).__name__}: {e})") from e
        set_module(model, name, real)
    model.eval()
    model.config.use_cache = False
    return model


class StreamedModel:
    """A model whose weights stay in a folder (a transformers folder, or a native checkpoint of this project) until a
    block is needed. `model` is the skeleton; `load_block(i)` / `free_block(i)` materialise and release block i."""

    def __init__(self, folder: str | os.PathLike, dtype: torch.dtype | None = None, *, split_experts: bool = False):
        self.folder = Path(folder)
        config = read_json_object(self.folder / "config.json", "model config")
        qc = config.get("quantization_config") or {}
        if qc and qc.get("quant_method") != "compress":
            raise ConfigError(f"--stream reads float transformers folders and this project's native checkpoints, not "
                              f"{qc.get('quant_method')!r} checkpoints ({self.folder})")
        self.modules: dict[str, dict] = qc.get("modules") or {}
        saved = getattr(torch, config.get("dtype") or config.get("torch_dtype") or "float32")
        self.dtype = dtype or saved
        self.model = meta_skeleton(config, self.dtype)
        self.model.config._name_or_path = str(self.folder)  # as from_pretrained records it
        self.prefix, self.blocks = find_blocks(self.model)
        self.split_experts = split_experts
        release_freed_memory_promptly()
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            self.weight_map = {str(k): str(v) for k, v in read_json_object(index, "safetensors index")["weight_map"].items()}
        else:
            from safetensors import safe_open

            with safe_open(str(self.folder / "model.safetensors"), "pt") as f:
                self.weight_map = {k: "model.safetensors" for k in f.keys()}
        self.tied = bool(getattr(self.model.config, "tie_word_embeddings", False))
        if not self.modules:  # a float folder: its tensor names must be the model classes' own
            want = set(self.model.state_dict()) - ({"lm_head.weight"} if self.tied else set())
            extra, missing = sorted(set(self.weight_map) - want), sorted(want - set(self.weight_map))
            if extra or missing:
                raise ModelError(f"--stream: {self.folder} stores {(extra or missing)[0]!r} where the model class has "
                                 f"{(missing or extra)[0]!r} ({len(extra)} names differ): a layout transformers converts "
                                 "while loading (e.g. MoE experts saved per expert); streaming reads the classes' own "
                                 "layout (LLaMA-family dense models)")

    # ---- reading --------------------------------------------------------------------------------------------------
    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.weight_map[n], []).append(n)
        out = {}
        for fn, keys in by_file.items():
            with safe_open(str(self.folder / fn), "pt") as f:  # closed again: its pages leave the process
                for k in keys:
                    out[k] = f.get_tensor(k)
        return out

    def _materialise(self, module: nn.Module, prefix: str, names: list[str]) -> None:
        """Allocate the module's tensors and copy the stored ones in (float weights take the compute dtype, integer
        codes and float16 scales keep theirs: load_checkpoint's rule)."""
        state = {k[len(prefix):]: v for k, v in self._read(names).items()}
        module.to_empty(device="cpu")
        missing, unexpected = module.load_state_dict(state, strict=False)
        missing = [m for m in missing if not (self.tied and prefix + m == "lm_head.weight")]
        if missing or unexpected:
            raise ModelError(f"{self.folder}: {prefix or 'the model'} does not match its config: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")

    def block_prefix(self, i: int) -> str:
        return f"{self.prefix}.{i}."

    def load_rest(self) -> None:
        """Embeddings, final norm, head: every tensor outside the decoder blocks."""
        blocks = self.prefix + "."
        names = [k for k in self.weight_map if not k.startswith(blocks)]
        state = self._read(names)
        keep = {id(b) for b in self.blocks}
        for name, mod in self.model.named_modules():
            if id(mod) in keep or name.startswith(blocks) or name == self.prefix:
                continue
            for pname, p in list(mod.named_parameters(recurse=False)) + [(b, t) for b, t in mod.named_buffers(recurse=False)
                                                                         if b not in mod._non_persistent_buffers_set]:
                full = f"{name}.{pname}" if name else pname
                if full in state:
                    t = state[full]
                    t = t.to(self.dtype) if t.is_floating_point() and p.is_floating_point() else t
                    if isinstance(p, nn.Parameter):
                        mod._parameters[pname] = nn.Parameter(t, requires_grad=False)
                    else:
                        mod._buffers[pname] = t
                elif not (self.tied and full == "lm_head.weight"):
                    raise ModelError(f"{self.folder}: {full} is not in the checkpoint")
        if self.tied:
            self.model.tie_weights()

    def load_block(self, i: int) -> nn.Module:
        block = self.blocks[i]
        prefix = self.block_prefix(i)
        for name, cfg in self.modules.items():  # compressed modules of a native checkpoint: rebuilt empty, then loaded
            if name.startswith(prefix):
                set_module(self.model, name, MODULE_TYPES.get(cfg["type"]).from_module_config(cfg, self.dtype))
        self._materialise(block, prefix, [k for k in self.weight_map if k.startswith(prefix)])
        if self.split_experts and fused_experts_modules(block):
            fused_to_split(block)
        if self.modules:
            select_kernels(block, quiet=True)
        return block

    def free_block(self, i: int) -> None:
        self.blocks[i].to("meta")
        gc.collect()

    def rest_state(self) -> dict[str, torch.Tensor]:
        """state_for_saving() of everything outside the decoder blocks (tied duplicates left out)."""
        parent_name, _, attr = self.prefix.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        setattr(parent, attr, nn.ModuleList())
        try:
            return state_for_saving(self.model)
        finally:
            setattr(parent, attr, self.blocks)

    def free_rest(self) -> None:
        """Everything outside the blocks back to meta, except computed buffers (rotary inv_freq): not stored."""
        blocks = self.prefix + "."
        keep = {id(b) for b in self.blocks}
        for name, mod in self.model.named_modules():
            if id(mod) in keep or name.startswith(blocks) or name == self.prefix:
                continue
            for pname, p in list(mod._parameters.items()):
                if p is not None:
                    mod._parameters[pname] = nn.Parameter(p.to("meta"), requires_grad=False)
        gc.collect()

    def final_head(self):
        """(final norm, head) applied after the last block: LLaMA-family layouts (`model.norm`, `lm_head`)."""
        base = self.model.get_submodule(self.prefix.rsplit(".", 1)[0]) if "." in self.prefix else self.model
        norm, head = getattr(base, "norm", None), self.model.get_output_embeddings()
        if norm is None or head is None:
            raise ConfigError(f"--stream evaluation knows LLaMA-family layouts (a final `norm` and a head), not "
                              f"{type(self.model).__name__}")
        return norm, head


# ---------------------------------------------------------------------------------------------------------------
# A streamed compression run, file to file
# ---------------------------------------------------------------------------------------------------------------
def check_streamable(stages: list[Method]) -> None:
    """Before any work: --stream runs layer-wise methods that need nothing of the whole model beforehand."""
    for m in stages:
        if not m.layerwise:
            raise ConfigError(f"--stream runs layer-wise methods block by block; {m.name} works on the whole model")
        if type(m).prepare is not Method.prepare:
            raise ConfigError(f"--stream: {m.name} prepares on the whole model before the block pass (allowed: "
                              "layer-wise methods without a whole-model step, e.g. rtn, gptq, hqq, wanda, sparsegpt)")


def stream_compress(folder: str | os.PathLike, stages: list[Method], ctx: Any, output: str | os.PathLike, tokenizer: Any,
                    *, overwrite: bool = False, quant_info: dict[str, Any] | None = None, stage_specs: list | None = None,
                    dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Compress the model in `folder` block by block into the native checkpoint `output` (atomic). Returns facts
    (blocks, compressed modules, coverage input) for the record."""
    check_streamable(stages)
    handles = any(m.family in ("quantization", "pruning") for m in stages)
    sm = StreamedModel(folder, dtype, split_experts=handles and all(m.handles_experts for m in stages))
    if sm.modules:
        raise ConfigError(f"--stream compresses float models; {folder} is already compressed")
    sm.load_rest()
    model = sm.model
    for m in stages:
        m.prepare(model, ctx)
    modules: dict[str, nn.Module] = {}
    with AtomicFolder(output, overwrite) as tmp:
        writer = ShardWriter(tmp)
        prefix = sm.prefix
        writer.add(sm.rest_state())  # the non-block tensors first: no layer-wise method changes them
        sm.free_rest()  # writing paged all of them in; their mapping goes with them
        engine = ctx.engine(model)
        if any(m.needs.calibration for m in stages):  # the capture reads the embeddings again: a fresh mapping of
            sm.load_rest()                            # the folder, in which only the calibration tokens' rows are read

        def load(i: int, block: nn.Module) -> None:
            if i == 0 and engine.inputs is not None:  # block 0's inputs captured: embeddings and head not needed
                sm.free_rest()
            sm.load_block(i)
            if fused_experts_modules(block):
                raise CompressError(f"{prefix}.{i}: fused mixture-of-experts weights, which "
                                    f"{', '.join(m.name for m in stages if not m.handles_experts)} cannot compress")

        def done(i: int, block: nn.Module) -> None:
            state = {f"{prefix}.{i}.{k}": v for k, v in block.state_dict().items()}
            writer.add(state)
            for n, m in compressed_modules(block).items():
                if hasattr(type(m), "nnz"):  # what the sparsity_config counts, kept past the tensors
                    m.frozen_nnz = m.nnz
                modules[f"{prefix}.{i}.{n}"] = m
            sm.free_block(i)

        engine.block_loader, engine.block_done = load, done
        engine.run(stages, desc="streaming " + " + ".join(m.name for m in stages))
        for m in stages:
            model = m.finalize(model, ctx)
        if stage_specs is not None:
            record_stages(model, stage_specs)
        writer.finish()
        qc = native_quantization_config(model, modules, quant_info) if modules else None
        write_model_folder(tmp, model, tokenizer, None, qc)
    return {"blocks": len(sm.blocks), "model": model, "streamed": sm}
