"""AWQ, activation-aware weight quantization (Lin et al. 2024, arXiv 2306.00978), in the sequential engine.

Per decoder block, on the cached calibration inputs (one pass gathers everything; as the reference llm-awq, every
search of the block reads the inputs of the block before any change):
  1. scale search (Sec. 3.2, eq. 4-5): for every group of linears reading one norm's output (q/k/v, gate/up: the
     smoothing groups of compress.quant.smoothing), s = s_X^alpha with s_X = mean_t |x_tj| per input channel,
     normalised by sqrt(max s * min s) (the reference code), alpha over the grid i / n_grid, i = 0..n_grid-1; the alpha
     minimising || M(Q(W diag(s)) diag(s)^-1, X) - M(W, X) ||^2 over the calibration inputs, where M is the smallest
     module holding the group (self-attention for q/k/v, the MLP for gate/up) and Q the run's grid; then
     Y = (X diag(s)^-1)(diag(s) W) folded into the norm and the linears (the smoothing transform, eq. 3 of SmoothQuant);
     the same for every linear fed channel for channel by another linear through products only (the reference's
     up -> down and v -> o, found by the traced data flow; with grouped KV heads one scale per v channel, tied
     across the o_proj columns reading it, s_X their mean), M the fed linear itself and diag(s)^-1 folded into the
     producer's output rows;
  2. clipping search (the reference's auto_clip): per linear (q/k excluded, as in the reference) and per group of its
     grid, the clip ratio c in 1, 0.95, ..., 1 - max_shrink + 0.05 of max|w| minimising the output error
     (Q(clamp(w, -c max|w|, c max|w|)) - w) H (...)^T with H = X^T X / n the group's input Gram matrix (exactly the
     reference's mean squared output error, over every calibration token instead of 512 sampled ones);
  3. RTN on the grid (or, --scale-only, nothing: GPTQ follows in the same engine pass, a recipe awq -> gptq).
The scales are folded and the clipping applied to the float weights, so the result is an ordinary QuantLinear.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from compress.core.config import option
from compress.core.errors import ConfigError
from compress.kernels.quant_grid import (QuantSpec, WeightQuantConfig, fake_quantize, params_from_range,
                                         rtn_fake_quantize, rtn_quantize)
from compress.layers.quant_linear import QuantLinear
from compress.layers.weights import linear_weight
from compress.pipeline.method import Method, Needs, register
from compress.quant.smoothing import fold_into_linear, fold_smoothing, linear_fed_groups, smoothable_groups

log = logging.getLogger("compress")

# The reference's auto_clip skips the linears whose outputs only meet as attention scores (llm-awq: "q_", "k_",
# "query", "key", "Wqkv"): their own output error says little about the scores' error.
_NO_CLIP = ("q_proj", "k_proj", "query", "key", "wqkv", "qkv_proj")


@dataclass
class AWQConfig(WeightQuantConfig):
    n_grid: int = option(20, "alpha grid for the scale search: alpha = i / n_grid, i = 0..n_grid-1 (the reference's 20)",
                         range=(1, 1000))
    alpha: float = option(-1.0, "fixed alpha instead of the search (0: no scaling)", range=(0.0, 1.0), special={-1.0: "search"})
    duo_scaling: bool = option(False, "s = mean|X|^alpha / mean|W_normalised|^(1-alpha) (AutoAWQ / llm-compressor's "
                                      "duo_scaling) instead of the paper's mean|X|^alpha")
    clip: bool = option(True, "search each group's clip ratio by its output error (the reference's auto_clip)")
    clip_grid: int = option(20, "clip ratios 1 - i / clip_grid", range=(1, 1000))
    max_shrink: float = option(0.5, "smallest clip ratio searched is 1 - max_shrink (the reference's 0.5)", range=(0.0, 0.95))
    linear_scales: bool = option(True, "also scale the linear-to-linear pairs (up -> down, v -> o), as the reference "
                                       "code; off: the norm-fed groups only")
    tied_scales: bool = option(True, "with --linear-scales, also v -> o under grouped KV heads, each v channel's scale "
                                     "shared by the o_proj columns that read it (the reference skips these pairs)")
    scale_only: bool = option(False, "scale (and clip) the float weights only, quantize nothing: a first stage before "
                                     "gptq in a recipe")

    def check(self) -> None:
        super().check()
        if self.observer != "minmax":
            raise ConfigError(f"observer {self.observer!r}: AWQ chooses its ranges by its own clip search; allowed: minmax")

    def alphas(self) -> list[float]:
        return [self.alpha] if self.alpha >= 0 else [i / self.n_grid for i in range(self.n_grid)]


def awq_scales(x_mean: torch.Tensor, alpha: float, w_mean: torch.Tensor | None = None) -> torch.Tensor:
    """s = s_X^alpha (arXiv 2306.00978 eq. 5; / w_mean^(1-alpha) with duo scaling), normalised as the reference code."""
    s = x_mean.float().pow(alpha).clamp(min=1e-4)
    if w_mean is not None:
        s = (x_mean.float().pow(alpha) / (w_mean.float().pow(1 - alpha) + 1e-4)).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def weight_mean(weights: list[torch.Tensor], spec: QuantSpec) -> torch.Tensor:
    """Mean over the group's rows of |w| / max|w| of its quantization group (AutoAWQ's w_mean for duo scaling)."""
    rows = []
    for w in weights:
        w = w.detach().float().abs()
        gs = w.shape[1] if spec.group_size == -1 else spec.group_size
        parts = [w[:, c:c + gs] / (w[:, c:c + gs].amax(dim=1, keepdim=True) + 1e-6) for c in range(0, w.shape[1], gs)]
        rows.append(torch.cat(parts, dim=1))
    return torch.cat(rows, dim=0).mean(dim=0)


@torch.no_grad()
def clip_search(w: torch.Tensor, H: torch.Tensor, spec: QuantSpec, grid: int, max_shrink: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row and group of w [out, in]: the clip bound max_val (c * max|w_g|) minimising (Q(clamp(w_g)) - w_g) H_gg
    (...)^T. Returns (clipped w, bound [out, n_groups]). The full groups are searched together, a shorter last one
    after them."""
    w = w.float()
    out_f, in_f = w.shape
    gs = in_f if spec.group_size == -1 else min(spec.group_size, in_f)
    n_full = in_f // gs
    segments = [(0, n_full * gs, n_full)] + ([(n_full * gs, in_f, 1)] if n_full * gs < in_f else [])
    clipped, bounds = w.clone(), []
    for a, b, n in segments:
        width = (b - a) // n
        wg = w[:, a:b].reshape(out_f, n, width)
        Hg = torch.stack([H[a + k * width:a + (k + 1) * width, a + k * width:a + (k + 1) * width] for k in range(n)]).float()
        org_max = wg.abs().amax(dim=2)
        best_err = torch.full_like(org_max, float("inf"))
        best = org_max.clone()
        for i in range(max(1, int(max_shrink * grid))):
            mv = org_max * (1 - i / grid)
            cur = torch.clamp(wg, -mv[..., None], mv[..., None])
            s, z = params_from_range(cur.amin(dim=2), cur.amax(dim=2), spec)
            d = fake_quantize(cur, s[..., None], z[..., None], spec.maxq) - wg
            err = torch.einsum("ogi,gij,ogj->og", d, Hg, d)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, mv, best)
        bounds.append(best)
        clipped[:, a:b] = torch.clamp(wg, -best[..., None], best[..., None]).reshape(out_f, -1)
    return clipped, torch.cat(bounds, dim=1)


