"""GPTQ / OPTQ (Frantar et al. 2022, arXiv 2210.17323): one-shot weight quantization with second-order error feedback.

Per linear layer: H = 2 X^T X from the engine's hooks, dampened by `damp` x mean(diag H), the upper Cholesky factor
of H^-1, then the column sweep of compress.obs.gptq_quantize (lazy batches of `block_size` columns). Options:
act-order (desc_act: columns by decreasing H_jj), static groups, true-sequential order inside a block.
"""
from __future__ import annotations

from dataclasses import dataclass

from compress.obs import GPTQSweepConfig, gptq_quantize
from compress.qlinear import QuantLinear, linear_weight
from compress.registry import Method, Needs, register


@dataclass
class GPTQConfig(GPTQSweepConfig):
    pass


@register("gptq", family="quantization", summary="GPTQ/OPTQ: second-order one-shot weight quantization with error feedback",
          paper="Frantar et al. 2022, arXiv 2210.17323")
class GPTQ(Method):
    Config = GPTQConfig
    needs = Needs(calibration=True, stats=("hessian",))
    layerwise = True

    def __init__(self, config=None):
        super().__init__(config)
        self.true_sequential = self.config.true_sequential

    def describe(self) -> str:
        c = self.config
        return c.spec().label() + (" act-order" if c.act_order else "") + (" static" if c.static_groups else "")

    def compress_linear(self, name, linear, stats):
        c = self.config
        weight = linear_weight(linear)
        qw, info = gptq_quantize(weight, stats.hessian, c.spec(), block_size=c.block_size, percdamp=c.damp,
                                 act_order=c.act_order, static_groups=c.static_groups, name=name)
        self.report.setdefault("layers", {})[name] = {"loss": round(info.loss, 6), "damp": info.percdamp, "dead_columns": info.dead_columns}
        return QuantLinear.from_quantized(qw, getattr(linear, "bias", None), dtype=weight.dtype)
