"""Architecture discovery: where the decoder blocks are, and each block's linear layers in data-flow order.

Nothing here is a table of hand-written layer names per model family. The blocks are found by the usual attribute
paths (or, failing those, the model's largest ModuleList); the structure inside a block is read off one traced
forward pass: which linears run, in which order, which of them read the very same input tensor (q/k/v, gate/up),
and which normalization module produced that input (what SmoothQuant folds into). This is what true-sequential
GPTQ, SmoothQuant and LLM-Pruner's dependency groups are built on, for LLaMA-family models, OPT and the like.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from compress.model.surgery import is_linear_like

_BLOCK_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "model.language_model.layers")
NORM_TYPES = (nn.LayerNorm,)


def _get_attr_path(obj: object, path: str):
    for part in path.split("."):
        if not hasattr(obj, part):
            return None
        obj = getattr(obj, part)
    return obj


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(dotted path, ModuleList) of the decoder blocks."""
    for path in _BLOCK_PATHS:
        mods = _get_attr_path(model, path)
        if isinstance(mods, nn.ModuleList) and len(mods) > 0:
            return path, mods
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (best is None or len(mod) > len(best[1])):
            best = (name, mod)
    if best is None:
        raise ValueError(f"{type(model).__name__}: no decoder blocks (nn.ModuleList) found")
    return best


def is_norm(module: nn.Module) -> bool:
    """LayerNorm, or any RMSNorm-like module (a `weight` vector and 'Norm' in the class name)."""
    if isinstance(module, NORM_TYPES):
        return True
    name = type(module).__name__.lower()
    return "norm" in name and isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 1


def linear_names(block: nn.Module) -> list[str]:
    """Names (relative to the block) of its linear layers, including already-compressed ones."""
    return [n for n, m in block.named_modules() if n and is_linear_like(m)]


@dataclass
class BlockGraph:
    """What one traced forward pass of a block shows."""

    order: list[str]  # linears in call order
    input_groups: list[list[str]]  # consecutive linears reading the same tensor, in order (q,k,v | o | gate,up | down)
    producers: dict[str, str | None] = field(default_factory=dict)  # first linear of a group -> norm that fed it

    def group_of(self, name: str) -> list[str]:
        for g in self.input_groups:
            if name in g:
                return g
        return [name]


def trace_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> BlockGraph:
    """Run the block once on `hidden` and record the data flow between its norms and linears."""
    calls: list[tuple[str, torch.Tensor]] = []
    norm_outputs: list[tuple[str, torch.Tensor]] = []
    handles = []
    for name, mod in block.named_modules():
        if name and is_linear_like(mod):
            handles.append(mod.register_forward_hook(lambda m, inp, out, n=name: calls.append((n, inp[0]))))
        elif name and is_norm(mod):
            handles.append(mod.register_forward_hook(lambda m, inp, out, n=name: norm_outputs.append((n, out))))
    try:
        with torch.no_grad():
            block(hidden, **kwargs)
    finally:
        for h in handles:
            h.remove()
    order: list[str] = []
    groups: list[list[str]] = []
    group_inputs: list[torch.Tensor] = []
    for name, x in calls:
        if name in order:  # a linear called twice (weight sharing): keep the first call
            continue
        order.append(name)
        for g, gx in zip(groups, group_inputs):
            if gx is x:
                g.append(name)
                break
        else:
            groups.append([name])
            group_inputs.append(x)
    producers: dict[str, str | None] = {}
    for g, gx in zip(groups, group_inputs):
        producers[g[0]] = next((n for n, out in norm_outputs if out is gx), None)
    # Linears never called in the trace (unused branches) still get compressed, after the others.
    for name in linear_names(block):
        if name not in order:
            order.append(name)
            groups.append([name])
    return BlockGraph(order=order, input_groups=groups, producers=producers)


def _out_features(module: nn.Module) -> int | None:
    return getattr(module, "out_features", None)


def _in_features(module: nn.Module) -> int | None:
    return getattr(module, "in_features", None)


@dataclass
class ChannelFeed:
    """How a linear-fed input group reads its producer: input channel j of the group is output channel index[j] of
    `producer` (index None: channel j itself), reached through products only."""

    producer: str
    index: torch.Tensor | None = None


