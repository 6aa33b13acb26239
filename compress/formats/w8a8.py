"""W8A8 int8 checkpoints: the native module type of compress.layers.w8a8_linear.W8A8Linear, and its compressed-tensors export.

Native (`quant_method: "compress"`, module type `w8a8_linear`): `weight` int8 [out, in], `weight_scale` float16
[out, 1], `input_scale` float32 [1] (static per-tensor activations only), `bias`; the activation scheme is in the
module's entry of `quantization_config.modules`.

compressed-tensors (`--export compressed-tensors`, folder `<output>-compressed-tensors`): the same tensors under the
same names, with the `quantization_config` llm-compressor writes for W8A8 int8 (`format: "int-quantized"`, one
config group targeting Linear: weights int8 symmetric per channel, input activations int8 symmetric per token
dynamic, or per tensor static with `input_scale`), every linear left in float listed in `ignore`. vLLM's
CompressedTensorsW8A8Int8 scheme serves this layout; transformers with the compressed-tensors package loads it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.nn as nn

from compress.core.errors import CompressError
from compress.formats.native import save_checkpoint
from compress.layers.types import compressed_modules
from compress.layers.w8a8_linear import W8A8Linear


def w8a8_modules(model: nn.Module) -> dict[str, W8A8Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, W8A8Linear)}


def _int8_args(strategy: str, dynamic: bool) -> dict[str, Any]:
    return {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None, "strategy": strategy,
            "dynamic": dynamic, "actorder": None, "block_structure": None, "observer": None, "observer_kwargs": {}}


def compressed_tensors_config(model: nn.Module) -> dict[str, Any]:
    """The `quantization_config` of a W8A8 model in compressed-tensors' int-quantized layout."""
    mods = w8a8_modules(model)
    others = [n for n in compressed_modules(model) if n not in mods]
    if others:
        raise CompressError(f"compressed-tensors int-quantized holds W8A8 layers only; {others[0]} is a different kind")
    schemes = {m.act_scheme for m in mods.values()}
    if len(schemes) != 1:
        raise CompressError(f"one activation scheme per export, this model mixes {sorted(schemes)}")
    static = schemes.pop() == "per-tensor"
    wschemes = {m.weight_scheme for m in mods.values()}
    if len(wschemes) != 1:
        raise CompressError(f"one weight scheme per export, this model mixes {sorted(wschemes)}")
    wstrategy = "channel" if wschemes.pop() == "per-channel" else "tensor"
    ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": _int8_args(wstrategy, False),
            "input_activations": _int8_args("tensor", False) if static else _int8_args("token", True),
            "output_activations": None,
            "format": "int-quantized",
        }},
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def export_int_quantized(model: nn.Module, tokenizer: Any, target: Path, overwrite: bool) -> Path:
    """The in-memory tensors already have compressed-tensors' names and dtypes: only config.json differs."""
    return save_checkpoint(model, tokenizer, target, overwrite=overwrite,
                           extra_config={"quantization_config": compressed_tensors_config(model)})
