"""What every checkpoint format shares: the `Format` contract, the lazy registry of formats, atomic output folders,
and the safetensors/config.json machinery of a transformers-style folder.

A format is one object (a `Format` subclass instance named FORMAT in its module) that says what it does:
* `export(model, tokenizer, target, overwrite)`: write the model in this format (`--export NAME`); `handles(model)`
  says whether it can write this model's layers;
* `detect(config)` / `read(folder, dtype)`: a config.json this format reads, and the reader;
* hooks of the native writer and reader, for formats that are part of a native checkpoint: `quantization_config`
  (layers whose tensors are the model's own state dict, e.g. bitsandbytes), `config_section` (an extra entry of the
  native quantization_config, e.g. the sparse format's sparsity_config), `unwrap` (a wrapper saved beside its base,
  e.g. peft adapters), `prepares` / `prepare` (a change to a freshly built model before loading, e.g. per-layer
  shapes) and `finish` (a change after loading, e.g. attaching adapters).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from compress.core.errors import CompressError, ModelError
from compress.core.readers import load_safetensors, safetensors_files
from compress.core.registry import Registry


class Format:
    """One checkpoint format. Every method has a default meaning "not this format's business"."""

    name: str = ""
    summary: str = ""
    exports: bool = False  # can be asked for with --export NAME
    options: tuple[str, ...] = ()  # run options (RunSpec field names) its export takes as keyword arguments
    # whether its export can hold a model with an online rotation (rotate's R4 before down_proj): the native
    # checkpoint records it and the project's loader applies it; dense folds it back into the weights; the peer
    # formats (GPTQ, compressed-tensors, GGUF, ...) have no place for it and refuse
    online_rotation: bool = False
    one_grid: bool = False  # holds one integer grid per checkpoint (no per-layer bits or group sizes)

    def handles(self, model: nn.Module) -> bool:
        return self.exports

    def export(self, model: nn.Module, tokenizer: Any, target: Path, overwrite: bool, **options: Any) -> Path:
        raise NotImplementedError(f"{self.name} is not an export format")

    def check_plan(self, stages: list[tuple[str, dict[str, Any]]], options: dict[str, Any]) -> None:
        """Refuse (before any work) a recipe, given as (method name, config dict) per stage, whose result this export
        cannot hold. Default: nothing to check until the model exists."""

    def note(self, options: dict[str, Any]) -> str | None:
        """A line for the run record about how this export was written (e.g. re-quantized), or None."""
        return None

    def detect(self, config: dict[str, Any]) -> bool:
        return False

    def read(self, folder: Path, dtype: torch.dtype | None) -> tuple[nn.Module, Any, dict]:
        raise NotImplementedError(f"{self.name} has no reader")

    def quantization_config(self, model: nn.Module) -> dict[str, Any] | None:
        return None

    def config_section(self, modules: dict[str, nn.Module]) -> tuple[str, Any] | None:
        return None

    def unwrap(self, model: nn.Module) -> "SavedModel | None":
        return None

    def prepares(self, config: dict[str, Any]) -> bool:
        return False

    def prepare(self, model: nn.Module, config: dict[str, Any]) -> None:
        pass

    def finish(self, model: nn.Module, folder: Path, config: dict[str, Any]) -> nn.Module:
        return model

    # config.json keys this format owns, kept out of the transformers config when a model is rebuilt
    config_keys: tuple[str, ...] = ()


FORMATS: Registry[Format] = Registry("format", {
    "dense": "compress.formats.dense:FORMAT",
    "gptq": "compress.formats.gptq:FORMAT",
    "compressed-tensors": "compress.formats.compressed_tensors:FORMAT",
    "bitsandbytes": "compress.formats.bitsandbytes:FORMAT",
    "sparse-bitmask": "compress.formats.sparse:FORMAT",
    "structured": "compress.formats.structured:FORMAT",
    "peft-adapter": "compress.formats.adapters:FORMAT",
    "gguf": "compress.formats.gguf:FORMAT",
})


def all_formats() -> list[Format]:
    return [f for _, f in FORMATS.items()]


NATIVE_QUANT_METHOD = "compress"


_SHARD_BYTES = 2 * 1024**3


FORMAT_KEY = "compress_format"
RECIPE_ATTR = "compress_recipe"  # the stages a model went through ({"method", "family", "config"} each), kept on it


def applied_stages(model: nn.Module) -> list[dict[str, Any]]:
    """The recipe stages the model was compressed with (in order; [] when unknown, e.g. a model read from a peer's
    format), as compress.pipeline.recipe.Recipe.run records them and the native checkpoint keeps them."""
    return list(getattr(model, RECIPE_ATTR, None) or [])


def record_stages(model: nn.Module, stages: list[dict[str, Any]]) -> None:
    object.__setattr__(model, RECIPE_ATTR, applied_stages(model) + [dict(s) for s in stages])


ADAPTER_KEY = "compress_adapter"  # config.json entry naming the adapter subfolder applied on load


@dataclass
class SavedModel:
    """What to write for a wrapped model: the base (config, compressed modules), its state dict, extra config entries
    and a writer of the extra files (called with the temporary folder and the final folder)."""

    model: nn.Module
    state: dict[str, torch.Tensor]
    write_extra: Callable[[Path, Path], None]
    config: dict[str, Any]


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
        if exc_type is not None:  # an error or Ctrl-C (KeyboardInterrupt) while writing: the target is untouched
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = None
        with _no_sigint():  # the swap is two renames; a Ctrl-C between them would leave no target at all
            if self.target.exists():
                old = self.target.with_name(f".{self.target.name}.old-{os.getpid()}")
                os.replace(self.target, old)
            os.replace(self.tmp, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


@contextmanager
def _no_sigint() -> Iterator[None]:
    """Hold SIGINT back while the block runs (it is delivered, as KeyboardInterrupt, right after)."""
    mask = getattr(signal, "pthread_sigmask", None)
    if mask is None:
        yield
        return
    old = mask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        mask(signal.SIG_SETMASK, old)


def state_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
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


def write_model_folder(folder: Path, model: nn.Module, tokenizer: Any, state: dict[str, torch.Tensor] | None,
                       quantization_config: dict[str, Any] | None, extra_config: dict[str, Any] | None = None) -> None:
    """Fill a (temporary) folder the way save_pretrained would: `state` as safetensors (None: the caller wrote the
    tensors already, e.g. streamed shard by shard), config.json (the model's, with this quantization_config), the
    generation config and the tokenizer. Shared by every format writer."""
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = str(next(p for p in model.parameters() if p.is_floating_point()).dtype).replace("torch.", "")
    config["use_cache"] = True
    if quantization_config:
        config["quantization_config"] = quantization_config
    config.update(extra_config or {})
    if state is not None:
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


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------
def read_safetensors(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    folder = Path(folder)
    files = safetensors_files(folder)
    state: dict[str, torch.Tensor] = {}
    for fn in files:
        if not (folder / fn).is_file():
            raise ModelError(f"checkpoint {str(folder)!r} is missing {fn}")
        state.update(load_safetensors(folder / fn))
    return state


def build_empty_model(config_dict: dict[str, Any], dtype: torch.dtype) -> nn.Module:
    """A model of the given config with uninitialised weights (they are about to be loaded)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        from transformers.modeling_utils import no_init_weights

    owned = {k for f in all_formats() for k in f.config_keys}
    cfg_dict = {k: v for k, v in config_dict.items() if k not in ("quantization_config", FORMAT_KEY) and k not in owned}
    model_type = cfg_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg_dict)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


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
    if tied and not getattr(model.get_output_embeddings(), "ties_to_codes", False):  # else it reads the codes itself
        model.tie_weights()
    model.eval()
    return AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").exists() else None
