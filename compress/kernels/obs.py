"""Optimal-Brain-Surgeon column sweeps on the inverse Hessian, shared by GPTQ, OWQ and SparseGPT.

GPTQ (Frantar et al. 2022, arXiv 2210.17323, Algorithm 1): process input columns left to right; quantize column j,
spread its error over the columns not yet quantized through row j of the upper Cholesky factor of H^-1
(delta = -(w_j - q_j) / [H^-1]_jj * [H^-1]_j,j:), lazily in blocks of `block_size` columns.

SparseGPT (Frantar & Alistarh 2023, arXiv 2301.00774, Algorithm 1) is the same sweep where the "rounding" of a column
sets its pruned weights to zero (and, jointly, quantizes the kept ones): the mask is chosen adaptively, at the start
of every block of `block_size` columns (unstructured: the smallest w_c^2 / [H^-1]_cc^2 of the block) or of every M
columns (N:M: the M-N smallest per row), from the weights as already updated by the error feedback. A fixed mask
(GPTQ after Wanda) is the same sweep with the mask given up front, so that error feedback never refills pruned weights.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from compress.core.config import option
from compress.kernels.hessian import HessianSource, dead_columns, inverse_cholesky, take_hessian
from compress.kernels.masks import n_pruned, nm_keep_mask
from compress.kernels.quant_grid import SCALE_DTYPE, QuantizedWeight, QuantSpec, WeightQuantConfig, find_params


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


@dataclass(frozen=True)
class PruneRule:
    """SparseGPT's adaptive mask selection: remove `sparsity` of each block of columns, or keep N of every M inputs."""

    sparsity: float = 0.5
    nm: tuple[int, int] | None = None  # (N kept, M) along the input dimension


@dataclass
class SweepResult:
    weight: torch.Tensor | None  # W_hat [out, in] float32, natural column order (pruned weights exactly 0); None
    # when the caller keeps only the codes (dequantize=False)
    keep: torch.Tensor | None  # bool [out, in]: weights kept (None: no mask involved)
    quantized: QuantizedWeight | None  # integer codes on the grid (None: no quantization)
    info: SweepInfo


@single_thread()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor | HessianSource, spec: QuantSpec, *, block_size: int = 128,
                  percdamp: float = 0.01, act_order: bool = False, static_groups: bool = False,
                  mask: torch.Tensor | None = None, keep_float: torch.Tensor | None = None,
                  name: str = "") -> tuple[QuantizedWeight, SweepInfo]:
    """Quantize W [out, in] with GPTQ given H [in, in]. Returns integer codes on the grid and sweep facts.

    mask (bool [out, in], True = kept) fixes a sparsity pattern: masked weights get the zero point's code (exactly
    0) and error feedback never refills them (SparseGPT's sweep with a given mask, arXiv 2301.00774 Sec. 3).
    keep_float: indices of input columns to leave in float (OWQ's weak columns, arXiv 2306.02272 Sec. 3.2). They are
    swept last and never quantized, so they absorb the error feedback of every quantized column; the codes (and the
    groups) then cover the other columns only, in their natural order, and the updated float columns come back in
    SweepInfo.kept (in the order of sorted keep_float).
    """
    res = obs_sweep(weight, hessian, spec, block_size=block_size, percdamp=percdamp, act_order=act_order,
                    static_groups=static_groups, keep=mask, keep_float=keep_float, name=name, dequantize=False)
    return res.quantized, res.info


@single_thread()
def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor | HessianSource, rule: PruneRule, spec: QuantSpec | None = None, *,
                    block_size: int = 128, percdamp: float = 0.01, name: str = "") -> SweepResult:
    """SparseGPT (arXiv 2301.00774, Algorithm 1): prune W [out, in] (and quantize the kept weights with `spec`)."""
    return obs_sweep(weight, hessian, spec, block_size=block_size, percdamp=percdamp, prune=rule, name=name)


