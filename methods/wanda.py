"""Wanda (Sun et al. 2023, arXiv 2306.11695): pruning by weights and activations, no weight update.

Per linear layer: the score of weight (i, j) is |W_ij| * ||X_j||_2 (Eq. 1), with ||X_j||_2 the norm of input channel
j over every calibration token (the engine's `input_norms` statistic); the weights of lowest score are removed within
each output row (Sec. 3, the per-output comparison group), or, for N:M (--pattern 2:4), within every M consecutive
input weights of a row. Statistics of all linears of a block come from one pass, as in the paper's code.
"""
from __future__ import annotations

from dataclasses import dataclass

from compress.kernels.masks import keep_mask, wanda_scores
from compress.layers.weights import linear_weight
from compress.pipeline.method import Needs, register
from compress.sparse.pruning import PruneConfig, PruningMethod


@dataclass
class WandaConfig(PruneConfig):
    pass


@register("wanda", family="pruning", summary="Wanda: remove the lowest |W|·||X|| of each output row, no weight update; "
          "unstructured or N:M", paper="Sun et al. 2023, arXiv 2306.11695")
class Wanda(PruningMethod):
    Config = WandaConfig
    needs = Needs(calibration=True, stats=("input_norms",))
    layerwise = True
    handles_experts = True

    def compress_linear(self, name, linear, stats):
        c = self.config
        weight = linear_weight(linear)
        keep = keep_mask(wanda_scores(weight, stats.input_norms), c.target, c.nm(), scope="row")
        return self.sparse_layer(name, linear, weight, keep)
