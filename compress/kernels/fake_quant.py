"""Fake quantization with gradients: the straight-through estimator and LSQ's step-size gradient, as autograd
functions on the project's integer grid (compress.kernels.quant_grid).

* Straight-through estimator (Bengio et al. 2013, arXiv 1308.3432): rounding passes the gradient of the clipped
  value v = clamp(w/s + z, 0, 2^b - 1) unchanged, so d w_hat / d w = 1 inside the clipping range and 0 outside.
* LSQ (Esser et al. 2020, arXiv 1902.08153): the step size s is a parameter; through the STE its gradient is eq. 3,
  (q - z) - w/s inside, Q_P = 2^b-1-z above, -Q_N = -z below, times the gradient scale
  g = 1 / sqrt(N_W * Q_P) of Sec. 2.2 (N_W: weights sharing that step size).
* Scales are used in the forward pass as the float16 value every checkpoint stores (a straight-through rounding).
"""
from __future__ import annotations

import torch

from compress.kernels.quant_grid import quantize, round_scale


# ---------------------------------------------------------------------------------------------------------------
# Differentiable pieces
# ---------------------------------------------------------------------------------------------------------------
def grad_scale(x: torch.Tensor, g: torch.Tensor | float) -> torch.Tensor:
    """Value x, gradient g * dL/dx (LSQ, arXiv 1902.08153, Sec. 2.2 / its gradscale function)."""
    return (x - x * g).detach() + x * g


def stored_scale_ste(scale: torch.Tensor) -> torch.Tensor:
    """The float16 value the checkpoint will store, with an identity gradient."""
    return scale + (round_scale(scale) - scale).detach()


def ste_fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """w_hat = s * (q - z) with the grid's codes q = clamp(round(w/s) + z, 0, maxq) (compress.kernels.quant_grid.quantize, so
    the initial codes are exactly RTN's/GPTQ's), and the straight-through gradient of LSQ's clipped value
    v = clamp(w/s + z, 0, maxq): dw_hat/dw = 1 inside the range, 0 outside; dw_hat/ds = (q - z) - w/s inside,
    maxq - z above, -z below (LSQ eq. 3 with a zero point). The composed-ops reference of _FakeQuant."""
    v = torch.clamp(w / scale + zero, 0, maxq)
    q = quantize(w.detach(), scale.detach(), zero, maxq)
    return scale * (v + (q - v).detach() - zero)


def group_range(w: torch.Tensor, g_idx: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (row, group) min and max of w [out, in], with groups given by g_idx [in]; the range always holds 0."""
    idx = g_idx.long().unsqueeze(0).expand_as(w)
    zeros = torch.zeros(w.shape[0], n_groups, dtype=w.dtype, device=w.device)
    wmin = zeros.scatter_reduce(1, idx, w, "amin", include_self=True)
    wmax = zeros.scatter_reduce(1, idx, w, "amax", include_self=True)
    return wmin, wmax


class GroupLayout:
    """Moves per-group tensors [out, G] to per-column [out, in] and back (sums), for natural-order groups of
    `group_size` columns (the last possibly shorter) by reshapes, else through g_idx."""

    def __init__(self, g_idx: torch.Tensor, n_groups: int, group_size: int, natural: bool):
        self.g_idx, self.n_groups, self.natural = g_idx.long(), n_groups, natural
        in_f = g_idx.numel()
        self.gs = in_f if n_groups == 1 else group_size
        self.full = in_f // self.gs  # whole groups; a shorter last one holds in_f - full * gs columns
        self.in_f = in_f

    def expand(self, t: torch.Tensor) -> torch.Tensor:
        if not self.natural:
            return t[:, self.g_idx]
        out = t.shape[0]
        head = t[:, :self.full].unsqueeze(-1).expand(out, self.full, self.gs).reshape(out, self.full * self.gs)
        tail = self.in_f - self.full * self.gs
        if not tail:
            return head
        return torch.cat([head, t[:, self.full:].expand(out, tail)], dim=1)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if not self.natural:
            return torch.zeros(t.shape[0], self.n_groups, dtype=t.dtype, device=t.device).index_add_(1, self.g_idx, t)
        out = t.shape[0]
        head = t[:, :self.full * self.gs].reshape(out, self.full, self.gs).sum(-1)
        if self.full * self.gs == self.in_f:
            return head
        return torch.cat([head, t[:, self.full * self.gs:].sum(-1, keepdim=True)], dim=1)


class _FakeQuant(torch.autograd.Function):
    """ste_fake_quantize with the group expansion fused in: the same values and gradients, a fraction of the
    memory traffic (autograd of the composed expression saves and revisits several [out, in] tensors).
    Gradients: dw = g * 1[0 <= w/s + z <= maxq]; ds (per group) = sum of g * (q - v) inside, g * (q - z) outside,
    where v = w/s + z (LSQ eq. 3 with a zero point) and q = clamp(round(w/s) + z, 0, maxq)."""

    @staticmethod
    def forward(ctx, w, scale, zero, layout: GroupLayout, maxq: int):
        s, z = layout.expand(scale), layout.expand(zero)
        u = w / s
        v = u + z
        inside = (v >= 0) & (v <= maxq)
        q = torch.clamp(torch.round(u) + z, 0, maxq)  # compress.kernels.quant_grid.quantize
        w_hat = s * (q - z)
        ds = None
        if ctx.needs_input_grad[1]:
            ds = q - torch.where(inside, v, z)
        ctx.save_for_backward(inside if ctx.needs_input_grad[0] else None, ds)
        ctx.layout = layout
        return w_hat

    @staticmethod
    def backward(ctx, grad):
        inside, ds = ctx.saved_tensors
        gw = grad * inside if inside is not None else None
        gs = ctx.layout.sum(grad * ds) if ds is not None else None
        return gw, gs, None, None, None


class _ScaledCodes(torch.autograd.Function):
    """w_hat = s * (codes - z) with frozen integer codes: ds (per group) = sum of g * (codes - z) (PEQA)."""

    @staticmethod
    def forward(ctx, scale, codes, zero, layout: GroupLayout):
        ctx.save_for_backward(codes, zero)
        ctx.layout = layout
        return layout.expand(scale) * (codes.float() - layout.expand(zero))

    @staticmethod
    def backward(ctx, grad):
        codes, zero = ctx.saved_tensors
        return ctx.layout.sum(grad * (codes.float() - ctx.layout.expand(zero))), None, None, None
