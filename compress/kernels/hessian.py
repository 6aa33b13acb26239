"""The layer Hessian H = 2 X^T X and its damped inverse in Cholesky form, shared by GPTQ, OWQ and SparseGPT.

GPTQ (Frantar et al. 2022, arXiv 2210.17323, Sec. 3 "Cholesky reformulation"): the row-removal updates of
H^-1 are exactly the rows of the upper Cholesky factor U of H^-1 (H^-1 = U^T U), computed once after dampening
H with lambda = percdamp * mean(diag H). Dead inputs (zero diagonal: a channel never active in calibration) get
H_jj = 1 and zero weight, as the reference code does.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger("compress")


class HessianSource:
    """Something holding a layer's Hessian in `.hessian` (the engine's per-linear statistics). Handed to the sweep
    instead of the tensor, with `last_use` set by the caller when no later layer reads it: the sweep then takes the
    tensor out (`.hessian` becomes None) and frees it as soon as it has its inverse, so a down projection's sweep
    holds one [in, in] float32 matrix instead of two (what a streamed GPTQ run's peak is made of)."""

    hessian: torch.Tensor | None = None
    last_use: bool = False


def take_hessian(source: "torch.Tensor | HessianSource") -> torch.Tensor:
    """The Hessian tensor of `source`; a HessianSource marked last_use gives it up (its `.hessian` becomes None)."""
    if isinstance(source, torch.Tensor):
        return source
    H = source.hessian
    if H is None:
        raise ValueError("this layer's Hessian was already handed to a sweep (last_use) and freed")
    if source.last_use:
        source.hessian = None
    return H


@dataclass
class InverseHessian:
    upper: torch.Tensor  # U, upper Cholesky factor of (H + lambda I)^-1, [in, in] float32
    dead: torch.Tensor  # bool [in]: columns with zero Hessian diagonal
    percdamp: float  # dampening actually used (after retries)


def dead_columns(H: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """bool [in]: the columns with zero Hessian diagonal; zeroes those columns of `weight` in place. H is not
    touched: inverse_cholesky gives them H_jj = 1 in its own buffer."""
    dead = torch.diag(H) == 0
    if weight is not None:
        weight[:, dead] = 0
    return dead


def inverse_cholesky(H: torch.Tensor, percdamp: float = 0.01, *, dead: torch.Tensor | None = None,
                     max_tries: int = 6, name: str = "") -> InverseHessian:
    """Upper Cholesky factor of (H' + damp I)^-1, H' = H with H_jj = 1 on the `dead` columns; H is only read. If H is not positive definite after dampening, retry with ten times
    more dampening (with a warning) rather than ever return NaN."""
    n = H.shape[0]
    diag = torch.diag(H).clone()
    if dead is not None:
        diag[dead] = 1.0  # dead columns count as H_jj = 1 (below, in the work buffer too)
    mean_diag = torch.mean(diag).item()
    if not (mean_diag > 0) or not all_finite(H):
        raise ValueError(f"{name or 'layer'}: Hessian is empty or not finite (mean diagonal {mean_diag})")
    damp_frac = percdamp
    # One [n, n] buffer beside H and nothing else: LAPACK works on column-major matrices, and torch copies a
    # row-major argument into a column-major temporary (a third [n, n] matrix) at each of the three steps; the
    # buffer's transposed view is column-major, so every step runs in place on exactly the data torch's own copy
    # would hold (same bits). For a down projection of width 11008 each such matrix is 0.5 GB: a streamed run's peak.
    buf = torch.empty_like(H)
    work = buf.mT  # column-major [n, n]
    info = torch.empty((), dtype=torch.int32, device=H.device)
    for attempt in range(max_tries):
        work.copy_(H)
        if dead is not None:
            work.diagonal()[dead] = 1.0
        work.diagonal().add_(damp_frac * mean_diag)  # the same sums as H + damp * I
        torch.linalg.cholesky_ex(work, out=(work, info))  # L
        if info.item() == 0:
            torch.cholesky_inverse(work, out=work)  # (H + damp I)^-1
            torch.linalg.cholesky_ex(work, upper=True, out=(work, info))  # U
            if info.item() == 0 and all_finite(buf):
                if attempt:
                    log.warning("%s: Hessian not positive definite at dampening %.3g; used %.3g", name or "layer", percdamp, damp_frac)
                transpose_inplace(buf)  # row-major U, for the sweep's row slices
                return InverseHessian(buf, dead if dead is not None else torch.zeros(n, dtype=torch.bool, device=H.device), damp_frac)
        damp_frac *= 10
    raise ValueError(f"{name or 'layer'}: Hessian stays singular even at dampening {damp_frac / 10:.3g}")


def transpose_inplace(a: torch.Tensor, block: int = 512) -> None:
    """a <- a^T for a square matrix, in place, through one block-sized temporary at a time."""
    n = a.shape[0]
    for i in range(0, n, block):
        d = a[i:i + block, i:i + block]
        d.copy_(d.t().clone())
        for j in range(i + block, n, block):
            upper = a[i:i + block, j:j + block].clone()
            a[i:i + block, j:j + block].copy_(a[j:j + block, i:i + block].t())
            a[j:j + block, i:i + block].copy_(upper.t())


def all_finite(a: torch.Tensor, rows: int = 256) -> bool:
    """torch.isfinite(a).all() a block of rows at a time: isfinite works through float and bool copies of its
    argument, which for a [n, n] Hessian would be the largest allocation of the sweep."""
    return all(bool(torch.isfinite(a[i:i + rows]).all()) for i in range(0, a.shape[0], rows))