def _tie(v: torch.Tensor, index: torch.Tensor | None, width: int) -> torch.Tensor:
    """Per-channel statistics [in] of a tied group, averaged over the input channels sharing one of the producer's
    `width` channels (index[j] for channel j; 1 where none reads it): the scale search's s_X where one scale serves
    several columns (grouped KV's v -> o)."""
    if index is None:
        return v
    index = index.to(v.device)
    total = torch.zeros(width, dtype=v.dtype, device=v.device).index_add_(0, index, v)
    count = torch.zeros(width, dtype=v.dtype, device=v.device).index_add_(0, index, torch.ones_like(v))
    return torch.where(count > 0, total / count.clamp(min=1), torch.ones_like(total))


def _common_parent(names: list[str]) -> str:
    parts = [n.split(".")[:-1] for n in names] if len(names) > 1 else [names[0].split(".")]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


class _Capture:
    """What one calibration pass over the block records for one inspected module: its call arguments and outputs
    per micro-batch, and the mean |x| per channel of the group's input."""

    def __init__(self):
        self.calls: list[tuple[tuple, dict]] = []
        self.outputs: list[torch.Tensor] = []
        self.abs_sum: torch.Tensor | None = None
        self.n = 0

    def pre(self, module, args, kwargs):
        self.calls.append((tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args),
                           {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}))

    def post(self, module, args, kwargs, out):
        out = out[0] if isinstance(out, (tuple, list)) else out
        self.outputs.append(out.detach().clone())

    def add_input(self, module, inp, out):
        x = inp[0].detach().reshape(-1, inp[0].shape[-1]).float()
        a = x.abs().sum(dim=0)
        self.abs_sum = a if self.abs_sum is None else self.abs_sum + a
        self.n += x.shape[0]


def _replay_loss(module: nn.Module, cap: _Capture) -> float:
    err, n = 0.0, 0
    with torch.no_grad():
        for (args, kwargs), ref in zip(cap.calls, cap.outputs):
            out = module(*args, **kwargs)
            out = out[0] if isinstance(out, (tuple, list)) else out
            err += float(((out.float() - ref.float()) ** 2).sum())
            n += ref.numel()
    return err / max(n, 1)


@register("awq", family="quantization", summary="AWQ: activation-aware per-channel scales (searched, folded) + clipping, then RTN",
          paper="Lin et al. 2024, arXiv 2306.00978")
