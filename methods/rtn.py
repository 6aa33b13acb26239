"""RTN: round-to-nearest weight quantization, the baseline every other quantizer is measured against.

Per output channel or per group of input columns, symmetric or asymmetric grid (compress.kernels.quant_grid); no
weight update: w_hat = s * (clamp(round(w / s) + z, 0, 2^b - 1) - z). The range of each group comes from the
observer: min/max (no data), mse (GPTQ's shrink search), or act-mse (the shrink search with each column's error
weighted by the calibration inputs' mean x^2, llama.cpp's imatrix idea: the one option here that reads data).
"""
from __future__ import annotations

from dataclasses import dataclass

from compress.kernels.quant_grid import WeightQuantConfig, rtn_quantize
from compress.layers.quant_linear import QuantLinear
from compress.layers.weights import linear_weight
from compress.pipeline.method import Method, Needs, register
from compress.quant.unrouted import rtn_linear


@dataclass
class RTNConfig(WeightQuantConfig):
    pass


@register("rtn", family="quantization", summary="Round-to-nearest weight quantization, per channel or group (baseline)",
          paper="baseline (grid as in GPTQ, arXiv 2210.17323)")
class RTN(Method):
    Config = RTNConfig
    needs = Needs()
    layerwise = True
    handles_experts = True
    unrouted_fallback = "RTN with the weight-only mse observer instead of act-mse"

    def __init__(self, config=None):
        super().__init__(config)
        if self.config.observer == "act-mse":  # per-column mean x^2 of every linear's inputs
            self.needs = Needs(calibration=True, stats=("input_norms",))

    def describe(self) -> str:
        return self.config.spec().label()

    def compress_linear(self, name, linear, stats):
        weight = linear_weight(linear)
        col_weight = stats.sq_norms / max(stats.ntokens, 1) if stats is not None else None
        qw = rtn_quantize(weight, self.config.spec(), col_weight)
        return QuantLinear.from_quantized(qw, getattr(linear, "bias", None), dtype=weight.dtype)

    def compress_unrouted(self, name, linear):
        return rtn_linear(linear, self.config.spec())

