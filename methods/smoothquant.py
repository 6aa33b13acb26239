"""SmoothQuant (Xiao et al. 2023, arXiv 2211.10438): smooth activation outliers into the weights, then W8A8.

Per block, in one calibration pass: the per-input-channel activation abs-max of every linear (engine statistic
`input_absmax`); for each group of linears fed by a normalization (q/k/v, gate/up), s_j = max|X_j|^alpha /
max|W_j|^(1-alpha) folded into the norm (1/s) and the linears (s) by compress.quant.smoothing (eq. 3-4); then every target
linear becomes a compress.layers.w8a8_linear.W8A8Linear: int8 weights per output channel, int8 activations per token (dynamic) or
per tensor (static: max|X|/127 over the calibration set, of the smoothed input), int8 x int8 -> int32 matmul.
`--smooth-only` stops after the smoothing, so that GPTQ/RTN can follow in the same engine pass (a recipe);
`--no-smooth` is the paper's plain W8A8 baseline.
alpha: by architecture unless given (ALPHA_BY_MODEL_TYPE: the values of the authors' code, mit-han-lab/smoothquant
ppl_eval.py / examples: OPT and BLOOM 0.5, LLaMA family 0.85, Mistral and Mixtral 0.8, Falcon 0.6; other types 0.5,
the paper's default). Weights per output channel by default; `--weight-scheme per-tensor` gives the paper's O1
(with per-token activations) and O3 (with per-tensor static activations) settings (Table 2). Not offered: O2's
per-tensor dynamic activations, and int8 attention products (the paper quantizes the BMMs too; here attention
runs in the compute dtype).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from compress.core.config import MethodConfig, option
from compress.core.errors import ConfigError
from compress.layers.w8a8_linear import ACT_SCHEMES, WEIGHT_SCHEMES, W8A8Linear
from compress.layers.weights import linear_weight
from compress.pipeline.method import Method, Needs, register
from compress.quant.smoothing import smooth_block, smoothable_groups

log = logging.getLogger("compress")


ALPHA_BY_MODEL_TYPE = {"opt": 0.5, "bloom": 0.5, "llama": 0.85, "mistral": 0.8, "mixtral": 0.8, "falcon": 0.6}
DEFAULT_ALPHA = 0.5  # the paper's OPT value, for model types the authors' code does not list


def default_alpha(model_type: str) -> float:
    return ALPHA_BY_MODEL_TYPE.get(model_type, DEFAULT_ALPHA)


@dataclass
class SmoothQuantConfig(MethodConfig):
    alpha: float | None = option(None, "migration strength: s_j = max|X_j|^alpha / max|W_j|^(1-alpha); default by "
                                       "architecture (OPT/BLOOM 0.5, LLaMA 0.85, Mistral/Mixtral 0.8, Falcon 0.6, "
                                       "else 0.5)", range=(0.0, 1.0))
    smooth: bool = option(True, "fold smoothing factors into the norms and linears (--no-smooth: plain W8A8, the baseline)")
    smooth_only: bool = option(False, "only smooth, quantize nothing: a first stage before gptq/rtn in a recipe")
    act_scheme: str = option("per-token", "int8 activation scales: per-token (dynamic, at run time) or per-tensor "
                                          "(static, calibrated abs-max)", choices=ACT_SCHEMES)
    weight_scheme: str = option("per-channel", "int8 weight scales: per-channel, or per-tensor (the paper's O1/O3)",
                                choices=WEIGHT_SCHEMES)

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
        self.alpha = c.alpha if c.alpha is not None else DEFAULT_ALPHA

    def prepare(self, model, ctx) -> None:
        c = self.config
        if c.alpha is None:
            model_type = getattr(getattr(model, "config", None), "model_type", "") or ""
            self.alpha = default_alpha(model_type)
            if c.smooth:
                log.info("SmoothQuant alpha %g for model type %r (the authors' value; --alpha overrides)", self.alpha,
                         model_type)
        self.report["alpha"] = self.alpha

    def describe(self) -> str:
        c = self.config
        smooth = ("alpha " + (f"{c.alpha}" if c.alpha is not None else "auto")) if c.smooth else "no-smooth"
        weights = "" if c.weight_scheme == "per-channel" else " w-per-tensor"
        return f"smooth {smooth}" if c.smooth_only else f"w8a8 {c.act_scheme}{weights} {smooth}"

    def compress_block(self, block) -> None:
        c = self.config
        targets = block.targets()
        stats = {}
        if self.needs.calibration:
            smoothed_groups = [n for _, names in smoothable_groups(block) for n in names] if c.smooth else []
            stats = block.collect(list(dict.fromkeys(targets + smoothed_groups)), ("input_absmax",))
        factors = {}  # linear -> s its input columns were multiplied by
        if c.smooth:
            for g in smooth_block(block, self.alpha, stats):
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
                                                      input_absmax=absmax, weight_scheme=c.weight_scheme))

    def finalize(self, model, ctx):
        smoothed = self.report.get("smoothed", {})
        if smoothed:
            before = sum(v["act_max_over_median_before"] for v in smoothed.values()) / len(smoothed)
            after = sum(v["act_max_over_median_after"] for v in smoothed.values()) / len(smoothed)
            log.info("SmoothQuant: smoothed %d norm-fed groups (alpha %g); input max/median channel abs-max %.1f -> %.1f "
                     "on average", len(smoothed), self.alpha, before, after)
        return model
