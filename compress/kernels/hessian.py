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


@dataclass
class InverseHessian:
    upper: torch.Tensor  # U, upper Cholesky factor of (H + lambda I)^-1, [in, in] float32
    dead: torch.Tensor  # bool [in]: columns with zero Hessian diagonal
    percdamp: float  # dampening actually used (after retries)


def prepare_hessian(hessian: torch.Tensor, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy of H with dead columns fixed (H_jj = 1); zeroes those columns of `weight` in place. Returns (H, dead)."""
    H = hessian.clone().float()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    if weight is not None:
        weight[:, dead] = 0
    return H, dead


def inverse_cholesky(H: torch.Tensor, percdamp: float = 0.01, *, dead: torch.Tensor | None = None,
                     max_tries: int = 6, name: str = "") -> InverseHessian:
    """Upper Cholesky factor of (H + damp I)^-1. If H is not positive definite after dampening, retry with ten times
    more dampening (with a warning) rather than ever return NaN."""
    n = H.shape[0]
    mean_diag = torch.mean(torch.diag(H)).item()
    if not (mean_diag > 0) or not torch.isfinite(H).all():
        raise ValueError(f"{name or 'layer'}: Hessian is empty or not finite (mean diagonal {mean_diag})")
    damp_frac = percdamp
    # One [n, n] buffer beside H, each step written over the last (the factorisations give the same bits in place):
    # for a down projection of width 11008 every such matrix is 0.5 GB, what a streamed run's peak is made of.
    work = torch.empty_like(H)
    info = torch.empty((), dtype=torch.int32, device=H.device)
    for attempt in range(max_tries):
        work.copy_(H)
        work.diagonal().add_(damp_frac * mean_diag)  # the same sums as H + damp * I
        torch.linalg.cholesky_ex(work, out=(work, info))  # L
        if info.item() == 0:
            torch.cholesky_inverse(work, out=work)  # (H + damp I)^-1
            torch.linalg.cholesky_ex(work, upper=True, out=(work, info))  # U
            if info.item() == 0 and torch.isfinite(work).all():
                if attempt:
                    log.warning("%s: Hessian not positive definite at dampening %.3g; used %.3g", name or "layer", percdamp, damp_frac)
                return InverseHessian(work, dead if dead is not None else torch.zeros(n, dtype=torch.bool, device=H.device), damp_frac)
        damp_frac *= 10
    raise ValueError(f"{name or 'layer'}: Hessian stays singular even at dampening {damp_frac / 10:.3g}")
