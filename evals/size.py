"""True size: parameters, bytes on disk, bits per weight (codes + scales + zero points + indices, all counted)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from compress.layers.experts import is_fused_experts
from compress.layers.nf4 import is_nf4_linear, nf4_state_bytes, nf4_storage_bits
from compress.layers.weights import count_parameters, int8_row_absmax
from compress.model.arch import find_blocks
from compress.model.surgery import is_linear_like


def _dtype_bits(t: torch.Tensor) -> int:
    return t.element_size() * 8


def storage_bits(module: nn.Module) -> int:
    """Bits a linear layer's weight takes in storage (compressed modules say so themselves; bitsandbytes NF4 layers
    are counted by compress.layers.nf4)."""
    if hasattr(module, "storage_bits"):
        return int(module.storage_bits())
    if is_nf4_linear(module):
        return nf4_storage_bits(module)
    bits = module.weight.numel() * _dtype_bits(module.weight)
    scb = int8_row_absmax(module)  # bitsandbytes int8 (LLM.int8()): a float32 row abs-max per output row
    return bits + (scb.numel() * 32 if scb is not None else 0)


def _adapter_modules(blocks) -> set[int]:
    """ids of the modules inside LoRA adapters (peft's lora_A / lora_B of a wrapped linear): they are counted apart
    from the base weights they adapt."""
    ids: set[int] = set()
    for b in blocks:
        for m in b.modules():
            if hasattr(m, "base_layer") and hasattr(m, "lora_A"):
                for part in (m.lora_A, m.lora_B):
                    ids.update(id(x) for x in part.modules())
    return ids


def model_size(model: nn.Module) -> dict[str, Any]:
    """Size facts of a model in memory. bits_per_weight covers the linear layers inside the decoder blocks (what
    compression methods target, mixture-of-experts expert matrices included); bits_per_param covers every stored tensor of the model."""
    try:
        _, blocks = find_blocks(model)
    except ValueError:
        blocks = [model]
    adapters = _adapter_modules(blocks)
    block_mods = [m for b in blocks for m in b.modules() if is_linear_like(m) and id(m) not in adapters]
    bits = sum(storage_bits(m) for m in block_mods)
    weights = sum(m.in_features * m.out_features for m in block_mods)
    # fused mixture-of-experts weights ([E, 2I, D] / [E, D, I], transformers 5) are weight matrices too
    fused = [p for b in blocks for m in b.modules() if is_fused_experts(m) for p in (m.gate_up_proj, m.down_proj)]
    bits += sum(p.numel() * _dtype_bits(p) for p in fused)
    weights += sum(p.numel() for p in fused)
    adapter_params = {id(p): p for b in blocks for m in b.modules() if id(m) in adapters for p in m.parameters(recurse=False)}
    seen: set[int] = set()
    mem = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_meta:  # a streamed model's skeleton: the bytes it would take
            mem += t.numel() * t.element_size()
            continue
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        mem += t.numel() * t.element_size()
    mem += sum(nf4_state_bytes(m) for m in model.modules() if is_nf4_linear(m))
    params = count_parameters(model)
    out = {
        "params": params,
        "linear_weights": weights,
        "bits_per_weight": round(bits / weights, 4) if weights else None,
        "memory_bytes": mem,
        "bits_per_param_memory": round(8 * mem / params, 4) if params else None,
    }
    if adapter_params:  # LoRA adapters kept beside their (frozen, possibly quantized) base weights
        abits = sum(p.numel() * _dtype_bits(p) for p in adapter_params.values())
        out["adapter_params"] = sum(p.numel() for p in adapter_params.values())
        out["adapter_bits_per_weight"] = round(abits / weights, 4) if weights else None
        out["bits_per_weight_with_adapters"] = round((bits + abits) / weights, 4) if weights else None
    return out


def checkpoint_bytes(folder: str | Path) -> int:
    """Bytes of the weight files of a checkpoint folder (safetensors, adapters in subfolders included; config and
    tokenizer files excluded)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*.safetensors"))


def size_report(model: nn.Module, checkpoint: str | Path | None = None) -> dict[str, Any]:
    out = model_size(model)
    if checkpoint is not None and Path(checkpoint).is_dir():
        nbytes = checkpoint_bytes(checkpoint)
        out["checkpoint_bytes"] = nbytes
        out["bits_per_param"] = round(8 * nbytes / out["params"], 4) if out["params"] else None
    return out
