"""Pruning masks: bool tensors shaped like the weight, True where the weight is kept.

Comparison groups:
* `row`: within each output row (Wanda's group, arXiv 2306.11695 Sec. 3): every row loses the same number of weights;
* `layer`: across the whole weight matrix (classic magnitude pruning);
* N:M (`--pattern 2:4`): keep the N largest of every M consecutive weights along the input dimension of each row
  (a last partial group, where the width is not a multiple of M, keeps its min(N, width) largest).
"""
from __future__ import annotations

import torch

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
