"""OWQ: outlier-aware weight quantization (Lee et al. 2023, arXiv 2306.02272).

Per linear layer, inside the sequential engine like GPTQ:
  * sensitivity of input column j (Sec. 3.2, Eq. 6): lambda_j * ||dW_:,j||^2, with lambda_j = H_jj the Hessian
    diagonal and dW = W - Q(W) the perturbation round-to-nearest quantization on the layer's grid would cause;
  * the k most sensitive ("weak") columns stay in float16; the other columns are quantized by GPTQ, which sweeps
    the weak columns last so that they absorb the error feedback of every quantized column (the reference code's
    order), and forms its groups over the quantized columns only.
k comes from --target-bits (the paper's "3.01 bits"): the weak columns may add (target_bits - bits) bits per weight
to each layer, counted exactly as stored: 16 bits per output row plus a 32-bit column index each, less whatever the
quantized part shrinks by (codes are packed in chunks of 32 columns, so that is little). Budget a layer cannot spend
(less than one column's worth) carries over to the next layer, so the whole model never exceeds the target and
reaches it to within one column. --weak-columns K fixes k instead.
--allocation reference follows the authors' code instead (xvyaward/owq main.py layerwise_quantize): every layer of a
block gets k = round(in_features * r * ratio), made even, with r = 12 / (16 - bits) * (target_bits - bits) / (linears
per block) and ratio 1 for attention q/k/v/o, 0.375 for the MLP of LLaMA-family models, 0.25 for OPT/BLOOM/Falcon
(its model_config.json). --sensitivity-grid reference measures dW of Eq. 6 on the reference's temporary grid (per
output channel, range tuned by the |.|^2.4 error over 40 candidates; compress.kernels.quant_grid.mse_fake_quantize)
instead of the layer's own group min/max grid. --paper-protocol selects both.
Reported bits per weight count everything stored: codes, scales, zero points, the float16 columns and their indices.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from compress.core.config import option
from compress.core.errors import ConfigError
from compress.kernels.obs import GPTQSweepConfig, gptq_quantize
from compress.kernels.quant_grid import QuantSpec, mse_fake_quantize, packed_words, rtn_quantize
from compress.layers.quant_linear import OWQLinear, QuantLinear
from compress.layers.weights import linear_weight
from compress.model.arch import find_blocks
from compress.model.surgery import is_linear_like
from compress.pipeline.method import Method, Needs, register

WEAK_VALUE_BITS = 16  # float16 weak columns
WEAK_INDEX_BITS = 32  # int32 column index


@dataclass
class OWQConfig(GPTQSweepConfig):
    target_bits: float | None = option(None, "average bits per weight the codes plus the float16 weak columns may reach "
                                             "(scales and zero points not included), e.g. 3.01 at --bits 3; default: "
                                             "bits + 0.01", range=(1.0, 16.0))
    weak_columns: int | None = option(None, "keep exactly this many weak columns per layer instead of --target-bits",
                                      range=(0, None))
    allocation: str = option("budget", "how --target-bits becomes weak columns per layer: budget (every layer the same "
                                       "share of its weights, counted as stored) or reference (the authors' code: "
                                       "attention ratio 1, MLP 0.375 LLaMA / 0.25 OPT)", choices=("budget", "reference"))
    sensitivity_grid: str = option("layer", "grid whose error dW ranks the weak columns: layer (the layer's own "
                                            "group grid) or reference (per-channel, MSE-tuned range, as the authors' "
                                            "code)", choices=("layer", "reference"))

    def check(self) -> None:
        if self.target_bits is not None and self.weak_columns is not None:
            raise ConfigError(f"--target-bits {self.target_bits!r} and --weak-columns {self.weak_columns!r} both given; "
                              "use one of them")
        if self.allocation == "reference" and self.weak_columns is not None:
            raise ConfigError(f"--allocation reference derives the weak columns from --target-bits; drop "
                              f"--weak-columns {self.weak_columns!r} or use --allocation budget")
        if self.target_bits is not None and self.target_bits < self.bits:
            raise ConfigError(f"--target-bits {self.target_bits!r} is below --bits {self.bits}; allowed: >= {self.bits}")

    def extra_bits(self) -> float:
        """Bits per weight the weak columns may add."""
        return (self.target_bits if self.target_bits is not None else self.bits + 0.01) - self.bits


def owq_storage_bits(out_features: int, in_features: int, k: int, spec: QuantSpec, g_idx: bool) -> int:
    """Bits an OWQLinear with k weak columns stores (as OWQLinear.storage_bits counts them), without building it."""
    n = in_features - k
    bits = packed_words(n, spec.bits) * 32 * out_features + spec.groups(n) * out_features * 16
    if not spec.sym:
        bits += spec.groups(n) * packed_words(out_features, spec.bits) * 32
    if g_idx:
        bits += n * 32
    return bits + k * (out_features * WEAK_VALUE_BITS + WEAK_INDEX_BITS)


# The OWQ reference's model_config.json: attention q/k/v/o get ratio 1; the MLP 0.375 (LLaMA) or 0.25 (OPT, BLOOM,
# Falcon). Other model types are taken as LLaMA-like.
MLP_RATIO = {"opt": 0.25, "bloom": 0.25, "falcon": 0.25}
LLAMA_MLP_RATIO = 0.375


def reference_ratio(name: str, model_type: str) -> float:
    return 1.0 if re.search(r"attn|attention", name) else MLP_RATIO.get(model_type, LLAMA_MLP_RATIO)


def reference_weak_count(in_features: int, bits: int, target_bits: float, ratio: float, n_layers: int) -> int:
    """OWQ reference (main.py): n_out = round(in * r * ratio), r = 12 / (16 - bits) * (target - bits) / n_layers,
    made even."""
    r = 12 / (16 - bits) * (target_bits - bits) / n_layers
    k = round(in_features * r * ratio)
    return min(k + (k % 2), in_features - 1)


def sensitivity(weight: torch.Tensor, hessian: torch.Tensor, dequantized: torch.Tensor) -> torch.Tensor:
    """OWQ Eq. 6: lambda_j ||W_:,j - Q(W)_:,j||^2 for every input column j (lambda_j = H_jj)."""
    return torch.diag(hessian).float() * ((weight.float() - dequantized.float()) ** 2).sum(dim=0)


@register("owq", family="quantization",
          summary="OWQ: GPTQ with the most Hessian-sensitive input columns kept in float16",
          paper="Lee et al. 2023, arXiv 2306.02272")
class OWQ(Method):
    Config = OWQConfig
    needs = Needs(calibration=True, stats=("hessian",))
    layerwise = True
    paper_options = {"allocation": "reference", "sensitivity_grid": "reference"}

    def __init__(self, config=None):
        super().__init__(config)
        self.true_sequential = self.config.true_sequential
        self._carry_bits = 0.0  # budget earlier layers could not spend
        self._model_type = ""
        self._block_linears = 0

    def prepare(self, model, ctx) -> None:
        self._model_type = getattr(getattr(model, "config", None), "model_type", "") or ""
        _, blocks = find_blocks(model)
        self._block_linears = sum(1 for n, m in blocks[0].named_modules() if n and is_linear_like(m)) if len(blocks) else 0
        self.report["allocation"], self.report["sensitivity_grid"] = self.config.allocation, self.config.sensitivity_grid

    def describe(self) -> str:
        c = self.config
        weak = f"k={c.weak_columns}" if c.weak_columns is not None else f"target {c.bits + c.extra_bits():g} bits"
        weak += "" if c.allocation == "budget" else " ref-alloc"
        weak += "" if c.sensitivity_grid == "layer" else " ref-grid"
        return c.spec().label() + f" {weak}" + (" act-order" if c.act_order else "") + (" static" if c.static_groups else "")

    def weak_count(self, out_features: int, in_features: int, name: str = "") -> int:
        c = self.config
        if c.allocation == "reference":
            return reference_weak_count(in_features, c.bits, c.bits + c.extra_bits(),
                                        reference_ratio(name, self._model_type), max(self._block_linears, 1))
        if c.weak_columns is not None:
            return min(c.weak_columns, in_features - 1)
        spec, g_idx = c.spec(), c.act_order and not c.static_groups
        base = owq_storage_bits(out_features, in_features, 0, spec, g_idx)
        extra = lambda n: owq_storage_bits(out_features, in_features, n, spec, g_idx) - base  # noqa: E731
        available = c.extra_bits() * out_features * in_features + self._carry_bits
        k = min(max(int(available // (out_features * WEAK_VALUE_BITS + WEAK_INDEX_BITS)), 0), in_features - 1)
        while k + 1 < in_features and extra(k + 1) <= available:  # the quantized part may shrink a little
            k += 1
        while k > 0 and extra(k) > available:
            k -= 1
        self._carry_bits = available - extra(k)
        return k

    def compress_linear(self, name, linear, stats):
        c = self.config
        spec = c.spec()
        weight = linear_weight(linear)
        W = weight.detach().float()
        out_f, in_f = W.shape
        k = self.weak_count(out_f, in_f, name)
        weak = None
        if k:
            w_hat = mse_fake_quantize(W, spec.bits, spec.sym) if c.sensitivity_grid == "reference" else \
                rtn_quantize(W, spec, torch.diag(stats.hessian) / 2).dequantize()
            sens = sensitivity(W, stats.hessian, w_hat)
            weak = torch.sort(torch.topk(sens, k).indices).values
        qw, info = gptq_quantize(W, stats.hessian, spec, block_size=c.block_size, percdamp=c.damp,
                                 act_order=c.act_order, static_groups=c.static_groups, name=name, keep_float=weak)
        bias = getattr(linear, "bias", None)
        if weak is None:
            module = QuantLinear.from_quantized(qw, bias, dtype=weight.dtype)
        else:
            module = OWQLinear.from_parts(qw, weak, info.kept, bias, dtype=weight.dtype)
        layers = self.report.setdefault("layers", {})
        layers[name] = {"loss": round(info.loss, 6), "damp": info.percdamp, "dead_columns": info.dead_columns, "weak_columns": k}
        self.report["weak_columns_total"] = sum(v["weak_columns"] for v in layers.values())
        return module
