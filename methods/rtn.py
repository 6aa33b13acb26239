"""RTN: round-to-nearest weight quantization, the baseline every other quantizer is measured against.

Per output channel or per group of input columns, symmetric or asymmetric min/max grid (compress.kernels.quant_grid);
no calibration data, no weight update: w_hat = s * (clamp(round(w / s) + z, 0, 2^b - 1) - z).
"""
from __future__ import annotations

from dataclasses import dataclass

from compress.kernels.quant_grid import WeightQuantConfig, rtn_quantize
from compress.layers.quant_linear import QuantLinear
from compress.layers.weights import linear_weight
from compress.pipeline.method import Method, Needs, register


@dataclass
class RTNConfig(WeightQuantConfig):
    pass


@register("rtn", family="quantization", summary="Round-to-nearest weight quantization, per channel or group (baseline)",
          paper="baseline (grid as in GPTQ, arXiv 2210.17323)")
class RTN(Method):
    Config = RTNConfig
    needs = Needs()
    layerwise = True

    def describe(self) -> str:
        return self.config.spec().label()

    def compress_linear(self, name, linear, stats):
        weight = linear_weight(linear)
        qw = rtn_quantize(weight, self.config.spec())
        return QuantLinear.from_quantized(qw, getattr(linear, "bias", None), dtype=weight.dtype)
