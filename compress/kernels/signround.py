"""SignRound's learnable rounding and clipping (AutoRound, Cheng et al. 2023, arXiv 2309.05516, eq. 1-3), on the
project's integer grid (compress.kernels.quant_grid).

Per group of a weight W (input columns, as every quantizer here), with learnable V in [-0.5, 0.5] (one per weight)
and alpha, beta in [0.5, 1] (one pair per group):

    s = (alpha max(W, 0) - beta min(W, 0)) / (2^b - 1),  zp = round(-beta min(W, 0) / s)      (eq. 2, asymmetric)
    W~ = s (clip(round(W / s + V) + zp, 0, 2^b - 1) - zp)                                        (eq. 1)

(symmetric: s = max(alpha max, -beta min) * 2 / (2^b - 1), zp = 2^(b-1)). round (and the float16 rounding of s) is
the straight-through estimator while training, so the trained weights are the stored ones. The final codes use
exactly RTN's grid code (params_from_range: float16 scales, integer zero points), so V = 0, alpha = beta = 1 gives
RTN's min/max codes bit for bit, and every export that holds RTN/GPTQ codes holds these.
"""
from __future__ import annotations

import math

import torch

from compress.kernels.quant_grid import SCALE_DTYPE, QuantizedWeight, QuantSpec, params_from_range

_MIN_SCALE = float(torch.finfo(torch.float16).tiny)


def group_view(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """W [out, in] as [out, G, gs]; a shorter last group is padded by repeating its last column (its min and max,
    hence its grid, stay those of its real columns; the padding is dropped again by `ungroup`)."""
    out_f, in_f = w.shape
    gs = in_f if group_size == -1 else min(group_size, in_f)
    n_groups = math.ceil(in_f / gs)
    pad = n_groups * gs - in_f
    if pad:
        w = torch.cat([w, w[:, -1:].expand(out_f, pad)], dim=1)
    return w.reshape(out_f, n_groups, gs)


def ungroup(g: torch.Tensor, in_features: int) -> torch.Tensor:
    return g.reshape(g.shape[0], -1)[:, :in_features]


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def signround_fake_quant(wg: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
                         spec: QuantSpec) -> torch.Tensor:
    """Differentiable W~ [out, G, gs] (float32) of grouped weights wg, rounding offsets v [out, G, gs] and clip
    scales alpha, beta [out, G] (eq. 1-2, straight-through rounding)."""
    maxq = spec.maxq
    wmin = wg.amin(dim=-1).clamp(max=0) * beta
    wmax = wg.amax(dim=-1).clamp(min=0) * alpha
    if spec.sym:
        wmax = torch.maximum(-wmin, wmax)
        wmin = -wmax
    scale = ((wmax - wmin) / maxq).clamp(min=_MIN_SCALE)[..., None]
    scale = scale + (scale.to(SCALE_DTYPE).float() - scale).detach()  # the stored float16 scale, straight-through
    if spec.sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.clamp(_round_ste(-wmin[..., None] / scale), 0, maxq)
    q = torch.clamp(_round_ste(wg / scale + v) + zero, 0, maxq)
    return scale * (q - zero)


@torch.no_grad()
def signround_quantize(w: torch.Tensor, v: torch.Tensor | None, alpha: torch.Tensor | None, beta: torch.Tensor | None,
                       spec: QuantSpec) -> QuantizedWeight:
    """Integer codes of W [out, in] with the learned V [out, G, gs], alpha, beta [out, G] (None: 0, 1, 1), on RTN's
    grid: scales rounded to float16 first (params_from_range), codes clamp(round(W / s + V) + zp, 0, 2^b - 1)."""
    w = w.detach().float()
    out_f, in_f = w.shape
    wg = group_view(w, spec.group_size)
    ones = torch.ones(wg.shape[:2], device=w.device)
    a = ones if alpha is None else alpha.detach().float().to(w.device)
    b = ones if beta is None else beta.detach().float().to(w.device)
    # min(beta wmin, 0) = beta min(wmin, 0) for beta > 0: the clipped range of eq. 2, on RTN's grid code
    scale, zero = params_from_range(wg.amin(dim=-1) * b, wg.amax(dim=-1) * a, spec)
    x = wg / scale[..., None]
    if v is not None:
        x = x + v.detach().float().to(w.device)
    codes = torch.clamp(torch.round(x) + zero[..., None], 0, spec.maxq)
    return QuantizedWeight(ungroup(codes, in_f).to(torch.uint8).contiguous(), scale.to(SCALE_DTYPE),
                           zero.to(torch.uint8), spec.g_idx(in_f, device=w.device), spec)
