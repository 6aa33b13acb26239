"""HQQ, Half-Quadratic Quantization (Badri & Shaji 2023, mobiusml.github.io/hqq_blog): calibration-free grid fitting.

Per group (a row of `gs` input columns) the grid minimises the l_p (p < 1) error of the weights, not the squared one:

    min_{z, s} || W - Q^-1(Q(W)) ||_p^p,   Q(W) = clamp(round(W / s + z), 0, 2^b - 1),  Q^-1(q) = s (q - z)

split half-quadratically with an auxiliary W_e (the error), solved by alternating closed forms (the blog's eq. 4-6):

    W_e <- shrink_p(W - Q^-1(Q(W)), beta)       shrink_p(x, b) = sign(x) relu(|x| - |x|^(p-1) / b)   (generalised soft threshold)
    z   <- mean_group( Q(W) - (W - W_e) / s )    (the zero's least-squares solution; here projected onto the integers 0..2^b-1)
    s   <- <W - W_e, q - z> / <q - z, q - z>     (optional: the scale's least-squares solution given q and z)
    beta <- kappa * beta

with the reference's p = 0.7, beta = 10, kappa = 1.01, 20 iterations, started from min/max. Two solvers:
* "reference" (the default): the hqq package's own iterations (0.2.8, `Quantizer.quantize(optimize=True)`, axis=1):
  scale fixed at min/max, the zero continuous, the shift applied in float (round(W / s + z)), stopping at the first
  iteration whose mean |W - W_hat| over the whole matrix does not decrease; then the zero rounded to the nearest
  integer (the project's one grid, so every export and kernel reads the result; the reference keeps it in float).
* "integer": the iterations on the integer grid itself: the zero rounded after each update, the scale solved by
  least squares too, each group keeping its best iterate by the l_p objective over all iterations.
Either way the objective the solver tracks never increases over the iterations (the trace). A symmetric grid's zero
is fixed, so there only the integer solver's scale update runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from compress.core.errors import ConfigError
from compress.kernels.obs import single_thread
from compress.kernels.quant_grid import SCALE_DTYPE, QuantizedWeight, QuantSpec, params_from_range, round_scale


SOLVERS = ("reference", "integer")


@dataclass(frozen=True)
class HQQParams:
    lp: float = 0.7  # the reference's lp_norm
    beta: float = 10.0  # initial beta
    kappa: float = 1.01  # beta's growth per iteration
    iters: int = 20
    optimize_scale: bool = True  # integer iterations: also solve for the scale given the codes and zero
    solver: str = "reference"  # the reference's iterations (float zero, scale fixed) then the zero rounded; or "integer"

    def __post_init__(self):
        if self.solver not in SOLVERS:
            raise ConfigError(f"hqq solver {self.solver!r} is not known; allowed: {', '.join(SOLVERS)}")


def lp_objective(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int, p: float) -> torch.Tensor:
    """sum_j |w_j - w_hat_j|^p per row of w [rows, cols] on the grid (scale, zero) [rows]."""
    q = torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, maxq)
    return (w - scale[:, None] * (q - zero[:, None])).abs().pow(p).sum(dim=1)


def _shrink(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Proximal operator of |x|^p / beta (generalised soft thresholding, the reference's shrink_lp_op)."""
    a = x.abs()
    t = (a + 1e-8).pow_(p - 1).mul_(1.0 / beta)
    return a.sub_(t).relu_().copysign_(x)  # sign(x) relu(|x| - |x|^(p-1) / beta), in place: the same numbers


@torch.no_grad()
def _reference_then_round(w, spec, hp):
    """The reference's solver (hqq 0.2.8 `optimize_weights_proximal_legacy`, called by `Quantizer.quantize` with
    `optimize=True`, axis=1), then the zero rounded onto the integer grid. As the reference: inverse scale
    maxq / (max - min) fixed at min/max (1 where max - min <= 1e-4, at most 2e4), zero -min * that, rounded first for
    4 bits (its `round_zero` default), codes round(W s^-1 + z) with the shift in float, W_e <- shrink_p(W - W_r, beta),
    z <- mean(W_q - (W - W_e) s^-1), beta <- kappa beta, stopping at the first iteration whose mean |W - W_r| over all
    the rows given (the whole matrix's groups, as the reference) does not decrease. Differences: the best iterate is
    kept (the reference returns the zero computed one step after it), and the zero is then rounded to the nearest
    integer in 0..maxq with the scale (max - min) / maxq in float16, so the grid is the shared integer one.
    The trace is that mean |W - W_r| of the kept iterate after each iteration run (index 0: the start)."""
    maxq = spec.maxq
    wmin, wmax = w.min(dim=1).values, w.max(dim=1).values
    denom = wmax - wmin
    inv = torch.where(denom.abs() <= 1e-4, torch.ones_like(denom), maxq / denom).clamp(max=2e4)
    zero = -wmin * inv
    if spec.bits == 4:
        zero = torch.round(zero)
    best, best_z = math.inf, zero
    trace: list[float] = []
    beta = hp.beta
    for _ in range(hp.iters):
        q = torch.clamp(torch.round(w * inv[:, None] + zero[:, None]), 0, maxq)
        r = w - (q - zero[:, None]) / inv[:, None]
        err = float(r.abs().mean())
        if err >= best:
            break
        best, best_z = err, zero
        trace.append(err)
        zero = (q - (w - _shrink(r, beta, hp.lp)) * inv[:, None]).mean(dim=1)  # the zero's closed form (float)
        beta *= hp.kappa
    scale = torch.where(denom.abs() <= 1e-4, torch.ones_like(denom), round_scale(1.0 / inv))
    return scale, torch.round(best_z).clamp(0, maxq), trace