def _relative_error(got: torch.Tensor, expect: torch.Tensor) -> float:
    scale = float(expect.norm())
    return float((got - expect).norm()) / scale if scale > 0 else math.inf


@torch.no_grad()
def channel_producers(block: nn.Module, hidden: torch.Tensor, kwargs: dict, graph: BlockGraph) -> dict[str, ChannelFeed]:
    """First linear of an input group not fed by a norm -> the linear whose output channels reach that group's input
    channels through products only (a gated MLP's up -> down; attention's v -> o, each o input channel reading one v
    channel, also with grouped KV heads), read off the data flow, not the names.

    The test is exact: the candidate's output channels are multiplied by powers of two (exact in every float format),
    and it feeds the group iff the group's input changes by exactly the same factors. Where the group is wider than
    the candidate (grouped KV: o_proj reads each v channel once per query head of its group), each input channel's
    source is read bit by bit first (factor 2 on the candidate channels whose index has bit b set), then the whole map
    checked with random factors. A non-linearity on the path (SiLU, GELU, a softmax, a norm) breaks the equality, so
    gate -> down or q/k -> o never pass; ReLU is positively homogeneous, so OPT's fc1 -> ReLU -> fc2 passes, as in
    the reference code's OPT scales."""
    mods = dict(block.named_modules())
    open_groups = [g for g in graph.input_groups if graph.producers.get(g[0]) is None and _in_features(mods[g[0]])]
    if not open_groups:
        return {}
    firsts = {g[0] for g in open_groups}
    seen: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(m, inp, out):
            if name not in seen:
                seen[name] = inp[0].detach().float().reshape(-1, inp[0].shape[-1])
        return hook

    def run(cand: str | None = None, r: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        seen.clear()
        handles = [mods[n].register_forward_hook(record(n)) for n in firsts]
        if cand is not None:
            handles.append(mods[cand].register_forward_hook(lambda m, i, out: out * r.to(out.device, out.dtype)))
        try:
            block(hidden, **kwargs)
        finally:
            for h in handles:
                h.remove()
        return dict(seen)

    clean = run()
    position = {n: i for i, n in enumerate(graph.order)}
    gen = torch.Generator().manual_seed(0)
    found: dict[str, ChannelFeed] = {}
    for cand in graph.order:
        width = _out_features(mods[cand])
        if not width:
            continue
        wanted = [g[0] for g in open_groups if g[0] not in found and cand not in g and g[0] in clean
                  and _in_features(mods[g[0]]) % width == 0 and position[cand] < position[g[0]]]
        for first in wanted:
            x = clean[first]
            index = None if x.shape[1] == width else _read_index(run, cand, first, x, width)
            if x.shape[1] != width and index is None:
                continue
            r = torch.pow(2.0, torch.randint(-2, 3, (width,), generator=gen).float())
            got = run(cand, r).get(first)
            expect = x * (r if index is None else r[index]).to(x.device)
            if got is not None and got.shape == x.shape and _relative_error(got, expect) <= 1e-3:
                found[first] = ChannelFeed(cand, index)
    return found


def _read_index(run, cand: str, first: str, x: torch.Tensor, width: int) -> torch.Tensor | None:
    """For each input channel of the group, which of the candidate's `width` output channels it is (bit b of the
    index from a run with factor 2 on the channels whose bit b is set), or None if some channel follows none."""
    amax = x.abs().amax(dim=0)
    if not bool((amax > 0).all()):
        return None
    index = torch.zeros(x.shape[1], dtype=torch.long)
    ids = torch.arange(width)
    for b in range(max(1, (width - 1).bit_length())):
        bit = (ids >> b) & 1
        got = run(cand, torch.pow(2.0, bit.float())).get(first)
        if got is None or got.shape != x.shape:
            return None
        same = (got - x).abs().amax(dim=0) <= 1e-3 * amax
        doubled = (got - 2 * x).abs().amax(dim=0) <= 1e-3 * amax
        if not bool((same ^ doubled).all()):
            return None
        index |= doubled.long().cpu() << b
    return index if bool((index < width).all()) else None
