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

from .config import MethodConfig, option, parse_nm
from .errors import ConfigError
from .registry import Method

log = logging.getLogger("compress")

UNSTRUCTURED = "unstructured"
MAX_SPARSITY = 0.99  # the largest --sparsity of any layer: no layer is removed whole


def n_pruned(count: int, sparsity: float) -> int:
    """Weights to remove out of `count` (Wanda's and SparseGPT's rounding: int(count * sparsity))."""
    return int(count * sparsity + 1e-9)


def row_keep_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep mask removing the int(in * sparsity) lowest scores of every row of `scores` [out, in]."""
    out_f, in_f = scores.shape
    k = n_pruned(in_f, sparsity)
    keep = torch.ones(out_f, in_f, dtype=torch.bool, device=scores.device)
    if k:
        # stable sort: among equal scores the earlier column is removed first, deterministically
        idx = torch.sort(scores, dim=1, stable=True).indices[:, :k]
        keep.scatter_(1, idx, False)
    return keep


def layer_keep_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep mask removing the int(numel * sparsity) lowest scores of the whole matrix."""
    k = n_pruned(scores.numel(), sparsity)
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if k:
        keep[torch.sort(scores.flatten(), stable=True).indices[:k]] = False
    return keep.view_as(scores)


def nm_keep_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep mask with the N largest scores of every M consecutive columns of each row of `scores` [out, in]."""
    out_f, in_f = scores.shape
    pad = (-in_f) % m
    s = scores.float()
    if pad:  # padding never wins: a last partial group keeps its min(N, width) largest
        s = torch.nn.functional.pad(s, (0, pad), value=float("-inf"))
    groups = s.view(out_f, -1, m)
    idx = torch.topk(groups, n, dim=2).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True)
    return keep.view(out_f, -1)[:, :in_f]


def keep_mask(scores: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None, scope: str = "row") -> torch.Tensor:
    """The keep mask of a score matrix: N:M if `nm`, else per `scope` ('row' or 'layer') at `sparsity`."""
    if nm is not None:
        return nm_keep_mask(scores, *nm)
    if scope == "row":
        return row_keep_mask(scores, sparsity)
    if scope == "layer":
        return layer_keep_mask(scores, sparsity)
    raise ValueError(f"scope {scope!r}: use row or layer")


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """Wanda's importance S_ij = |W_ij| * ||X_j||_2 (arXiv 2306.11695, Eq. 1), float32 [out, in]."""
    return weight.detach().float().abs() * input_norms.to(weight.device).float().unsqueeze(0)


def is_nm(keep: torch.Tensor, n: int, m: int) -> bool:
    """True if every full group of M consecutive inputs of every row keeps at most N weights."""
    out_f, in_f = keep.shape
    full = in_f - in_f % m
    return bool((keep[:, :full].reshape(out_f, -1, m).sum(dim=2) <= n).all())


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
        from .sparse_linear import SparseLinear

        mod = SparseLinear.from_dense(weight, keep, getattr(linear, "bias", None), structure=structure or self.config.structure)
        self.record_layer(name, keep, **facts)
        return mod

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
