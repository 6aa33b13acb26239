"""The quantizers' data-free fallback for a linear that received no calibration token (an MoE expert the router never
picked on the calibration set; GPTQModel and llm-compressor fall back the same way)."""
from __future__ import annotations

from dataclasses import replace

import torch.nn as nn

from compress.kernels.quant_grid import QuantSpec, rtn_quantize
from compress.layers.quant_linear import QuantLinear
from compress.layers.weights import linear_weight


def rtn_linear(linear: nn.Module, spec: QuantSpec) -> QuantLinear:
    """The data-free fallback of the quantizers for a linear that saw no calibration token (an MoE expert the router
    never picked): RTN on the same grid; an act-mse observer, which needs inputs, becomes the weight-only mse search."""
    weight = linear_weight(linear)
    if spec.observer == "act-mse":
        spec = replace(spec, observer="mse")
    return QuantLinear.from_quantized(rtn_quantize(weight, spec), getattr(linear, "bias", None), dtype=weight.dtype)
