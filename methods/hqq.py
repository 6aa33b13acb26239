"""HQQ, Half-Quadratic Quantization (Badri & Shaji 2023, mobiusml.github.io/hqq_blog): calibration-free weight
quantization. Per group, the zero point (and, by default, the scale) of the grid minimise the l_p<1 (p = 0.7) error
of the weights, by the paper's half-quadratic shrinkage iterations (compress.kernels.hqq; beta 10, kappa 1.01, 20
iterations): by default the reference's own iterations (the hqq package's: scale fixed, the zero continuous, stopping
when the matrix's mean |W - W_hat| stops falling), then the zero rounded onto the integer grid of RTN/GPTQ
(--solver integer: iterate on the integer grid, the scale solved by least squares too), so the result is an ordinary
QuantLinear and every export and kernel reads it. No calibration data.
"""
from __future__ import annotations

from dataclasses import dataclass

from compress.core.config import option
from compress.core.errors import ConfigError
from compress.kernels.hqq import SOLVERS, HQQParams, hqq_quantize
from compress.kernels.quant_grid import WeightQuantConfig
from compress.layers.quant_linear import QuantLinear
from compress.layers.weights import linear_weight
from compress.pipeline.method import Method, Needs, register


@dataclass
class HQQConfig(WeightQuantConfig):
    lp: float = option(0.7, "p of the l_p error the solver minimises (the paper's 0.7)", range=(0.01, 1.0))
    beta: float = option(10.0, "initial beta of the half-quadratic splitting", range=(1e-6, None))
    kappa: float = option(1.01, "beta's growth factor per iteration", range=(1.0, None))
    iters: int = option(20, "solver iterations per group", range=(0, 1000))
    solver: str = option("reference", "reference: the hqq package's iterations (float zero, scale fixed, early stop on "
                                      "the matrix's mean |error|), then the zero rounded to the integer grid; integer: "
                                      "iterate on the integer grid (zero rounded each step, scale solved too), each "
                                      "group keeping its best l_p iterate", choices=SOLVERS)
    optimize_scale: bool = option(True, "integer solver: also solve for the scale each iteration (the integer zero "
                                        "alone rarely moves)")

    def check(self) -> None:
        super().check()
        if self.signed_scale:
            raise ConfigError("--signed-scale: hqq's solver updates positive scales only; use --sym alone")
        if self.observer != "minmax":
            raise ConfigError(f"observer {self.observer!r}: hqq starts its solver from the min/max grid; allowed: minmax")

    def params(self) -> HQQParams:
        return HQQParams(self.lp, self.beta, self.kappa, self.iters, self.optimize_scale, self.solver)


@register("hqq", family="quantization", summary="HQQ: calibration-free half-quadratic l_p<1 fit of each group's zero/scale",
          paper="Badri & Shaji 2023, Half-Quadratic Quantization of Large Machine Learning Models")
class HQQ(Method):
    Config = HQQConfig
    needs = Needs()
    layerwise = True
    handles_experts = True  # data-free: each expert matrix like any linear

    def describe(self) -> str:
        c = self.config
        return c.spec().label() + f" p{c.lp:g}" + ("" if c.solver == "reference" else " integer" + ("" if c.optimize_scale else " zero-only"))

    def compress_linear(self, name, linear, stats):
        weight = linear_weight(linear)
        qw = hqq_quantize(weight, self.config.spec(), self.config.params())
        return QuantLinear.from_quantized(qw, getattr(linear, "bias", None), dtype=weight.dtype)
