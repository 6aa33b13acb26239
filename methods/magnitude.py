"""Magnitude pruning: the baseline every pruning method is measured against.

Remove the weights of smallest |W_ij| (Han et al. 2015, arXiv 1506.02626; the LLM baseline of Wanda and SparseGPT),
compared across the whole layer (the baselines' choice) or within each output row; or keep the N largest of every M
consecutive input weights (--pattern 2:4). No calibration data, no weight update.
"""
from __future__ import annotations

from dataclasses import dataclass

from compress.core.config import option
from compress.kernels.masks import keep_mask
from compress.layers.weights import linear_weight
from compress.pipeline.method import Needs, register
from compress.sparse.pruning import PruneConfig, PruningMethod


@dataclass
class MagnitudeConfig(PruneConfig):
    scope: str = option("layer", "comparison group of unstructured pruning: layer (the whole weight matrix) or row "
                                 "(each output row loses the same share)", choices=("layer", "row"))


@register("magnitude", family="pruning", summary="Magnitude pruning: remove the smallest |W|, per layer or per output row, "
          "unstructured or N:M (baseline)", paper="Han et al. 2015, arXiv 1506.02626 (baseline)")
class Magnitude(PruningMethod):
    Config = MagnitudeConfig
    needs = Needs()
    layerwise = True
    handles_experts = True  # data-free: each expert matrix like any linear

    def describe(self) -> str:
        c = self.config
        return c.label() + ("" if c.nm() else f" per {c.scope}")

    def compress_linear(self, name, linear, stats):
        c = self.config
        weight = linear_weight(linear)
        keep = keep_mask(weight.detach().float().abs(), c.target, c.nm(), c.scope)
        return self.sparse_layer(name, linear, weight, keep)
