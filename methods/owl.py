"""OWL (Yin et al. 2023, arXiv 2310.05175): outlier-weighted layer-wise sparsity, then Wanda (or SparseGPT) per layer.

Before pruning, one observing pass over the dense model (the engine's `observe`, each block fed the dense outputs
of the one before) measures each decoder layer's outlier ratio D_l: the share of its Wanda scores |W_ij|·||X_j||_2
(all linears of the layer together) above M times their mean (Sec. 4, "layerwise outlier distribution", M = 5).
Layers with more outliers are pruned less: the ratios are mapped linearly to sparsities spread over a band of
width 2·lambda, as the code behind the paper's numbers does (luuyin/OWL lib/prune.py: 1 - S_l = (D_l - D_min) /
(D_max - D_min) · 2·lambda, re-centred so that the mean of S_l is S): `--mapping reference`, the default. The spread
is always 2·lambda, so one outlier-heavy layer can sit up to 2·lambda from S. `--mapping bounded` also shrinks the
deviations towards S where needed so that every S_l stays within [S - lambda, S + lambda] (the wording of Sec. 4),
which narrows the spread on skewed ratios. Each layer is then pruned by Wanda (per output row) or SparseGPT at its
own sparsity.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from compress.core.config import option
from compress.core.errors import ConfigError
from compress.kernels.masks import MAX_SPARSITY, keep_mask, wanda_scores
from compress.kernels.obs import PruneRule, sparsegpt_prune
from compress.layers.weights import linear_weight
from compress.pipeline.method import Needs, register
from compress.sparse.pruning import PruneConfig, PruningMethod

log = logging.getLogger("compress")


@dataclass
class OWLConfig(PruneConfig):
    outlier_m: float = option(5.0, "M: a Wanda score is an outlier when it exceeds M times its layer's mean score",
                              range=(1.0, None))
    lam: float = option(0.08, "lambda: the layer sparsities stay within target ± lambda (their mean is the target)",
                        range=(0.0, 0.5))
    mapping: str = option("reference", "outlier ratios to layer sparsities: reference (the authors' code, spread "
                                        "2·lambda) or bounded (also shrunk so every layer stays within ±lambda)",
                          choices=("reference", "bounded"))
    base: str = option("wanda", "pruner applied to each layer at its sparsity", choices=("wanda", "sparsegpt"))
    damp: float = option(0.01, "SparseGPT's dampening, fraction of the mean Hessian diagonal added to it (owl: with "
                               "--base sparsegpt)", range=(0.0, 10.0))
    block_size: int = option(128, "SparseGPT's columns per lazy-update and mask-selection block (owl: with --base "
                                  "sparsegpt)", range=(1, None))

    def check(self) -> None:
        super().check()
        if self.nm() is not None:
            raise ConfigError(f"--pattern {self.pattern} is not allowed for owl: its layer sparsities are unstructured")
        top = round(min(self.target, MAX_SPARSITY - self.target), 6)
        if self.lam > top:
            raise ConfigError(f"--lam {self.lam!r} is out of range for --sparsity {self.target:g}; allowed: 0..{top:g} "
                              f"(every layer sparsity must stay in 0..{MAX_SPARSITY:g})")


def outlier_ratio(scores: torch.Tensor, m: float) -> float:
    """D_l: the share of scores above m times their mean (OWL Sec. 4)."""
    return float((scores > m * scores.mean()).float().mean())


def layer_sparsities(ratios: list[float], target: float, lam: float, mapping: str = "reference") -> list[float]:
    """OWL's per-layer sparsities from outlier ratios: more outliers, lower sparsity; mean = target; spread 2·lam
    (reference), or with every |S_l - target| <= lam as well (bounded)."""
    d = torch.tensor(ratios, dtype=torch.float64)
    span = float(d.max() - d.min())
    dev = (d - d.min()) / span * (2 * lam) if span > 0 else torch.zeros_like(d)  # OWL lib/prune.py
    dev = dev - dev.mean()  # kept share 1 - S_l = (1 - S) + dev
    if mapping == "bounded" and float(dev.abs().max()) > lam:  # scaling keeps the order and the mean
        dev = dev * (lam / float(dev.abs().max()))
    out = [target - float(x) for x in dev]
    worst = min(range(len(out)), key=lambda i: min(out[i], MAX_SPARSITY - out[i])) if out else 0
    if out and not (0.0 <= out[worst] <= MAX_SPARSITY):
        raise ConfigError(f"OWL layer {worst} would get sparsity {out[worst]:.4f}, outside 0..{MAX_SPARSITY:g} "
                          f"(--lam {lam:g} around --sparsity {target:g}, --mapping {mapping}); lower --lam or use "
                          "--mapping bounded")
    return out


@register("owl", family="pruning", summary="OWL: per-layer sparsities from outlier ratios of Wanda scores, then Wanda "
          "or SparseGPT per layer", paper="Yin et al. 2023, arXiv 2310.05175")
class OWL(PruningMethod):
    Config = OWLConfig
    needs = Needs(calibration=True, stats=("input_norms", "hessian"))
    layerwise = True

    def __init__(self, config=None):
        super().__init__(config)
        self.sparsities: list[float] = []
        self._current = 0.0

    def describe(self) -> str:
        c = self.config
        return f"{c.target:g} owl M{c.outlier_m:g} lambda {c.lam:g} {c.base}" + ("" if c.mapping == "reference" else " bounded")

    def stats_needed(self) -> tuple[str, ...]:
        return ("hessian",) if self.config.base == "sparsegpt" else ("input_norms",)

    def prepare(self, model, ctx) -> None:
        """The whole-model outlier scan: one observing pass with the dense model's own activations."""
        ratios: list[float] = []

        def scan(block) -> None:
            names = block.targets()
            stats = block.collect(names, ("input_norms",))
            scores = torch.cat([wanda_scores(linear_weight(block.get(n)), stats[n].input_norms).flatten() for n in names])
            ratios.append(outlier_ratio(scores, self.config.outlier_m))

        ctx.engine(model).observe(scan, desc="owl outlier scan")
        c = self.config
        self.sparsities = layer_sparsities(ratios, c.target, c.lam, c.mapping)
        rows = "\n".join(f"  layer {i:3d}: outliers {100 * r:6.3f}%  sparsity {s:.4f}" for i, (r, s) in enumerate(zip(ratios, self.sparsities)))
        log.info("OWL layer sparsities (M=%g, lambda=%g, %s mapping, mean %.4f):\n%s", c.outlier_m, c.lam, c.mapping,
                 sum(self.sparsities) / len(self.sparsities), rows)
        self.report["outlier_ratios"] = [round(r, 6) for r in ratios]
        self.report["layer_sparsities"] = [round(s, 6) for s in self.sparsities]
        self.report["mapping"] = c.mapping

    def compress_block(self, block) -> None:
        self._current = self.sparsities[block.index]
        super().compress_block(block)

    def compress_linear(self, name, linear, stats):
        c = self.config
        weight = linear_weight(linear)
        if c.base == "sparsegpt":
            res = sparsegpt_prune(weight, stats.hessian, PruneRule(self._current), block_size=c.block_size,
                                  percdamp=c.damp, name=name)
            return self.sparse_layer(name, linear, res.weight.to(weight.dtype), res.keep)
        keep = keep_mask(wanda_scores(weight, stats.input_norms), self._current, scope="row")
        return self.sparse_layer(name, linear, weight, keep)
