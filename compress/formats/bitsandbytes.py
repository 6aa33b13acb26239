"""bitsandbytes checkpoints, in the layout transformers writes and reads (`quant_method: "bitsandbytes"`).

* LLM.int8() (`load_in_8bit`): each int8 linear's `weight` (int8 [out, in], row-wise absmax codes), `SCB` (float32
  [out], the row abs-max) and `weight_format` (uint8 scalar 0: row-major), as `Linear8bitLt.state_dict()` gives them;
  `quantization_config` = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=..., llm_int8_skip_modules=[every
  linear left in float]).
* 4-bit (QLoRA's NF4 base, compress.layers.nf4; `load_in_4bit`): each weight as its packed uint8 codes plus `weight.absmax`,
  `weight.quant_map`, `weight.nested_absmax`, `weight.nested_quant_map` and the packed
  `weight.quant_state.bitsandbytes__nf4`; `quantization_config` = BitsAndBytesConfig(load_in_4bit=True, ...).
Everything else is in the compute dtype. `AutoModelForCausalLM.from_pretrained(folder)` rebuilds the same layers (on
CPU too); this project's reader does the same and keeps 4-bit layers on the reference kernel
(compress.layers.nf4.use_reference_kernel), so a reload evaluates to the run's numbers.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from compress.core.errors import CompressError
from compress.core.readers import read_json_object
from compress.formats.base import Format
from compress.layers.nf4 import is_nf4_linear, use_reference_kernel
from compress.layers.types import compressed_modules

QUANT_METHOD = "bitsandbytes"
FORMAT_4BIT = "bitsandbytes-4bit"


def load_bitsandbytes():
    """Import bitsandbytes quietly (its CPU backend logs a warning per matmul about casting to float16, and one at
    import about an optional kernel package); a one-line error when it is missing."""
    for name in ("bitsandbytes.autograd._functions", "bitsandbytes.backends.cpu.ops", "bitsandbytes.cextension"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except ImportError:
        raise CompressError("LLM.int8() needs the bitsandbytes package: pip install 'bitsandbytes>=0.45'") from None
    return bitsandbytes


def int8_modules(model: nn.Module) -> dict[str, nn.Module]:
    try:
        import bitsandbytes  # noqa: F401 - only look for its modules when it is installed
    except ImportError:
        return {}
    from bitsandbytes.nn import Linear8bitLt

    return {n: m for n, m in model.named_modules() if isinstance(m, Linear8bitLt)}


def quantization_config(model: nn.Module) -> dict[str, Any] | None:
    """The transformers `quantization_config` of a model whose compressed linears are bitsandbytes int8 ones."""
    mods = int8_modules(model)
    if not mods:
        return None
    others = [n for n in compressed_modules(model) if n not in mods]
    if others:
        raise CompressError(f"a checkpoint cannot mix bitsandbytes int8 layers with other compressed layers ({others[0]}, ...)")
    thresholds = {float(m.state.threshold) for m in mods.values()}
    if len(thresholds) != 1:
        raise CompressError(f"the bitsandbytes format has one outlier threshold per model; this model has {sorted(thresholds)}")
    from transformers import BitsAndBytesConfig

    skip = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in mods]
    cfg = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=thresholds.pop(), llm_int8_skip_modules=skip or None)
    return cfg.to_dict()


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


def read(folder: str | Path, dtype: torch.dtype | None = None) -> tuple[nn.Module, Any, dict]:
    """Load a bitsandbytes folder (8-bit or 4-bit) through transformers (the layout is transformers' own)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    load_bitsandbytes()
    folder = Path(folder)
    config = read_json_object(folder / "config.json", "model config")
    dtype = dtype or getattr(torch, config.get("dtype") or config.get("torch_dtype") or "float32")
    qc = dict(config.get("quantization_config") or {})
    four_bit = bool(qc.get("load_in_4bit"))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **({"device_map": "cpu"} if four_bit else {}))
    for m in model.modules():
        if is_nf4_linear(m):
            use_reference_kernel(m)
    model.eval()
    tok = AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").exists() else None
    if four_bit:
        qc.pop("llm_int8_skip_modules", None)
    return model, tok, {"format": FORMAT_4BIT if four_bit else QUANT_METHOD, "quantization_config": qc}


class BitsAndBytesFormat(Format):
    name = QUANT_METHOD
    summary = "bitsandbytes LLM.int8() and 4-bit layers, in transformers' own layout"

    def detect(self, config: dict[str, Any]) -> bool:
        return (config.get("quantization_config") or {}).get("quant_method") == QUANT_METHOD

    def read(self, folder: Path, dtype: torch.dtype | None) -> tuple[nn.Module, Any, dict]:
        return read(folder, dtype)

    def quantization_config(self, model: nn.Module) -> dict[str, Any] | None:
        return quantization_config(model) or bnb_quantization_config(model)


FORMAT = BitsAndBytesFormat()
