"""Layer-dropped students: keep K of a model's decoder blocks, chosen evenly or by a block-importance score.

* uniform: K block indices evenly spread over the depth, first and last block included (round(i (n-1)/(K-1))).
* importance: Block Influence (Men et al. 2024, ShortGPT, arXiv 2403.03853, Eq. 1): BI_i = 1 - E_t cos(x_i,t, x_i+1,t),
  the mean cosine similarity between a block's input and output hidden states over calibration tokens; a block
  that barely turns its input has low influence and is dropped first. The K most influential blocks are kept.

The dropped model is an ordinary transformers model with fewer `num_hidden_layers` (and each attention's
`layer_idx` renumbered for the KV cache), so it saves and loads with AutoModelForCausalLM.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

from compress.core.errors import ConfigError
from compress.model.arch import find_blocks
from compress.model.surgery import set_module

log = logging.getLogger("compress")


def uniform_keep(n: int, k: int) -> list[int]:
    """K of n block indices, evenly spread, first and last included."""
    if not 1 <= k <= n:
        raise ConfigError(f"--student-layers {k!r} is out of range for a model of {n} blocks; allowed: 1..{n}")
    if k == 1:
        return [n - 1]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


@torch.no_grad()
def block_influence(model: nn.Module, input_ids: torch.Tensor, *, batch_size: int = 8,
                    device: torch.device | str = "cpu") -> list[float]:
    """ShortGPT's Block Influence of every decoder block on the given token sequences [N, L] (one forward pass per
    batch, hooks on the blocks; no weights change)."""
    _, blocks = find_blocks(model)
    sums = torch.zeros(len(blocks), dtype=torch.float64)
    count = 0
    handles = []

    def hook(i):
        def fn(mod, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]
            y = out[0] if isinstance(out, (tuple, list)) else out
            cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)  # [B, L]
            sums[i] += float(cos.sum())
        return fn

    for i, b in enumerate(blocks):
        handles.append(b.register_forward_hook(hook(i), with_kwargs=True))
    was = model.training
    model.eval()
    try:
        for s in range(0, input_ids.shape[0], batch_size):
            batch = input_ids[s:s + batch_size].to(device)
            model(input_ids=batch, use_cache=False)
            count += batch.numel()
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return [float(1.0 - v / count) for v in sums]


def importance_keep(scores: list[float], k: int) -> list[int]:
    """Indices of the K highest-influence blocks, in model order."""
    uniform_keep(len(scores), k)  # range check
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    return sorted(order[:k])


def drop_blocks(model: nn.Module, keep: list[int]) -> nn.Module:
    """Keep only the blocks `keep` (in place), renumber their layer indices, and update the config."""
    path, blocks = find_blocks(model)
    n = len(blocks)
    if not keep or any(not 0 <= i < n for i in keep) or len(set(keep)) != len(keep):
        raise ConfigError(f"blocks to keep {keep!r} must be distinct indices in 0..{n - 1}")
    kept = nn.ModuleList([blocks[i] for i in sorted(keep)])
    for new_idx, block in enumerate(kept):
        for mod in block.modules():
            if hasattr(mod, "layer_idx") and isinstance(mod.layer_idx, int):
                mod.layer_idx = new_idx
    set_module(model, path, kept)
    cfg = model.config
    cfg.num_hidden_layers = len(kept)
    layer_types = getattr(cfg, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == n:
        cfg.layer_types = [layer_types[i] for i in sorted(keep)]
    return model