class AWQ(Method):
    Config = AWQConfig
    needs = Needs(calibration=True, stats=("hessian",))
    layerwise = True

    def describe(self) -> str:
        c = self.config
        a = f"alpha {c.alpha:g}" if c.alpha >= 0 else f"grid {c.n_grid}"
        return (c.spec().label() + f" {a}" + (" duo" if c.duo_scaling else "") + ("" if c.clip else " no-clip")
                + (" scale-only" if c.scale_only else ""))

    @torch.no_grad()
    def compress_block(self, block) -> None:
        c = self.config
        spec = c.spec()
        targets = block.targets()
        # (producer, linears, whether the producer is a norm): the norm-fed groups, then the linear-fed ones
        # (producer, linears, whether the producer is a norm, the channel map of a tied linear pair or None)
        groups = [(p, names, True, None) for p, names in smoothable_groups(block)]
        if c.linear_scales:
            groups += [(p, names, False, index) for p, names, index in linear_fed_groups(block)
                       if index is None or c.tied_scales]
        if block.index == 0:
            log.info("awq: per block, scales searched for %d groups: %s", len(groups),
                     "; ".join(f"{p} -> {', '.join(names)}" + ("" if index is None else " (tied)")
                               for p, names, _, index in groups))
        # ---- one calibration pass: inspected modules' calls and outputs, mean |x| of each group, input Gram matrices
        caps, handles = {}, []
        for norm, names, _, _ in groups:
            parent = _common_parent(names)
            cap = caps[norm] = _Capture()
            mod = block.block if parent == "" else block.get(parent)
            handles.append(mod.register_forward_pre_hook(cap.pre, with_kwargs=True))
            handles.append(mod.register_forward_hook(cap.post, with_kwargs=True))
            handles.append(block.get(names[0]).register_forward_hook(cap.add_input))
        try:
            if c.clip:
                stats = block.collect(targets, ("hessian",))
            else:
                stats = {}
                block.forward_all()
        finally:
            for h in handles:
                h.remove()
        # ---- 1. scale search per group, on the original block
        report = self.report.setdefault("layers", {})
        folded: dict[str, torch.Tensor] = {}
        for norm, names, by_norm, index in groups:
            cap = caps[norm]
            parent = _common_parent(names)
            inspect = block.block if parent == "" else block.get(parent)
            linears = [block.get(n) for n in names]
            for lin in linears:
                if not isinstance(lin, nn.Linear):
                    raise ConfigError(f"awq scales float nn.Linear layers, not {type(lin).__name__} at "
                                      f"{block.qualified(names[0])} (put awq before other quantizers)")
            originals = [lin.weight.detach().clone() for lin in linears]
            width = None if by_norm else block.get(norm).out_features
            x_mean = _tie(cap.abs_sum / max(cap.n, 1), index, width)
            w_mean = _tie(weight_mean(originals, spec), index, width) if c.duo_scaling else None
            best = (math.inf, 0.0, None, None)
            losses = {}
            for alpha in c.alphas():
                s_tied = awq_scales(x_mean, alpha, w_mean).to(originals[0].device)
                s = s_tied if index is None else s_tied[index.to(s_tied.device)]
                for lin, w in zip(linears, originals):
                    lin.weight.copy_((rtn_fake_quantize(w.float() * s, spec) / s).to(w.dtype))
                loss = _replay_loss(inspect, cap)
                losses[alpha] = loss
                if loss < best[0]:
                    best = (loss, alpha, s, s_tied)
            for lin, w in zip(linears, originals):
                lin.weight.copy_(w)
            loss, alpha, s, s_tied = best
            if by_norm:
                fold_smoothing(block.get(norm), linears, s)
            else:
                fold_into_linear(block.get(norm), linears, s_tied, index)
            folded.update({n: s for n in names})
            report[block.qualified(norm)] = {"linears": names, "alpha": alpha, "loss": loss, "loss_alpha0": losses.get(0.0),
                                             "s_min": round(float(s.min()), 5), "s_max": round(float(s.max()), 5),
                                             **({} if index is None else {"tied": True})}
            del cap.calls, cap.outputs
        # ---- 2. clipping search per linear; 3. RTN on the grid
        for name in targets:
            lin = block.get(name)
            weight = linear_weight(lin)
            W = weight.detach().float()
            if c.clip and not name.lower().endswith(_NO_CLIP):
                H = stats[name].hessian
                if name in folded:  # the input is now X diag(s)^-1
                    s = folded[name].to(H.device)
                    H = H / (s[:, None] * s[None, :])
                W, _ = clip_search(W, H, spec, c.clip_grid, c.max_shrink)
                if isinstance(lin, nn.Linear):
                    with torch.no_grad():
                        lin.weight.copy_(W.to(lin.weight.dtype))
            if not c.scale_only:
                qw = rtn_quantize(W, spec)
                block.replace(name, QuantLinear.from_quantized(qw, getattr(lin, "bias", None), dtype=weight.dtype))
        del stats