def hqq_params(w: torch.Tensor, spec: QuantSpec, hp: HQQParams = HQQParams()) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Scale and integer zero per row of w [rows, cols] (float32) by the HQQ solver; also the objective the solver
    tracks after each iteration (index 0: the start): the reference solver's mean |W - W_hat| over all rows (float
    zero, before the rounding), or the integer solver's sum over rows of the l_p error of the kept grid."""
    w = w.float()
    maxq = spec.maxq
    scale, zero = params_from_range(w.min(dim=1).values, w.max(dim=1).values, spec)
    if hp.solver == "reference" and not spec.sym:
        return _reference_then_round(w, spec, hp)
    best = best_s = best_z = None
    trace: list[float] = []
    beta = hp.beta
    for it in range(hp.iters + 1):
        # the residual of the current grid gives both its objective and the next shrinkage step
        q = torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, maxq)
        r = w - scale[:, None] * (q - zero[:, None])
        obj = r.abs().pow(hp.lp).sum(dim=1)
        if best is None:
            best, best_s, best_z = obj, scale.clone(), zero.clone()
        else:
            better = obj < best
            best = torch.where(better, obj, best)
            best_s = torch.where(better, scale, best_s)
            best_z = torch.where(better, zero, best_z)
        trace.append(float(best.sum()))
        if it == hp.iters:
            break
        target = w - _shrink(r, beta, hp.lp)  # W - W_e
        if not spec.sym:  # a symmetric grid's zero is fixed at 2^(b-1)
            zero = torch.clamp(torch.round((q - target / scale[:, None]).mean(dim=1)), 0, maxq)
        if hp.optimize_scale:
            d = q - zero[:, None]
            den = (d * d).sum(dim=1)
            s_new = (target * d).sum(dim=1) / den.clamp(min=1e-12)
            scale = torch.where((den > 0) & (s_new > 0), round_scale(s_new), scale)
        beta *= hp.kappa
    return best_s, best_z, trace


@single_thread()
def hqq_quantize(w: torch.Tensor, spec: QuantSpec, hp: HQQParams = HQQParams()) -> QuantizedWeight:
    """W [out, in] on the integer grid of `spec` (groups along the input, shorter last group allowed), every group's
    scale and zero from the HQQ solver (all full groups of the matrix solved together, as rows of one batch). On one
    thread: elementwise work on small tensors, which a second thread slows down on a busy machine (as GPTQ's sweep)."""
    w = w.detach().float()
    out_f, in_f = w.shape
    gs = in_f if spec.group_size == -1 else min(spec.group_size, in_f)
    n_groups = spec.groups(in_f)
    n_full = in_f // gs
    scales = torch.empty(out_f, n_groups, device=w.device)
    zeros = torch.empty(out_f, n_groups, device=w.device)
    s, z, _ = hqq_params(w[:, :n_full * gs].reshape(out_f * n_full, gs), spec, hp)  # row-major: [o, g] -> o * n_full + g
    scales[:, :n_full], zeros[:, :n_full] = s.view(out_f, n_full), z.view(out_f, n_full)
    if n_groups > n_full:  # the shorter last group
        scales[:, -1], zeros[:, -1], _ = hqq_params(w[:, n_full * gs:], spec, hp)
    g_idx = spec.g_idx(in_f, device=w.device)
    sc, zc = scales[:, g_idx.long()], zeros[:, g_idx.long()]
    codes = torch.clamp(torch.round(w / sc) + zc, 0, spec.maxq).to(torch.uint8)
    return QuantizedWeight(codes, scales.to(SCALE_DTYPE), zeros.to(torch.uint8), g_idx, spec)
