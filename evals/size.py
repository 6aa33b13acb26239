"""True size: parameters, bytes on disk, bits per weight (codes + scales + zero points + indices, all counted)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from compress.arch import find_blocks
from compress.models import count_parameters
from compress.qlinear import is_linear_like


def _dtype_bits(t: torch.Tensor) -> int:
    return t.element_size() * 8


def storage_bits(module: nn.Module) -> int:
    """Bits a linear layer's weight takes in storage (compressed modules say so themselves)."""
    if hasattr(module, "storage_bits"):
        return int(module.storage_bits())
    bits = module.weight.numel() * _dtype_bits(module.weight)
    # bitsandbytes int8 (LLM.int8()): the float32 row abs-max SCB lives on the weight, or on the layer's state once used
    scb = getattr(module.weight, "SCB", None)
    scb = getattr(getattr(module, "state", None), "SCB", None) if scb is None else scb
    return bits + (scb.numel() * 32 if isinstance(scb, torch.Tensor) else 0)


def model_size(model: nn.Module) -> dict[str, Any]:
    """Size facts of a model in memory. bits_per_weight covers the linear layers inside the decoder blocks (what
    compression methods target); bits_per_param covers every stored tensor of the model."""
    try:
        _, blocks = find_blocks(model)
        block_mods = [m for b in blocks for m in b.modules() if is_linear_like(m)]
    except ValueError:
        block_mods = [m for m in model.modules() if is_linear_like(m)]
    bits = sum(storage_bits(m) for m in block_mods)
    weights = sum(m.in_features * m.out_features for m in block_mods)
    seen: set[int] = set()
    mem = 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        mem += t.numel() * t.element_size()
    params = count_parameters(model)
    return {
        "params": params,
        "linear_weights": weights,
        "bits_per_weight": round(bits / weights, 4) if weights else None,
        "memory_bytes": mem,
        "bits_per_param_memory": round(8 * mem / params, 4) if params else None,
    }


def checkpoint_bytes(folder: str | Path) -> int:
    """Bytes of the weight files of a checkpoint folder (safetensors; config and tokenizer files excluded)."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def size_report(model: nn.Module, checkpoint: str | Path | None = None) -> dict[str, Any]:
    out = model_size(model)
    if checkpoint is not None and Path(checkpoint).is_dir():
        nbytes = checkpoint_bytes(checkpoint)
        out["checkpoint_bytes"] = nbytes
        out["bits_per_param"] = round(8 * nbytes / out["params"], 4) if out["params"] else None
    return out
