"""Attention for one-token decode steps: the softmax(q K^T / sqrt(d)) V of a single query as two small matmuls per
KV head group, instead of PyTorch's CPU flash-attention kernel.

At batch 1 and one query token, `scaled_dot_product_attention` on the CPU runs its flash kernel (blocked for long
queries): on SmolLM2 (9 query heads, 3 KV heads, head 64, 640 cached positions, bfloat16, 2 threads) one call took
0.51 ms against 0.06 ms for the grouped matmuls below, and in a 4-bit decode step the 30 attention calls were a third
of the time (7.5 of 23 ms per token, `bench/decode_profile.py`, 2026-12-04). The query heads sharing a KV head
(grouped-query attention; head j reads KV head j // (heads / kv heads), transformers' `repeat_kv` order) are
multiplied as one [group, d] block, without repeating K and V; scores, mask and softmax in float32.

`decode_attention` is registered with transformers' attention interface as "compress_decode" (its mask is
transformers' SDPA mask); any call that is not a one-token step, or that carries what this function does not
implement (dropout, attention sinks, soft-capping), goes to transformers' SDPA function unchanged.
`decode_attention_for(model)` switches a model to it for the duration of a block (the static-cache decoder uses it).
"""
from __future__ import annotations

import contextlib
import functools

import torch

NAME = "compress_decode"


def decode_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query [B, H, q, d], key / value [B, Hkv, L, d], mask [B, 1, q, L]
    (bool: True attends; or additive float) -> ([B, q, H, d], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, h, q_len, d = query.shape
    kvh, length = key.shape[1], key.shape[2]
    if (q_len != 1 or dropout or h % kvh or kwargs.get("s_aux") is not None or kwargs.get("softcap")
            or value.shape[-1] != d):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scale = scaling if scaling is not None else d ** -0.5
    qg = query.reshape(b, kvh, h // kvh, d).float()
    scores = torch.matmul(qg, key.transpose(-1, -2).float()).mul_(scale)  # [B, Hkv, group, L]
    if attention_mask is not None:
        m = attention_mask[:, :, -1:, -length:]  # [B, 1, 1, L]: the one query's row
        scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.float()
    out = torch.matmul(scores.softmax(dim=-1), value.float())  # [B, Hkv, group, d]
    return out.reshape(b, h, 1, d).transpose(1, 2).to(query.dtype), None


@functools.cache
def _register() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(NAME, decode_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


@contextlib.contextmanager
def decode_attention_for(model: torch.nn.Module):
    """Within the block, `model` (a transformers model using SDPA) attends through `decode_attention`; a model on
    another implementation (eager, flash, a custom one) is left as it is."""
    configs = list({id(c): c for m in model.modules()  # the modules share one config (or one per sub-model)
                    if getattr(c := getattr(m, "config", None), "_attn_implementation", None) == "sdpa"}.values())
    if not configs:
        yield
        return
    _register()
    for c in configs:
        c._attn_implementation = NAME
    try:
        yield
    finally:
        for c in configs:
            c._attn_implementation = "sdpa"
