"""Optimal-Brain-Surgeon column sweeps on the inverse Hessian, shared by GPTQ, OWQ and SparseGPT.

GPTQ (Frantar et al. 2022, arXiv 2210.17323, Algorithm 1): process input columns left to right; quantize column j,
spread its error over the columns not yet quantized through row j of the upper Cholesky factor of H^-1
(delta = -(w_j - q_j) / [H^-1]_jj * [H^-1]_j,j:), lazily in blocks of `block_size` columns.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .hessian import inverse_cholesky, prepare_hessian
from .quant_grid import SCALE_DTYPE, QuantizedWeight, QuantSpec, find_params


@dataclass
class SweepInfo:
    loss: float  # sum over rows and columns of (w - q)^2 / [H^-1]_jj^2 / 2, the OBS error GPTQ minimises greedily
    percdamp: float  # dampening used (after any retry)
    dead_columns: int


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, *, block_size: int = 128,
                  percdamp: float = 0.01, act_order: bool = False, static_groups: bool = False,
                  name: str = "") -> tuple[QuantizedWeight, SweepInfo]:
    """Quantize W [out, in] with GPTQ given H [in, in]. Returns integer codes on the grid and sweep facts."""
    W = weight.detach().float().clone()
    out_f, in_f = W.shape
    H, dead = prepare_hessian(hessian.to(W.device), W)
    gs = in_f if spec.group_size == -1 else spec.group_size
    n_groups = spec.groups(in_f)
    scales = torch.zeros(out_f, n_groups, device=W.device)
    zeros = torch.zeros(out_f, n_groups, device=W.device)

    if static_groups or not act_order:
        # group grids fixed in natural column order (static: from the original weights, up front)
        if static_groups:
            for g in range(n_groups):
                scales[:, g], zeros[:, g] = find_params(W[:, g * gs:(g + 1) * gs], spec)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else None
    if perm is not None:
        W = W[:, perm]
        H = H[perm][:, perm]
    inv = inverse_cholesky(H, percdamp, dead=dead, name=name)
    Hinv = inv.upper
    del H

    natural_group = (torch.arange(in_f, device=W.device) // gs)
    col_group = natural_group[perm] if perm is not None else natural_group  # natural group of the j-th swept column
    Q = torch.zeros_like(W)
    losses = torch.zeros(out_f, device=W.device)
    s_cur = z_cur = None
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            w = W1[:, i]
            d = Hinv1[i, i]
            if static_groups:
                g = int(col_group[col])
                s_cur, z_cur = scales[:, g], zeros[:, g]
            elif col % gs == 0:
                # a new group starts here (in sweep order): its grid from the current, error-updated weights
                cur = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :gs]
                s_cur, z_cur = find_params(cur, spec)
                g = col // gs
                scales[:, g], zeros[:, g] = s_cur, z_cur
            q = torch.clamp(torch.round(w / s_cur) + z_cur, 0, spec.maxq)
            wq = s_cur * (q - z_cur)
            Q1[:, i] = q
            err = (w - wq) / d
            losses += (w - wq) ** 2 / d**2 / 2
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if perm is not None:
        invperm = torch.argsort(perm)
        Q = Q[:, invperm]
        # groups were formed along the sweep order (unless static): column perm[j] belongs to group j // gs
        g_idx = col_group[invperm] if static_groups else (torch.arange(in_f, device=W.device) // gs)[invperm]
    else:
        g_idx = natural_group
    qw = QuantizedWeight(Q.to(torch.uint8), scales.to(SCALE_DTYPE), zeros.to(torch.uint8), g_idx.to(torch.int32), spec)
    return qw, SweepInfo(float(losses.sum()), inv.percdamp, int(dead.sum()))
