"""Pruning masks shared by every pruning method (magnitude, Wanda, SparseGPT, OWL, ...), and their common options.

A mask is a bool tensor shaped like the weight, True where the weight is kept. Comparison groups:
* `row`: within each output row (Wanda's group, arXiv 2306.11695 Sec. 3): every row loses the same number of weights;
* `layer`: across the whole weight matrix (classic magnitude pruning);
* N:M (`--pattern 2:4`): keep the N largest of every M consecutive weights along the input dimension of each row
  (a last partial group, where the width is not a multiple of M, keeps its min(N, width) largest).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from compress.core.config import MethodConfig, option, parse_nm
from compress.core.errors import ConfigError
from compress.kernels.masks import MAX_SPARSITY, UNSTRUCTURED
from compress.layers.sparse_linear import SparseLinear
from compress.pipeline.method import Method

log = logging.getLogger("compress")

# ---------------------------------------------------------------------------------------------------------------
# Options shared by every pruning method (--sparsity, --pattern)
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class PruneConfig(MethodConfig):
    sparsity: float | None = option(None, "fraction of each layer's weights to remove (default 0.5; with --pattern N:M it "
                                          "is 1 - N/M)", range=(0.0, MAX_SPARSITY))
    pattern: str = option(UNSTRUCTURED, "sparsity pattern: unstructured, or N:M (keep N of every M consecutive input "
                                        "weights of each row, e.g. 2:4, 4:8)")

    def check(self) -> None:
        nm = self.nm()
        if nm is not None and self.sparsity is not None and abs(self.sparsity - (1 - nm[0] / nm[1])) > 1e-9:
            raise ConfigError(f"--sparsity {self.sparsity!r} conflicts with --pattern {self.pattern}, which removes "
                              f"{1 - nm[0] / nm[1]:g} of the weights; give only one of them")

    def nm(self) -> tuple[int, int] | None:
        if self.pattern.strip().lower() == UNSTRUCTURED:
            return None
        if ":" not in self.pattern:
            raise ConfigError(f"--pattern {self.pattern!r} is not allowed; use unstructured or N:M such as 2:4 or 4:8")
        return parse_nm(self.pattern, "pattern")

    @property
    def target(self) -> float:
        """The fraction of weights removed."""
        nm = self.nm()
        if nm is not None:
            return 1 - nm[0] / nm[1]
        return 0.5 if self.sparsity is None else self.sparsity

    @property
    def structure(self) -> str:
        nm = self.nm()
        return f"{nm[0]}:{nm[1]}" if nm else UNSTRUCTURED

    def label(self) -> str:
        return self.structure if self.nm() else f"{self.target:g} unstructured"


# ---------------------------------------------------------------------------------------------------------------
# What every pruning method does with a mask
# ---------------------------------------------------------------------------------------------------------------
class PruningMethod(Method):
    """Base of layer-wise pruning methods: turns (weight, keep mask) into a SparseLinear and reports sparsities."""

    def describe(self) -> str:
        return self.config.label()

    def sparse_layer(self, name: str, linear: nn.Module, weight: torch.Tensor, keep: torch.Tensor,
                     structure: str | None = None, **facts: Any) -> nn.Module:
        mod = SparseLinear.from_dense(weight, keep, getattr(linear, "bias", None), structure=structure or self.config.structure)
        self.record_layer(name, keep, **facts)
        return mod

    unrouted_fallback = "magnitude pruning within each output row (the score with equal input norms)"

    def compress_unrouted(self, name: str, linear: nn.Module) -> nn.Module:
        from compress.kernels.masks import keep_mask
        from compress.layers.weights import linear_weight

        weight = linear_weight(linear)
        keep = keep_mask(weight.detach().float().abs(), self.config.target, self.config.nm(), scope="row")
        return self.sparse_layer(name, linear, weight, keep, fallback="magnitude (no calibration token)")

    def record_layer(self, name: str, keep: torch.Tensor, **facts: Any) -> None:
        layers = self.report.setdefault("layers", {})
        layers[name] = {"sparsity": round(1 - keep.float().mean().item(), 6), **facts}
        self._counts = getattr(self, "_counts", (0, 0))
        self._counts = (self._counts[0] + int((~keep).sum()), self._counts[1] + keep.numel())

    def finalize(self, model: nn.Module, ctx: Any) -> nn.Module:
        removed, total = getattr(self, "_counts", (0, 0))
        if total:
            self.report["sparsity"] = round(removed / total, 6)
            log.info("%s: %d of %d weights of %d layers removed (sparsity %.4f)", self.name, removed, total,
                     len(self.report.get("layers", {})), removed / total)
        return model
