"""What every linear-like layer holds: its (de-quantized) float weight, and the model's logical parameter count."""
from __future__ import annotations

import torch
import torch.nn as nn

from compress.layers.nf4 import is_nf4_linear, nf4_dequantize


def int8_row_absmax(module: nn.Module) -> torch.Tensor | None:
    """bitsandbytes LLM.int8() layers: the float32 row abs-max (SCB) of their int8 weight codes; it lives on the weight,
    or on the layer's state once the layer has run. None for any other module."""
    scb = getattr(getattr(module, "weight", None), "SCB", None)
    scb = getattr(getattr(module, "state", None), "SCB", None) if scb is None else scb
    return scb if isinstance(scb, torch.Tensor) else None


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The (dequantized) float weight of any linear-like module, bitsandbytes int8 and 4-bit layers included (their
    `weight` holds integer codes)."""
    if isinstance(module, nn.Linear):
        w = module.weight
        scb = int8_row_absmax(module)
        if w.dtype == torch.int8 and scb is not None:  # LLM.int8() Int8Params: row codes x row abs-max / 127
            return w.data.float() * (scb.float() / 127.0).unsqueeze(1)
        if getattr(w, "quant_state", None) is not None:  # bitsandbytes 4-bit (NF4/FP4)
            return nf4_dequantize(module)
        return w
    if hasattr(module, "dequantize_weight"):
        return module.dequantize_weight()
    return module.weight


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once), compressed layers (quantized, sparse, NF4...) counted by
    their logical weights."""
    seen: set[int] = set()
    total = 0
    for mod in model.modules():
        compressed = getattr(mod, "is_compress_linear", False) or getattr(mod, "is_compress_embedding", False)
        if (compressed and hasattr(mod, "in_features")) or is_nf4_linear(mod):
            bias = getattr(mod, "bias", None)
            total += mod.in_features * mod.out_features + (bias.numel() if bias is not None else 0)
            for p in mod.parameters(recurse=False):
                seen.add(id(p))
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
