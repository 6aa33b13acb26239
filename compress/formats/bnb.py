"""The bitsandbytes 4-bit serialization that transformers reads (`quantization_config.quant_method: "bitsandbytes"`).

A model holding bitsandbytes `Linear4bit` layers (QLoRA's NF4 base, compress.nf4) is written as transformers writes
it: each 4-bit weight as its packed uint8 codes plus `weight.absmax`, `weight.quant_map`, `weight.nested_absmax`,
`weight.nested_quant_map` and the packed `weight.quant_state.bitsandbytes__nf4`, other tensors in the compute dtype,
and a `quantization_config` equal to a BitsAndBytesConfig(load_in_4bit=True, ...) listing every linear left in
floating point. `AutoModelForCausalLM.from_pretrained(folder)` loads it with bitsandbytes installed; this project's
reader does the same and keeps the layers on the reference kernel (compress.nf4.use_reference_kernel), so a reload
evaluates to the run's numbers.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..nf4 import is_nf4_linear, use_reference_kernel
from . import FORMAT_READERS, QUANT_CONFIG_WRITERS

FORMAT_NAME = "bitsandbytes-4bit"


def bnb_quantization_config(model: nn.Module) -> dict[str, Any] | None:
    """transformers' BitsAndBytesConfig for a model holding 4-bit layers (None when it holds none)."""
    four = {n: m for n, m in model.named_modules() if is_nf4_linear(m)}
    if not four:
        return None
    states = [m.weight.quant_state for m in four.values()]
    qtypes = {s.quant_type for s in states}
    nested = {bool(s.nested) for s in states}
    compute = {m.compute_dtype for m in four.values()}
    if len(qtypes) > 1 or len(nested) > 1 or len(compute) > 1:
        raise ValueError(f"4-bit layers with mixed settings cannot be described by one BitsAndBytesConfig: {qtypes}, {nested}, {compute}")
    # Float linears transformers must leave alone on load (adapter internals of a peft-wrapped model are not the base's).
    keep = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not is_nf4_linear(m) and ".lora_" not in n]
    compute_dtype = compute.pop() or torch.float32
    return {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": qtypes.pop(),
        "bnb_4bit_use_double_quant": nested.pop(),
        "bnb_4bit_compute_dtype": str(compute_dtype).replace("torch.", ""),
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": [re.escape(n) for n in keep],
        "blocksizes": sorted({s.blocksize for s in states}),  # informative: each layer's state records its own
    }


def read_bnb(folder: Path, dtype: torch.dtype | None) -> tuple[nn.Module, Any, dict]:
    """Load a bitsandbytes 4-bit folder through transformers (CPU), on the reference kernel."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((Path(folder) / "config.json").read_text())
    saved = config.get("dtype") or config.get("torch_dtype") or "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype or getattr(torch, saved), device_map="cpu")
    for m in model.modules():
        if is_nf4_linear(m):
            use_reference_kernel(m)
    model.eval()
    tok = AutoTokenizer.from_pretrained(folder) if (Path(folder) / "tokenizer_config.json").exists() else None
    qc = dict(config.get("quantization_config") or {})
    qc.pop("llm_int8_skip_modules", None)
    return model, tok, {"format": FORMAT_NAME, "quantization_config": qc}


QUANT_CONFIG_WRITERS.append(bnb_quantization_config)
FORMAT_READERS["bitsandbytes"] = read_bnb
