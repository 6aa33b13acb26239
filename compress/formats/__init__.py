"""Checkpoint formats, kept apart from the algorithms that produce the weights.

An algorithm leaves compressed modules in the model (QuantLinear and friends); a format writes and reads them.
Formats here:
* native (`quant_method: "compress"`): safetensors holding each compressed module's buffers as they are in memory,
  and a `quantization_config` listing every compressed module with its type and settings; reloads through
  `compress.formats.load_checkpoint` (and `compress eval`) to the identical model.
* dense: a plain transformers folder (config.json + model.safetensors) that any tool loads.
Other formats (GPTQ, compressed-tensors, sparse bitmask, bitsandbytes, peft adapters) live in sibling modules and
register here.

Every write goes to a temporary folder beside the target, which is renamed into place only when complete.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
import torch.nn as nn

from ..errors import CompressError, ModelError

NATIVE_QUANT_METHOD = "compress"
_SHARD_BYTES = 2 * 1024**3


class CompressedModule(Protocol):
    """A module type the native format can write and rebuild."""

    def module_config(self) -> dict[str, Any]: ...

    @classmethod
    def from_module_config(cls, cfg: dict[str, Any], dtype: torch.dtype) -> nn.Module: ...


MODULE_TYPES: dict[str, type] = {}
# Functions (model, config_dict) applied to a freshly built model before weights are loaded: e.g. structured
# pruning's per-layer shapes. Keyed by the config.json entry that triggers them.
LOAD_TRANSFORMS: dict[str, Callable[[nn.Module, dict], None]] = {}
# Readers of other formats: key = quant_method (or other marker) -> loader(path, dtype) -> (model, tokenizer, info)
FORMAT_READERS: dict[str, Callable[..., tuple[nn.Module, Any, dict]]] = {}
# Extra entries of the native `quantization_config`: key -> function(compressed modules by name) -> value or None
# (e.g. the sparse format's `sparsity_config`).
CONFIG_SECTIONS: dict[str, Callable[[dict[str, nn.Module]], Any]] = {}
# Layers of other formats held in memory (bitsandbytes 4-bit and int8), whose tensors are the model's own state dict
# and differ from the native format only in config.json: fn(model) -> their quantization_config, or None. The
# checkpoint then carries that config and FORMAT_KEY = its quant_method, and reads back through FORMAT_READERS.
QUANT_CONFIG_WRITERS: list[Callable[[nn.Module], dict[str, Any] | None]] = []
FORMAT_KEY = "compress_format"
# Wrappers around a model saved beside its base (e.g. peft adapters): fn(model) -> SavedModel, or None if not theirs.
MODEL_UNWRAPPERS: list[Callable[[nn.Module], "SavedModel | None"]] = []
ADAPTER_KEY = "compress_adapter"  # config.json entry naming the adapter subfolder applied on load


@dataclass
class SavedModel:
    """What to write for a wrapped model: the base (config, compressed modules), its state dict, extra config entries
    and a writer of the extra files (called with the temporary folder and the final folder)."""

    model: nn.Module
    state: dict[str, torch.Tensor]
    write_extra: Callable[[Path, Path], None]
    config: dict[str, Any]


def load_plugins() -> None:
    """Import the sibling format modules so that they register their writers and readers."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):  # type: ignore[name-defined]
        importlib.import_module(f"{__name__}.{info.name}")


