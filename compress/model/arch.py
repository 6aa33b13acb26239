"""Architecture discovery: where the decoder blocks are, and each block's linear layers in data-flow order.

Nothing here is a table of hand-written layer names per model family. The blocks are found by the usual attribute
paths (or, failing those, the model's largest ModuleList); the structure inside a block is read off one traced
forward pass: which linears run, in which order, which of them read the very same input tensor (q/k/v, gate/up),
and which normalization module produced that input (what SmoothQuant folds into). This is what true-sequential
GPTQ, SmoothQuant and LLM-Pruner's dependency groups are built on, for LLaMA-family models, OPT and the like.
"""
from __future__ import annotations

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
