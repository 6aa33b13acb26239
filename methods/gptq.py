"""GPTQ / OPTQ (Frantar et al. 2022, arXiv 2210.17323): one-shot weight quantization with second-order error feedback.

Per linear layer: H = 2 X^T X from the engine's hooks, dampened by `damp` x mean(diag H), the upper Cholesky factor
of H^-1, then the column sweep of compress.kernels.obs.gptq_quantize (lazy batches of `block_size` columns). Options:
act-order (desc_act: columns by decreasing H_jj), static groups, true-sequential order inside a block.
A layer already pruned (stored sparse, e.g. by Wanda in the same recipe) keeps its mask: error feedback never refills
pruned weights (SparseGPT's fixed-mask sweep, arXiv 2301.00774); --mask-zeros does the same for exact zeros of any weight.
"""
from __future__ import annotations

from dataclasses import dataclass

from compress.core.config import option
from compress.core.errors import CompressError
from compress.kernels.obs import GPTQSweepConfig, gptq_quantize
from compress.layers.quant_linear import QuantLinear
from compress.layers.sparse_linear import SparseQuantLinear, sparse_keep_mask
from compress.layers.weights import linear_weight
from compress.pipeline.method import Method, Needs, register
from compress.quant.unrouted import rtn_linear


@dataclass
class GPTQConfig(GPTQSweepConfig):
    mask_zeros: bool = option(False, "keep exact-zero weights at zero (a fixed sparsity mask, e.g. a pruned model loaded "
                                     "from a dense export); automatic for layers stored sparse")


@register("gptq", family="quantization", summary="GPTQ/OPTQ: second-order one-shot weight quantization with error feedback",
          paper="Frantar et al. 2022, arXiv 2210.17323")
class GPTQ(Method):
    Config = GPTQConfig
    needs = Needs(calibration=True, stats=("hessian",))
    layerwise = True
    handles_experts = True
    unrouted_fallback = "RTN on the same grid (as GPTQModel and llm-compressor do)"

    def __init__(self, config=None):
        super().__init__(config)
        self.true_sequential = self.config.true_sequential

    def describe(self) -> str:
        c = self.config
        return c.spec().label() + (" act-order" if c.act_order else "") + (" static" if c.static_groups else "")

    def compress_linear(self, name, linear, stats):
        c = self.config
        weight = linear_weight(linear)
        mask = sparse_keep_mask(linear)
        if mask is None and c.mask_zeros:
            mask = weight != 0
        qw, info = gptq_quantize(weight, stats, c.spec(), block_size=c.block_size, percdamp=c.damp,
                                 act_order=c.act_order, static_groups=c.static_groups, mask=mask, name=name)
        self.report.setdefault("layers", {})[name] = {"loss": round(info.loss, 6), "damp": info.percdamp, "dead_columns": info.dead_columns}
        if mask is not None:  # stored sparse: the codes of the pruned weights are left out
            self.report["layers"][name]["sparsity"] = round(1 - mask.float().mean().item(), 6)
            return SparseQuantLinear.from_quantized(qw, getattr(linear, "bias", None), dtype=weight.dtype,
                                                    structure=getattr(linear, "structure", "unstructured"))
        return QuantLinear.from_quantized(qw, getattr(linear, "bias", None), dtype=weight.dtype)

    def compress_unrouted(self, name, linear):
        if sparse_keep_mask(linear) is not None or self.config.mask_zeros:
            raise CompressError(f"{name} received no calibration token; gptq has no RTN fallback that keeps a sparsity mask")
        return rtn_linear(linear, self.config.spec())