def register_module_type(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        cls.module_type = name
        MODULE_TYPES[name] = cls
        return cls

    return deco


def _register_builtin() -> None:
    from . import structured  # noqa: F401 - registers the per-layer-shape load transform
    from ..qlinear import QuantLinear
    load_plugins()  # sibling format modules register their module types (e.g. sparse_linear) on import

    if "quant_linear" not in MODULE_TYPES:
        QuantLinear.module_type = "quant_linear"
        QuantLinear.module_config = lambda self: {"type": "quant_linear", **self.quant_config()}  # type: ignore[attr-defined]
        QuantLinear.from_module_config = classmethod(_quant_linear_from_config)  # type: ignore[attr-defined]
        MODULE_TYPES["quant_linear"] = QuantLinear


def _quant_linear_from_config(cls, cfg: dict[str, Any], dtype: torch.dtype) -> nn.Module:
    from ..quant_grid import QuantSpec

    spec = QuantSpec(cfg["bits"], cfg["group_size"], cfg["sym"])
    return cls(cfg["in_features"], cfg["out_features"], spec, bias=cfg.get("bias", False), has_g_idx=cfg.get("act_order", False), dtype=dtype)


def is_project_checkpoint(config: dict[str, Any]) -> bool:
    """True if config.json describes a checkpoint that needs this project's loader (not plain transformers)."""
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") == NATIVE_QUANT_METHOD:
        return True
    _register_builtin()
    if any(k in config for k in LOAD_TRANSFORMS):
        return True
    load_plugins()  # formats register their readers on import
    return bool(config.get(FORMAT_KEY) or config.get(ADAPTER_KEY) or qc.get("quant_method") in FORMAT_READERS)


# ---------------------------------------------------------------------------------------------------------------
# Output folders
# ---------------------------------------------------------------------------------------------------------------
def check_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse (before any work) an output folder that already holds something, unless overwrite is asked for."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise CompressError(f"--output {str(path)!r} exists and is not a folder")
    if p.is_dir() and any(p.iterdir()) and not overwrite:
        what = "a checkpoint" if (p / "config.json").exists() or any(p.glob("*.safetensors")) else "files"
        raise CompressError(f"--output {str(path)!r} already holds {what}; pass --overwrite to replace it")
    return p


class AtomicFolder:
    """`with AtomicFolder(target) as tmp:` write into tmp; on success tmp replaces target, on error nothing changes."""

    def __init__(self, target: str | os.PathLike, overwrite: bool = False):
        self.target = Path(target).expanduser().absolute()
        self.overwrite = overwrite

    def __enter__(self) -> Path:
        check_output_dir(self.target, self.overwrite)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.tmp-", dir=self.target.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = None
        if self.target.exists():
            old = self.target.with_name(f".{self.target.name}.old-{os.getpid()}")
            os.replace(self.target, old)
        os.replace(self.tmp, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------
def compressed_modules(model: nn.Module) -> dict[str, nn.Module]:
    _register_builtin()
    return {n: m for n, m in model.named_modules() if getattr(m, "module_type", None) in MODULE_TYPES and hasattr(m, "module_config")}


def _state_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict without tied duplicates (the tied lm_head is rebuilt on load), contiguous, CPU."""
    state = model.state_dict()
    tied_out = bool(getattr(model.config, "tie_word_embeddings", False))
    out: dict[str, torch.Tensor] = {}
    seen: dict[tuple[int, int, tuple], str] = {}
    for k, v in state.items():
        if v.device.type == "meta":
            continue
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key in seen and tied_out:
            continue
        seen[key] = k
        out[k] = v.detach().to("cpu").contiguous()
    return out


def write_safetensors(state: dict[str, torch.Tensor], folder: Path, metadata: dict[str, str] | None = None) -> list[str]:
    """save_pretrained's layout: model.safetensors, or shards plus model.safetensors.index.json."""
    from safetensors.torch import save_file

    meta = {"format": "pt", **(metadata or {})}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        nb = v.numel() * v.element_size()
        if size + nb > _SHARD_BYTES and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nb
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata=meta)
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, str(folder / name), metadata=meta)
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in state.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return names


