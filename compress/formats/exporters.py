"""Extra checkpoint formats written beside the native one (`--export FORMAT`): each exporter takes the compressed
model in memory and writes `<output>-<format>/`. Formats register themselves here."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import torch.nn as nn

from ..errors import ConfigError

EXPORTERS: dict[str, Callable[[nn.Module, Any, Path, bool], Path]] = {}
# Exporters that take only the models they recognise (`handles(model)`), tried before EXPORTERS[name]: one format
# name can cover several layouts (compressed-tensors: pack-quantized weight-only, int-quantized W8A8).
SPECIFIC_EXPORTERS: dict[str, list[tuple[Callable[[nn.Module], bool], Callable[[nn.Module, Any, Path, bool], Path]]]] = {}


def register_exporter(name: str, handles: Callable[[nn.Module], bool] | None = None):
    def deco(fn: Callable[[nn.Module, Any, Path, bool], Path]):
        if handles is None:
            EXPORTERS[name] = fn
        else:
            SPECIFIC_EXPORTERS.setdefault(name, []).append((handles, fn))
        return fn

    return deco


def known_formats() -> list[str]:
    from . import load_plugins

    load_plugins()  # format modules register their exporters on import
    return sorted(set(EXPORTERS) | set(SPECIFIC_EXPORTERS))


def check_format(fmt: str) -> None:
    known = known_formats()
    if fmt not in known:
        raise ConfigError(f"--export {fmt!r} is not a known format; known: {', '.join(known)}")


def export(fmt: str, model: nn.Module, tokenizer: Any, output: str | Path, *, overwrite: bool = False) -> Path:
    check_format(fmt)
    target = Path(f"{output}-{fmt}")
    for handles, fn in SPECIFIC_EXPORTERS.get(fmt, []):
        if handles(model):
            return fn(model, tokenizer, target, overwrite)
    if fmt not in EXPORTERS:
        raise ConfigError(f"--export {fmt!r} has no layout for this model's compressed layers")
    return EXPORTERS[fmt](model, tokenizer, target, overwrite)


def dequantized_copy(model: nn.Module) -> nn.Module:
    """A copy of the model with every compressed linear replaced by a plain nn.Linear holding its float weight."""
    from . import compressed_modules, set_module

    from ..nf4 import is_nf4_linear
    from ..qlinear import linear_weight
    from .bitsandbytes import int8_modules

    dense = copy.deepcopy(model)
    dtype = dense.get_input_embeddings().weight.dtype  # the model's float dtype
    mods = {**compressed_modules(dense), **int8_modules(dense),
            **{n: m for n, m in dense.named_modules() if is_nf4_linear(m)}}
    for name, mod in mods.items():
        w = linear_weight(mod).detach()
        lin = nn.Linear(w.shape[1], w.shape[0], bias=getattr(mod, "bias", None) is not None, dtype=dtype)
        lin.weight.data.copy_(w)
        if lin.bias is not None:
            lin.bias.data.copy_(mod.bias.data)
        set_module(dense, name, lin)
    return dense


@register_exporter("dense")
def export_dense(model: nn.Module, tokenizer: Any, target: Path, overwrite: bool) -> Path:
    """Plain transformers folder (float weights): loads in any tool with AutoModelForCausalLM."""
    from . import save_checkpoint

    return save_checkpoint(dequantized_copy(model), tokenizer, target, overwrite=overwrite)
