"""bitsandbytes LLM.int8() checkpoints, in the layout transformers writes and reads (`load_in_8bit`).

Tensors: each int8 linear's `weight` (int8 [out, in], row-wise absmax codes), `SCB` (float32 [out], the row abs-max)
and `weight_format` (uint8 scalar 0: row-major), as `Linear8bitLt.state_dict()` gives them; everything else in the
compute dtype. config.json: `quantization_config` = transformers' BitsAndBytesConfig(load_in_8bit=True,
llm_int8_threshold=..., llm_int8_skip_modules=[every linear left in float]). transformers rebuilds the same
Linear8bitLt modules from it (on CPU too), so the checkpoint reloads to identical logits, through this project's
loader (a plain transformers folder) or through `AutoModelForCausalLM.from_pretrained`.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import CompressError
from . import CONFIG_WRITERS, FORMAT_READERS, compressed_modules

QUANT_METHOD = "bitsandbytes"


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


def read(folder: str | Path, dtype: torch.dtype | None = None) -> tuple[nn.Module, Any, dict]:
    """Load a bitsandbytes 8-bit folder through transformers (the layout is transformers' own)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    load_bitsandbytes()
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    dtype = dtype or getattr(torch, config.get("dtype") or config.get("torch_dtype") or "float32")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    model.eval()
    tok = AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").exists() else None
    qc = config.get("quantization_config") or {}
    return model, tok, {"format": QUANT_METHOD, "quantization_config": qc}


CONFIG_WRITERS.append(quantization_config)
FORMAT_READERS[QUANT_METHOD] = read