def write_model_folder(folder: Path, model: nn.Module, tokenizer: Any, state: dict[str, torch.Tensor],
                       quantization_config: dict[str, Any] | None, extra_config: dict[str, Any] | None = None) -> None:
    """Fill a (temporary) folder the way save_pretrained would: `state` as safetensors, config.json (the model's,
    with this quantization_config), the generation config and the tokenizer. Shared by every format writer."""
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = str(next(p for p in model.parameters() if p.is_floating_point()).dtype).replace("torch.", "")
    config["use_cache"] = True
    if quantization_config:
        config["quantization_config"] = quantization_config
    config.update(extra_config or {})
    write_safetensors(state, folder)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        try:
            gen.save_pretrained(folder)
        except Exception:  # noqa: BLE001 - a generation config is a courtesy, never a reason to fail
            pass
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def save_checkpoint(model: nn.Module, tokenizer: Any, output: str | os.PathLike, *, overwrite: bool = False,
                    quant_info: dict[str, Any] | None = None, provenance: dict[str, Any] | None = None,
                    extra_config: dict[str, Any] | None = None) -> Path:
    """Write `model` in the native format (dense when nothing is compressed; a registered format's layers with its
    quantization_config; a wrapped model as its base plus the wrapper's files). Atomic. Returns the folder."""
    load_plugins()
    saved = next((s for s in (unwrap(model) for unwrap in MODEL_UNWRAPPERS) if s is not None), None)
    if saved is not None:
        model = saved.model
    modules = compressed_modules(model)
    with AtomicFolder(output, overwrite) as tmp:
        extra = dict(saved.config if saved is not None else {})
        # a format whose tensors are the model's own state dict and differ only in config.json (bitsandbytes)
        qc = next((c for c in (w(model) for w in QUANT_CONFIG_WRITERS) if c), None)
        if qc:
            extra[FORMAT_KEY] = qc["quant_method"]
        elif modules:
            qc = {
                "quant_method": NATIVE_QUANT_METHOD,
                "format": "native",
                **(quant_info or {}),
                "modules": {n: m.module_config() for n, m in modules.items()},
            }
            for key, section in CONFIG_SECTIONS.items():
                value = section(modules)
                if value is not None:
                    qc[key] = value
        extra.update(extra_config or {})
        write_model_folder(tmp, model, tokenizer, saved.state if saved is not None else _state_for_saving(model), qc,
                           extra)
        if saved is not None:
            saved.write_extra(tmp, Path(output).expanduser().absolute())
        if provenance:
            (tmp / "compress_run.json").write_text(json.dumps(provenance, indent=2, default=str))
    return Path(output)


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------
def read_safetensors(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for fn in files:
        if not (folder / fn).is_file():
            raise ModelError(f"checkpoint {str(folder)!r} is missing {fn}")
        state.update(load_file(str(folder / fn)))
    return state


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def build_empty_model(config_dict: dict[str, Any], dtype: torch.dtype) -> nn.Module:
    """A model of the given config with uninitialised weights (they are about to be loaded)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        from transformers.modeling_utils import no_init_weights

    cfg_dict = {k: v for k, v in config_dict.items()
                if k not in ("quantization_config", FORMAT_KEY, ADAPTER_KEY) and k not in LOAD_TRANSFORMS}
    model_type = cfg_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg_dict)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def load_checkpoint(path: str | os.PathLike, dtype: torch.dtype | None = None) -> tuple[nn.Module, Any, dict]:
    """Rebuild a model written by this project (native format or a registered one). Returns (model, tokenizer, info)."""
    _register_builtin()
    load_plugins()
    folder = Path(path)
    config = json.loads((folder / "config.json").read_text())
    qc = config.get("quantization_config") or {}
    method = qc.get("quant_method")
    if method in FORMAT_READERS and method != NATIVE_QUANT_METHOD:
        model, tok, info = FORMAT_READERS[method](folder, dtype)
        return _attach_adapter(model, folder, config), tok, info
    saved_dtype = getattr(torch, config.get("dtype") or config.get("torch_dtype") or "float32")
    dtype = dtype or saved_dtype
    model = build_empty_model(config, dtype)
    for key, transform in LOAD_TRANSFORMS.items():
        if key in config:
            transform(model, config)
    for name, mcfg in (qc.get("modules") or {}).items():
        mtype = mcfg.get("type")
        if mtype not in MODULE_TYPES:
            raise ModelError(f"checkpoint {str(folder)!r} uses module type {mtype!r}, unknown to this version (known: {', '.join(MODULE_TYPES)})")
        set_module(model, name, MODULE_TYPES[mtype].from_module_config(mcfg, dtype))
    state = read_safetensors(folder)
    # load_state_dict copies into the freshly built tensors: float weights take the requested compute dtype while
    # integer codes and float16 scales keep their own dtypes.
    tok = load_remaining(model, state, folder, config)
    info = {"format": "native" if qc else "dense", "quantization_config": {k: v for k, v in qc.items() if k != "modules"}}
    return _attach_adapter(model, folder, config), tok, info


def load_remaining(model: nn.Module, state: dict[str, torch.Tensor], folder: Path, config: dict[str, Any],
                   already_loaded: set[str] = frozenset()) -> Any:
    """Load `state` into a rebuilt model (modules named in already_loaded were filled by a format reader), check that
    nothing is missing or left over, re-tie embeddings, and return the folder's tokenizer (or None)."""
    from transformers import AutoTokenizer

    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.get("tie_word_embeddings") else set()
    missing = [m for m in missing if m not in tied and m.rsplit(".", 1)[0] not in already_loaded]
    if missing or unexpected:
        raise ModelError(f"checkpoint {str(folder)!r} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if tied:
        model.tie_weights()
    model.eval()
    return AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").exists() else None


def _attach_adapter(model: nn.Module, folder: Path, config: dict[str, Any]) -> nn.Module:
    if not config.get(ADAPTER_KEY):
        return model
    from .adapters import attach_adapter

    return attach_adapter(model, folder, config)
