"""SparseGPT (Frantar & Alistarh 2023, arXiv 2301.00774): one-shot pruning with OBS weight reconstruction.

Per linear layer: H = 2 X^T X from the engine's hooks, dampened, the upper Cholesky factor of H^-1 (shared with GPTQ,
compress.kernels.hessian), then the column sweep of compress.kernels.obs (Algorithm 1): at the start of every block of `block_size`
columns the mask removes the weights of smallest w_c^2 / [H^-1]_cc^2 in that block (N:M: the M-N smallest of every M
columns of each row), and each pruned weight's error is spread over the columns not yet processed. With --bits the
kept weights are quantized in the same sweep (Sec. 3.5, joint sparsification and quantization, e.g. 50% + 4-bit).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from compress.core.config import option
from compress.core.errors import ConfigError
from compress.kernels.obs import PruneRule, sparsegpt_prune
from compress.kernels.quant_grid import WeightQuantConfig
from compress.layers.sparse_linear import SparseQuantLinear
from compress.layers.weights import linear_weight
from compress.pipeline.engine import LinearStats
from compress.pipeline.method import Needs, register
from compress.sparse.pruning import PruneConfig, PruningMethod


@dataclass
class SparseGPTConfig(PruneConfig, WeightQuantConfig):
    bits: int | None = option(None, "also quantize the kept weights to this many bits in the same sweep (the paper's "
                                    "joint 50% + 4-bit; grid set by --group-size, --sym); default: no quantization",
                              range=(2, 8))
    damp: float = option(0.01, "dampening: fraction of the mean Hessian diagonal added to it", range=(0.0, 10.0))
    block_size: int = option(128, "columns per lazy-update block, and per mask-selection block when unstructured",
                             range=(1, None))

    def check(self) -> None:
        super().check()
        nm = self.nm()
        if nm is not None and self.block_size % nm[1]:
            raise ConfigError(f"--block-size {self.block_size} is not a multiple of M={nm[1]} of --pattern {self.pattern}")

    def label(self) -> str:
        return super().label() + (f" + {self.spec().label()}" if self.bits else "")


@register("sparsegpt", family="pruning", summary="SparseGPT: OBS mask selection and weight update with the inverse "
          "Hessian, unstructured or N:M, optionally joint with quantization", paper="Frantar & Alistarh 2023, arXiv 2301.00774")
class SparseGPT(PruningMethod):
    Config = SparseGPTConfig
    needs = Needs(calibration=True, stats=("hessian",))
    layerwise = True
    handles_experts = True
    unrouted_fallback = ("the same sweep with an identity Hessian: no error feedback, the mask by |w| within each "
                         "block (magnitude), kept weights rounded to nearest")

    def compress_unrouted(self, name, linear):
        # with H = I the OBS sweep has no cross-column update and the score w^2 / [H^-1]_cc^2 is w^2 (Alg. 1)
        w = linear_weight(linear)
        return self.compress_linear(name, linear, LinearStats(0, torch.eye(w.shape[1], device=w.device)))

    def compress_linear(self, name, linear, stats):
        c = self.config
        weight = linear_weight(linear)
        res = sparsegpt_prune(weight, stats, PruneRule(c.target, c.nm()), c.spec() if c.bits else None,
                              block_size=c.block_size, percdamp=c.damp, name=name)
        facts = {"loss": round(res.info.loss, 6), "damp": res.info.percdamp}
        if res.quantized is not None:
            self.record_layer(name, res.keep, **facts)
            return SparseQuantLinear.from_quantized(res.quantized, getattr(linear, "bias", None), dtype=weight.dtype,
                                                    structure=c.structure)
        return self.sparse_layer(name, linear, res.weight.to(weight.dtype), res.keep, **facts)
