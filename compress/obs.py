"""Optimal-Brain-Surgeon column sweeps on the inverse Hessian, shared by GPTQ, OWQ and SparseGPT.

GPTQ (Frantar et al. 2022, arXiv 2210.17323, Algorithm 1): process input columns left to right; quantize column j,
spread its error over the columns not yet quantized through row j of the upper Cholesky factor of H^-1
(delta = -(w_j - q_j) / [H^-1]_jj * [H^-1]_j,j:), lazily in blocks of `block_size` columns.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .hessian import inverse_cholesky, prepare_hessian
from .quant_grid import SCALE_DTYPE, QuantizedWeight, QuantSpec, find_params


@contextlib.contextmanager
def single_thread():
    """Run a column sweep on one thread (usable as a decorator): its operations are vectors, thin rank-1 updates and
    one small Cholesky factorization, for which threads cost more than they save; on a busy machine a second thread
    slows them down 5-40x."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@dataclass
class SweepInfo:
    loss: float  # sum over rows and columns of (w - q)^2 / [H^-1]_jj^2 / 2, the OBS error GPTQ minimises greedily
    percdamp: float  # dampening used (after any retry)
    dead_columns: int
    kept: torch.Tensor | None = None  # [out, k] float32: the columns left in float (keep_float), after error feedback


@single_thread()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, *, block_size: int = 128,
                  percdamp: float = 0.01, act_order: bool = False, static_groups: bool = False,
                  name: str = "", keep_float: torch.Tensor | None = None) -> tuple[QuantizedWeight, SweepInfo]:
    """Quantize W [out, in] with GPTQ given H [in, in]. Returns integer codes on the grid and sweep facts.

    keep_float: indices of input columns to leave in float (OWQ's weak columns, arXiv 2306.02272 Sec. 3.2). They are
    swept last and never quantized, so they absorb the error feedback of every quantized column; the codes (and the
    groups) then cover the other columns only, in their natural order, and the updated float columns come back in
    SweepInfo.kept (in the order of sorted keep_float).
    """
    W = weight.detach().float().clone()
    out_f, in_f = W.shape
    H, dead = prepare_hessian(hessian.to(W.device), W)
    kept_idx = None
    if keep_float is not None and keep_float.numel():
        kept_idx = torch.unique(keep_float.to(device=W.device, dtype=torch.long))  # sorted, distinct
        quantized_mask = torch.ones(in_f, dtype=torch.bool, device=W.device)
        quantized_mask[kept_idx] = False
        order = torch.cat([torch.nonzero(quantized_mask).flatten(), kept_idx])  # quantized columns first, kept last
        W, H = W[:, order], H[order][:, order]
    n_q = in_f - (kept_idx.numel() if kept_idx is not None else 0)  # columns that get codes
    gs = n_q if spec.group_size == -1 else spec.group_size
    n_groups = spec.groups(n_q)
    scales = torch.zeros(out_f, n_groups, device=W.device)
    zeros = torch.zeros(out_f, n_groups, device=W.device)

    if static_groups:
        # group grids fixed up front from the original weights, in natural column order
        for g in range(n_groups):
            scales[:, g], zeros[:, g] = find_params(W[:, g * gs:min((g + 1) * gs, n_q)], spec)
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H)[:n_q], descending=True)
        if n_q < in_f:
            perm = torch.cat([perm, torch.arange(n_q, in_f, device=W.device)])
        W = W[:, perm]
        H = H[perm][:, perm]
    inv = inverse_cholesky(H, percdamp, dead=dead, name=name)
    Hinv = inv.upper
    del H

    natural_group = (torch.arange(n_q, device=W.device) // gs)
    col_group = natural_group[perm[:n_q]] if perm is not None else natural_group  # natural group of the j-th swept column
    Q = torch.zeros(out_f, n_q, device=W.device)
    losses = torch.zeros(out_f, device=W.device)
    s_cur = z_cur = None
    for i1 in range(0, n_q, block_size):
        i2 = min(i1 + block_size, n_q)
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
                cur = W1[:, i:i + gs]
                if cur.shape[1] < gs and i2 < n_q:
                    cur = torch.cat([cur, W[:, i2:min(i2 + gs - cur.shape[1], n_q)]], dim=1)
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
        invperm = torch.argsort(perm[:n_q])
        Q = Q[:, invperm]
        # groups were formed along the sweep order (unless static): column perm[j] belongs to group j // gs
        g_idx = col_group[invperm] if static_groups else (torch.arange(n_q, device=W.device) // gs)[invperm]
    else:
        g_idx = natural_group
    kept = W[:, n_q:].clone() if n_q < in_f else None
    qw = QuantizedWeight(Q.to(torch.uint8), scales.to(SCALE_DTYPE), zeros.to(torch.uint8), g_idx.to(torch.int32), spec)
    return qw, SweepInfo(float(losses.sum()), inv.percdamp, int(dead.sum()), kept)


# ---------------------------------------------------------------------------------------------------------------
# Options of the GPTQ sweep, shared by every method built on it (GPTQ, OWQ)
# ---------------------------------------------------------------------------------------------------------------
from dataclasses import dataclass as _dataclass  # noqa: E402

from .config import option  # noqa: E402
from .quant_grid import WeightQuantConfig  # noqa: E402


@_dataclass
class GPTQSweepConfig(WeightQuantConfig):
    damp: float = option(0.01, "dampening: fraction of the mean Hessian diagonal added to it", range=(0.0, 10.0))
    block_size: int = option(128, "lazy-batch block size: columns whose updates are applied together", range=(1, None))
    act_order: bool = option(True, "quantize columns in order of decreasing Hessian diagonal (desc_act)")
    static_groups: bool = option(True, "group grids fixed up front from the original weights in natural order (with "
                                       "--act-order no group index is stored: llm-compressor's actorder 'static'); "
                                       "--no-static-groups: each group's grid from the error-updated weights as the "
                                       "sweep reaches it (with --act-order: groups in sweep order plus a group index)")
    true_sequential: bool = option(False, "inside each block quantize q/k/v, then o, then gate/up, then down, each seeing "
                                          "the already-quantized outputs before it (one more calibration pass per group)")
