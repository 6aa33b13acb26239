"""LLM.int8() (Dettmers et al. 2022, arXiv 2208.07339): vector-wise int8 matmul with mixed-precision decomposition.

Every block linear becomes bitsandbytes' Linear8bitLt (inference mode): weights int8 per output row (absmax / 127,
the row abs-max kept as `SCB`); at run time each input row gets its own absmax scale, the input dimensions holding a
value with |x| >= threshold (the outlier features, section 3.2) are multiplied in 16/32-bit, the rest int8 x int8 ->
int32 and rescaled by the outer product of the row and column scales (eq. 5-6). As in bitsandbytes' inference mode,
the outlier columns are multiplied with the int8 weights de-quantized (only int8 weights are stored).
With calibration data the method also reports, per layer, which fraction of input dimensions reached the threshold
on the calibration set (the engine's `input_absmax` statistic).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from compress.core.config import MethodConfig, option
from compress.formats.bitsandbytes import load_bitsandbytes
from compress.layers.weights import linear_weight
from compress.pipeline.method import Method, Needs, register

log = logging.getLogger("compress")


@dataclass
class LLMInt8Config(MethodConfig):
    outlier_threshold: float = option(6.0, "input magnitude from which a feature dimension is an outlier kept in 16-bit "
                                           "(0: no decomposition, everything int8)", range=(0.0, None))
    report_outliers: bool = option(True, "measure each layer's fraction of outlier input dimensions on the calibration "
                                         "set (--no-report-outliers: no calibration data needed)")


def int8_linear(weight: torch.Tensor, bias: torch.Tensor | None, threshold: float) -> torch.nn.Module:
    """bitsandbytes Linear8bitLt holding W [out, in] as row-wise int8 codes + float32 row abs-max (SCB)."""
    bnb = load_bitsandbytes()
    out_f, in_f = weight.shape
    mod = bnb.nn.Linear8bitLt(in_f, out_f, bias=bias is not None, has_fp16_weights=False, threshold=threshold)
    mod.weight = bnb.nn.Int8Params(weight.detach().to("cpu", torch.float16), requires_grad=False, has_fp16_weights=False)
    if bias is not None:
        mod.bias = torch.nn.Parameter(bias.detach().to("cpu", weight.dtype), requires_grad=False)
    mod = mod.to("cpu")  # Int8Params quantizes when moved to a device: CB (int8) and SCB (row abs-max)
    return mod.eval()


@register("llm-int8", family="quantization", summary="LLM.int8(): vector-wise int8 with 16-bit outlier decomposition (bitsandbytes)",
          paper="Dettmers et al. 2022, arXiv 2208.07339")
class LLMInt8(Method):
    Config = LLMInt8Config
    needs = Needs(calibration=True, stats=("input_absmax",))
    layerwise = True

    def __init__(self, config=None):
        super().__init__(config)
        if not self.config.report_outliers:
            self.needs = Needs()

    def describe(self) -> str:
        return f"int8 threshold {self.config.outlier_threshold:g}"

    def compress_linear(self, name, linear, stats):
        t = self.config.outlier_threshold
        if stats is not None:
            absmax = stats.absmax.float()
            n_out = int((absmax >= t).sum()) if t > 0 else 0
            layers = self.report.setdefault("layers", {})
            layers[name] = {"outlier_dims": n_out, "in_features": absmax.numel(),
                            "outlier_fraction": round(n_out / absmax.numel(), 6), "input_absmax": round(absmax.max().item(), 3)}
            fracs = [v["outlier_fraction"] for v in layers.values()]
            self.report["threshold"] = t
            self.report["mean_outlier_fraction"] = round(sum(fracs) / len(fracs), 6)
            self.report["layers_with_outliers"] = sum(v["outlier_dims"] > 0 for v in layers.values())
        return int8_linear(linear_weight(linear), getattr(linear, "bias", None), t)

    def finalize(self, model, ctx):
        if "layers" in self.report:
            log.info("LLM.int8(): %d of %d layers have input dimensions >= %g on the calibration set; mean fraction %.4f",
                     self.report["layers_with_outliers"], len(self.report["layers"]), self.config.outlier_threshold,
                     self.report["mean_outlier_fraction"])
        return model
