"""SmoothQuant (Xiao et al. 2023, arXiv 2211.10438): smooth activation outliers into the weights, then W8A8.

Per block, in one calibration pass: the per-input-channel activation abs-max of every linear (engine statistic
`input_absmax`); for each group of linears fed by a normalization (q/k/v, gate/up), s_j = max|X_j|^alpha /
max|W_j|^(1-alpha) folded into the norm (1/s) and the linears (s) by compress.quant.smoothing (eq. 3-4); then every target
linear becomes a compress.layers.w8a8_linear.W8A8Linear: int8 weights per output channel, int8 activations per token (dynamic) or
per tensor (static: max|X|/127 over the calibration set, of the smoothed input), int8 x int8 -> int32 matmul.
`--smooth-only` stops after the smoothing, so that GPTQ/RTN can follow in the same engine pass (a recipe);
`--no-smooth` is the paper's plain W8A8 baseline.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from compress.core.config import MethodConfig, option
from compress.core.errors import ConfigError
from compress.layers.w8a8_linear import ACT_SCHEMES, W8A8Linear
from compress.layers.weights import linear_weight
from compress.pipeline.method import Method, Needs, register
from compress.quant.smoothing import smooth_block, smoothable_groups

log = logging.getLogger("compress")


@dataclass
class SmoothQuantConfig(MethodConfig):
    alpha: float = option(0.5, "migration strength: s_j = max|X_j|^alpha / max|W_j|^(1-alpha)", range=(0.0, 1.0))
    smooth: bool = option(True, "fold smoothing factors into the norms and linears (--no-smooth: plain W8A8, the baseline)")
    smooth_only: bool = option(False, "only smooth, quantize nothing: a first stage before gptq/rtn in a recipe")
    act_scheme: str = option("per-token", "int8 activation scales: per-token (dynamic, at run time) or per-tensor "
                                          "(static, calibrated abs-max)", choices=ACT_SCHEMES)

    def check(self) -> None:
        if self.smooth_only and not self.smooth:
            raise ConfigError("--smooth-only with --no-smooth would leave the model unchanged; drop one of them")


@register("smoothquant", family="quantization", summary="SmoothQuant: migrate activation outliers into weights, then W8A8 int8",
          paper="Xiao et al. 2023, arXiv 2211.10438")
class SmoothQuant(Method):
    Config = SmoothQuantConfig
    needs = Needs(calibration=True, stats=("input_absmax",))
    layerwise = True

    def __init__(self, config=None):
        super().__init__(config)
        c = self.config
        if not c.smooth and c.act_scheme == "per-token":  # dynamic W8A8 without smoothing uses no data at all
            self.needs = Needs()

    def describe(self) -> str:
        c = self.config
        smooth = f"alpha {c.alpha}" if c.smooth else "no-smooth"
        return f"smooth {smooth}" if c.smooth_only else f"w8a8 {c.act_scheme} {smooth}"

    def compress_block(self, block) -> None:
        c = self.config
        targets = block.targets()
        stats = {}
        if self.needs.calibration:
            smoothed_groups = [n for _, names in smoothable_groups(block) for n in names] if c.smooth else []
            stats = block.collect(list(dict.fromkeys(targets + smoothed_groups)), ("input_absmax",))
        factors = {}  # linear -> s its input columns were multiplied by
        if c.smooth:
            for g in smooth_block(block, c.alpha, stats):
                before = stats[g.linears[0]].absmax.float()
                after = before / g.scales
                factors.update({n: g.scales for n in g.linears})
                # how far smoothing flattened the channels: max / median abs-max of the input, before and after
                self.report.setdefault("smoothed", {})[block.qualified(g.norm)] = {
                    "linears": g.linears, "s_min": round(g.scales.min().item(), 5), "s_max": round(g.scales.max().item(), 5),
                    "act_max_over_median_before": round((before.max() / before.median().clamp(min=1e-12)).item(), 3),
                    "act_max_over_median_after": round((after.max() / after.median().clamp(min=1e-12)).item(), 3),
                }
        if c.smooth_only:
            return
        for name in targets:
            linear = block.get(name)
            absmax = None
            if c.act_scheme == "per-tensor":
                absmax = stats[name].absmax.float()
                if name in factors:  # the smoothed input is X / s
                    absmax = absmax / factors[name].to(absmax.device)
                absmax = absmax.max()
            weight = linear_weight(linear)
            block.replace(name, W8A8Linear.from_float(weight, getattr(linear, "bias", None), act_scheme=c.act_scheme,
                                                      input_absmax=absmax))

    def finalize(self, model, ctx):
        smoothed = self.report.get("smoothed", {})
        if smoothed:
            before = sum(v["act_max_over_median_before"] for v in smoothed.values()) / len(smoothed)
            after = sum(v["act_max_over_median_after"] for v in smoothed.values()) / len(smoothed)
            log.info("SmoothQuant: smoothed %d norm-fed groups (alpha %g); input max/median channel abs-max %.1f -> %.1f "
                     "on average", len(smoothed), self.config.alpha, before, after)
        return model
