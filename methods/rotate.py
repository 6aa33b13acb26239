"""rotate: QuaRot/SpinQuant-style orthogonal rotations (Ashkboos et al. 2024, arXiv 2404.00456; Liu et al. 2024, arXiv
2405.16406) as a first stage before any weight quantizer (a recipe: rotate -> gptq, rotate -> rtn, rotate -> awq,
rotate -> autoround).

Folds the RMSNorm scales into the next linears, rotates the residual stream by R1 (fused into the embedding, every
block's input and output linears and the (untied) head) and, unless --no-online, rotates the down-projection's
input by an online Hadamard R4 applied at run time (compress.quant.rotation). The float model computes the same
function; outliers are spread over every channel before the quantizer sees the weights. The rotations are fixed
(QuaRot), not learned (SpinQuant's Cayley-SGD training of R1/R2 is not implemented). R1: randomized Hadamard
(--r1 hadamard, the default; signs from --seed) or a random orthogonal matrix (--r1 random).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from compress.core.config import MethodConfig, option
from compress.pipeline.method import Method, Needs, register
from compress.quant.rotation import R1_KINDS, check_rotatable, rotate_model

log = logging.getLogger("compress")


@dataclass
class RotateConfig(MethodConfig):
    r1: str = option("hadamard", "the residual rotation R1: hadamard (QuaRot's randomized Hadamard, signs from --seed; "
                                 "widths 2^k or a Paley order times 2^k) or random (a random orthogonal matrix)",
                     choices=R1_KINDS)
    online: bool = option(True, "rotate the down-projection's input by an online Hadamard R4 at run time (--no-online: "
                                "R1 only, a model every export and tool can run)")
    r2: bool = option(False, "also rotate every attention head's values by a Hadamard R2 fused into v_proj and o_proj "
                             "(SpinQuant's R2; exact, no run-time cost)")


@register("rotate", family="quantization", summary="QuaRot/SpinQuant rotations: norm folding, Hadamard R1 fused, online R4 "
                                                   "before down_proj (a stage before a quantizer)",
          paper="Ashkboos et al. 2024, arXiv 2404.00456 (QuaRot); Liu et al. 2024, arXiv 2405.16406 (SpinQuant)")
class Rotate(Method):
    Config = RotateConfig
    needs = Needs()
    layerwise = False

    def describe(self) -> str:
        return f"r1 {self.config.r1}{' +r2' if self.config.r2 else ''}{' +r4' if self.config.online else ''}"

    def prepare(self, model, ctx) -> None:
        check_rotatable(model, self.config.r1, self.config.online, self.config.r2)

    def apply(self, model, ctx):
        self.report.update(rotate_model(model, r1=self.config.r1, online=self.config.online, seed=ctx.seed,
                                        r2=self.config.r2))
        log.info("rotate: R1 %s%s", self.report["r1"], f"; online R4 {self.report['online_r4']}" if self.config.online else "")
        return model
