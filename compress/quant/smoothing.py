"""SmoothQuant's smoothing transform (Xiao et al. 2023, arXiv 2211.10438, section 4), shared by every method and
recipe that wants it (SmoothQuant W8A8; smoothing before GPTQ/RTN).

For a group of linears reading the output of one normalization (q/k/v after the attention norm, gate/up after the
MLP norm), per input channel j:

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)            (eq. 4; max|W_j| over every linear of the group)
    Y = (X diag(s)^-1) (diag(s) W)                          (eq. 3)

1/s is folded into the norm's weight (and bias), s into the input columns of every linear of the group, so the
block computes the same function while activation outliers move into the weights. The groups and their producing
norms come from the block's traced data flow (BlockContext.graph), never from layer names. Groups not fed directly by
a norm (o_proj, down_proj) are left alone, as in the paper.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from compress.core.errors import ConfigError
from compress.layers.weights import linear_weight

if TYPE_CHECKING:  # pragma: no cover
    from compress.pipeline.engine import BlockContext, LinearStats

_MIN = 1e-5  # the reference code's floor on both maxima (an all-zero channel gets a finite factor)


def smoothing_factors(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s [in] float32 from the activations' per-channel abs-max [in] and the group's weights [out_i, in] (eq. 4)."""
    w_absmax = torch.stack([w.detach().float().abs().amax(dim=0) for w in weights]).amax(dim=0)
    a = act_absmax.detach().float().to(w_absmax.device).clamp(min=_MIN)
    s = a.pow(alpha) / w_absmax.clamp(min=_MIN).pow(1.0 - alpha)
    return s.clamp(min=_MIN)


@torch.no_grad()
def fold_smoothing(norm: nn.Module, linears: list[nn.Module], s: torch.Tensor) -> None:
    """norm.weight /= s (and its bias), W[:, j] *= s_j for every linear: computed in float32, stored once in each
    tensor's own dtype."""
    norm.weight.copy_((norm.weight.float() / s.to(norm.weight.device)).to(norm.weight.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.copy_((norm.bias.float() / s.to(norm.bias.device)).to(norm.bias.dtype))
    for lin in linears:
        if not isinstance(lin, nn.Linear):
            raise ConfigError(f"smoothing folds into float nn.Linear layers, not {type(lin).__name__} (smooth before quantizing)")
        lin.weight.copy_((lin.weight.float() * s.to(lin.weight.device)).to(lin.weight.dtype))


@torch.no_grad()
def fold_into_linear(prev: nn.Module, linears: list[nn.Module], s: torch.Tensor, index: torch.Tensor | None = None) -> None:
    """prev's output rows (and bias) /= s [prev.out], W[:, j] *= s[index[j]] (s_j where index is None) for every
    linear prev feeds through products only (BlockContext.channel_producers: up -> down, v -> o): the block's
    function is unchanged."""
    for lin in [prev, *linears]:
        if not isinstance(lin, nn.Linear):
            raise ConfigError(f"scales fold into float nn.Linear layers, not {type(lin).__name__} (scale before quantizing)")
    prev.weight.copy_((prev.weight.float() / s.to(prev.weight.device)[:, None]).to(prev.weight.dtype))
    if prev.bias is not None:
        prev.bias.copy_((prev.bias.float() / s.to(prev.bias.device)).to(prev.bias.dtype))
    cols = s if index is None else s[index.to(s.device)]
    for lin in linears:
        lin.weight.copy_((lin.weight.float() * cols.to(lin.weight.device)).to(lin.weight.dtype))


@dataclass
class SmoothedGroup:
    norm: str  # the block-relative name of the norm that absorbed 1/s
    linears: list[str]
    scales: torch.Tensor  # s [in] float32


def smoothable_groups(block: "BlockContext") -> list[tuple[str, list[str]]]:
    """(norm, linears) for every input group of the block whose input is a norm's output (from the traced graph) and
    that holds at least one linear the run compresses (--ignore can exclude whole groups)."""
    targets = set(block.targets())
    out = []
    for group in block.graph.input_groups:
        norm = block.graph.producers.get(group[0])
        if norm is not None and targets.intersection(group):
            out.append((norm, list(group)))
    return out


def linear_fed_groups(block: "BlockContext") -> list[tuple[str, list[str], torch.Tensor | None]]:
    """(producing linear, linears, channel map) for every input group fed by another linear's output channels through
    products only (from the traced data flow: BlockContext.channel_producers) that holds a linear the run compresses;
    the map gives each input channel's producer channel (None: one to one)."""
    targets = set(block.targets())
    feeds = block.channel_producers
    return [(feeds[g[0]].producer, list(g), feeds[g[0]].index) for g in block.graph.input_groups
            if g[0] in feeds and targets.intersection(g)]


def smooth_block(block: "BlockContext", alpha: float, stats: dict[str, "LinearStats"] | None = None) -> list[SmoothedGroup]:
    """Smooth every norm-fed group of one block in place. `stats` (input_absmax per linear, gathered on this block's
    current weights) is gathered here when not given. Returns what was done, with the factors."""
    groups = smoothable_groups(block)
    if not groups:
        return []
    if stats is None:
        stats = block.collect([n for _, names in groups for n in names], ("input_absmax",))
    done = []
    for norm_name, names in groups:
        linears = [block.get(n) for n in names]
        s = smoothing_factors(stats[names[0]].absmax, [linear_weight(m) for m in linears], alpha)
        fold_smoothing(block.get(norm_name), linears, s)
        done.append(SmoothedGroup(norm_name, names, s))
    return done
