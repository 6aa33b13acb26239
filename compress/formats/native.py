"""The native format (`quant_method: "compress"`): safetensors holding each compressed module's buffers as they are
in memory, and a `quantization_config` listing every compressed module with its type and settings; reloads through
`load_checkpoint` (and `compress eval`) to the identical model. With nothing compressed it is a plain transformers
folder. Other formats take part through their hooks (see compress.formats.base.Format).

Every write goes to a temporary folder beside the target, which is renamed into place only when complete.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from compress.core.errors import ModelError
from compress.core.readers import read_json_object
from compress.formats.base import (
    FORMAT_KEY,
    NATIVE_QUANT_METHOD,
    AtomicFolder,
    all_formats,
    applied_stages,
    build_empty_model,
    load_remaining,
    read_safetensors,
    record_stages,
    state_for_saving,
    write_model_folder,
)
from compress.layers.kernels import select_kernels
from compress.layers.quant_embedding import bind_tied_heads
from compress.layers.types import MODULE_TYPES, compressed_modules
from compress.model.surgery import set_module


def is_project_checkpoint(config: dict[str, Any]) -> bool:
    """True if config.json describes a checkpoint that needs this project's loader (not plain transformers)."""
    qc = config.get("quantization_config") or {}
    if not isinstance(qc, dict):  # malformed: the validation step names it
        return False
    if qc.get("quant_method") == NATIVE_QUANT_METHOD or config.get(FORMAT_KEY):
        return True
    return any(f.detect(config) or f.prepares(config) for f in all_formats())


def save_checkpoint(model: nn.Module, tokenizer: Any, output: str | os.PathLike, *, overwrite: bool = False,
                    quant_info: dict[str, Any] | None = None, provenance: dict[str, Any] | None = None,
                    extra_config: dict[str, Any] | None = None) -> Path:
    """Write `model` in the native format (dense when nothing is compressed; a registered format's layers with its
    quantization_config; a wrapped model as its base plus the wrapper's files). Atomic. Returns the folder."""
    formats = all_formats()
    saved = next((s for s in (f.unwrap(model) for f in formats) if s is not None), None)
    if saved is not None:
        model = saved.model
    modules = compressed_modules(model)
    with AtomicFolder(output, overwrite) as tmp:
        extra = dict(saved.config if saved is not None else {})
        # a format whose tensors are the model's own state dict and differ only in config.json (bitsandbytes)
        qc = next((c for c in (f.quantization_config(model) for f in formats) if c), None)
        if qc:
            extra[FORMAT_KEY] = qc["quant_method"]
        elif modules:
            qc = native_quantization_config(model, modules, quant_info)
        extra.update(extra_config or {})
        write_model_folder(tmp, model, tokenizer, saved.state if saved is not None else state_for_saving(model), qc,
                           extra)
        if saved is not None:
            saved.write_extra(tmp, Path(output).expanduser().absolute())
        if provenance:
            (tmp / "compress_run.json").write_text(json.dumps(provenance, indent=2, default=str))
    return Path(output)


def native_quantization_config(model: nn.Module, modules: dict[str, nn.Module],
                               quant_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """The native format's quantization_config: every compressed module's type and settings, the run's settings."""
    qc = {
        "quant_method": NATIVE_QUANT_METHOD,
        "format": "native",
        **(quant_info or {}),
        **({"recipe": applied_stages(model)} if applied_stages(model) else {}),
        "modules": {n: m.module_config() for n, m in modules.items()},
    }
    for key, value in filter(None, (f.config_section(modules) for f in all_formats())):
        qc[key] = value
    return qc


class ShardWriter:
    """A checkpoint's tensors written group by group (one shard per decoder block, for a streamed run), then named
    as save_pretrained names shards, with model.safetensors.index.json."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.parts: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, state: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        if not state:
            return
        path = self.folder / f".part-{len(self.parts):05d}.safetensors"
        save_file({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})
        self.parts.append((path, list(state)))
        self.total += sum(v.numel() * v.element_size() for v in state.values())

    def finish(self) -> list[str]:
        n = len(self.parts)
        names, weight_map = [], {}
        for i, (path, keys) in enumerate(self.parts):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(path, self.folder / name)
            names.append(name)
            weight_map.update({k: name for k in keys})
        (self.folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": self.total}, "weight_map": weight_map}, indent=2))
        return names


def load_checkpoint(path: str | os.PathLike, dtype: torch.dtype | None = None) -> tuple[nn.Module, Any, dict]:
    """Rebuild a model written by this project (native format or a registered one). Returns (model, tokenizer, info)."""
    folder = Path(path)
    config = read_json_object(folder / "config.json", "model config")
    formats = all_formats()
    reader = next((f for f in formats if f.detect(config)), None)
    if reader is not None:
        model, tok, info = reader.read(folder, dtype)
        return _finish(model, folder, config, formats), tok, info
    qc = config.get("quantization_config") or {}
    saved_dtype = getattr(torch, config.get("dtype") or config.get("torch_dtype") or "float32")
    dtype = dtype or saved_dtype
    model = build_empty_model(config, dtype)
    for f in formats:
        if f.prepares(config):
            f.prepare(model, config)
    for name, mcfg in (qc.get("modules") or {}).items():
        mtype = mcfg.get("type")
        if mtype not in MODULE_TYPES:
            raise ModelError(f"checkpoint {str(folder)!r} uses module type {mtype!r}, unknown to this version "
                             f"(known: {', '.join(MODULE_TYPES)})")
        set_module(model, name, MODULE_TYPES.get(mtype).from_module_config(mcfg, dtype))
    bind_tied_heads(model)  # a head tied to quantized embedding codes reads them from the embedding
    state = read_safetensors(folder)
    # load_state_dict copies into the freshly built tensors: float weights take the requested compute dtype while
    # integer codes and float16 scales keep their own dtypes.
    tok = load_remaining(model, state, folder, config)
    info = {"format": "native" if qc else "dense", "quantization_config": {k: v for k, v in qc.items() if k != "modules"}}
    model = _finish(model, folder, config, formats)
    if isinstance(qc.get("recipe"), list):  # an export of the reloaded model writes the settings it was made with
        record_stages(model, qc["recipe"])
    return model, tok, info


def _finish(model: nn.Module, folder: Path, config: dict[str, Any], formats) -> nn.Module:
    for f in formats:
        model = f.finish(model, folder, config)
    select_kernels(model)  # the compressed layers' integer kernels (or their fallback), said on screen
    return model