def _prune_block(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep mask of a block: remove the int(numel * sparsity) smallest scores of the whole block (SparseGPT's
    unstructured selection compares every row and column of the block together)."""
    k = n_pruned(scores.numel(), sparsity)
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if k:
        keep[torch.topk(scores.flatten(), k, largest=False, sorted=False).indices] = False
    return keep.view_as(scores)


def obs_sweep(weight: torch.Tensor, hessian: torch.Tensor | HessianSource, spec: QuantSpec | None, *, block_size: int = 128,
              percdamp: float = 0.01, act_order: bool = False, static_groups: bool = False,
              keep: torch.Tensor | None = None, prune: PruneRule | None = None, keep_float: torch.Tensor | None = None,
              name: str = "", dequantize: bool = True) -> SweepResult:
    """The one column sweep: quantize (spec) and/or prune (keep: fixed mask; prune: SparseGPT's adaptive mask);
    keep_float: input columns swept last and left in float (OWQ). With keep_float the returned weight and keep cover
    the quantized columns only (natural order), and SweepInfo.kept holds the float ones."""
    if prune is not None and act_order:
        raise ValueError("SparseGPT's mask selection runs in natural column order; act-order does not apply")
    if keep_float is not None and keep_float.numel() and (keep is not None or prune is not None or spec is None):
        raise ValueError("float columns (OWQ) combine with quantization only, not with a sparsity mask")
    W = weight.detach().to(torch.float32, copy=True)  # one float32 copy (`.float().clone()` made two of bf16)
    out_f, in_f = W.shape
    # H is read, never copied or written: the dead-column fix and the dampening go into inverse_cholesky's one work
    # buffer (a [in, in] float32 copy fewer at the sweep's peak, which is a streamed run's peak)
    H = take_hessian(hessian)
    del hessian  # a HessianSource marked last_use gave its tensor up: once H is dropped below, it is freed
    H = H.to(device=W.device, dtype=torch.float32)
    dead = dead_columns(H, W)
    diag = torch.diag(H).clone()
    diag[dead] = 1.0  # the diagonal of the fixed H (H_jj = 1 for a dead column)
    kept_idx = None
    if keep_float is not None and keep_float.numel():
        kept_idx = torch.unique(keep_float.to(device=W.device, dtype=torch.long))  # sorted, distinct
        quantized_mask = torch.ones(in_f, dtype=torch.bool, device=W.device)
        quantized_mask[kept_idx] = False
        order = torch.cat([torch.nonzero(quantized_mask).flatten(), kept_idx])  # quantized columns first, kept last
        W, H, diag, dead = W[:, order], H[order][:, order], diag[order], dead[order]
    n_q = in_f - (kept_idx.numel() if kept_idx is not None else 0)  # columns that get codes (or a mask)
    if keep is not None:
        keep = keep.to(W.device, torch.bool).clone()
        W[~keep] = 0
    elif prune is not None:
        keep = torch.ones_like(W, dtype=torch.bool)
    nm = prune.nm if prune is not None else None
    if nm is not None and block_size % nm[1]:
        raise ValueError(f"block size {block_size} must be a multiple of M={nm[1]} for N:M selection")
    gs = n_q if (spec is None or spec.group_size == -1) else spec.group_size
    n_groups = spec.groups(n_q) if spec is not None else 1
    scales = torch.zeros(out_f, n_groups, device=W.device)
    zeros = torch.zeros(out_f, n_groups, device=W.device)

    # act-mse observer: each column's error weighted by the inputs' mean x^2, i.e. H_jj / 2 (the imatrix weighting)
    hdiag = diag if spec is not None and spec.observer == "act-mse" else None
    if spec is not None and static_groups:
        # group grids fixed up front from the original weights, in natural column order
        for g in range(n_groups):
            cols = slice(g * gs, min((g + 1) * gs, n_q))
            scales[:, g], zeros[:, g] = find_params(W[:, cols], spec, None if hdiag is None else hdiag[cols])
    perm = None
    if act_order:
        perm = torch.argsort(diag[:n_q], descending=True)
        if n_q < in_f:
            perm = torch.cat([perm, torch.arange(n_q, in_f, device=W.device)])
        W = W[:, perm]
        H = H[perm]  # in two steps: one [in, in] copy alive beside H at a time, not two
        H = H[:, perm]
        dead = dead[perm]
        hdiag = hdiag[perm] if hdiag is not None else None
        keep = keep[:, perm] if keep is not None else None
    inv = inverse_cholesky(H, percdamp, dead=dead, name=name)
    Hinv = inv.upper
    del H

    natural_group = (torch.arange(n_q, device=W.device) // gs)
    col_group = natural_group[perm[:n_q]] if perm is not None else natural_group  # natural group of the j-th swept column
    # codes straight into uint8 (exact: 0..maxq <= 255); pruning alone keeps the float weights
    Q = torch.zeros(out_f, n_q, device=W.device, dtype=torch.float32 if spec is None else torch.uint8)
    losses = torch.zeros(out_f, device=W.device)
    s_cur = z_cur = None
    for i1 in range(0, n_q, block_size):
        i2 = min(i1 + block_size, n_q)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prune is not None and nm is None:
            # SparseGPT Alg. 1: mask of this block's columns from the OBS error w_c^2 / [H^-1]_cc^2 of the updated weights
            keep[:, i1:i2] = _prune_block(W1**2 / torch.diag(Hinv1).unsqueeze(0) ** 2, prune.sparsity)
        for i in range(i2 - i1):
            col = i1 + i
            w = W1[:, i]
            d = Hinv1[i, i]
            if nm is not None and i % nm[1] == 0:
                # SparseGPT N:M: per row, keep the N of the next M columns with the largest w^2 / [H^-1]_cc^2
                j = min(i + nm[1], i2 - i1)
                keep[:, col:i1 + j] = nm_keep_mask(W1[:, i:j] ** 2 / torch.diag(Hinv1)[i:j].unsqueeze(0) ** 2, *nm)
            if static_groups:
                g = int(col_group[col])
                s_cur, z_cur = scales[:, g], zeros[:, g]
            elif spec is not None and col % gs == 0:
                # a new group starts here (in sweep order): its grid from the current, error-updated weights
                cur = torch.cat([W1[:, i:], W[:, i2:n_q]], dim=1)[:, :gs]
                if keep is not None:  # weights already known to be pruned count as the zeros they will be
                    cur = cur * keep[:, col:col + cur.shape[1]]
                s_cur, z_cur = find_params(cur, spec, None if hdiag is None else hdiag[col:col + cur.shape[1]])
                g = col // gs
                scales[:, g], zeros[:, g] = s_cur, z_cur
            if spec is None:  # pruning only: the column keeps or zeroes each weight
                q = wq = w * keep[:, col]
            else:
                q = torch.clamp(torch.round(w / s_cur) + z_cur, 0, spec.maxq)
                if keep is not None:  # a pruned weight takes the zero point's code: exactly 0 on the grid
                    q = torch.where(keep[:, col], q, z_cur)
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
        keep = keep[:, invperm] if keep is not None else None
        # groups were formed along the sweep order (unless static): column perm[j] belongs to group j // gs
        g_idx = col_group[invperm] if static_groups else (torch.arange(n_q, device=W.device) // gs)[invperm]
    else:
        g_idx = natural_group
    kept = W[:, n_q:].clone() if n_q < in_f else None
    info = SweepInfo(float(losses.sum()), inv.percdamp, int(dead.sum()), kept)
    if spec is None:
        return SweepResult(Q, keep, None, info)
    qw = QuantizedWeight(Q, scales.to(SCALE_DTYPE), zeros.to(torch.uint8), g_idx.to(torch.int32), spec)
    return SweepResult(qw.dequantize() if dequantize else None, keep, qw, info)


# ---------------------------------------------------------------------------------------------------------------
# Options of the GPTQ sweep, shared by every method built on it (GPTQ, OWQ)
# ---------------------------------------------------------------------------------------------------------------
@dataclass
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
