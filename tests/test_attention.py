"""compress.model.attention: the one-token decode attention against transformers' SDPA path (grouped KV heads, bool
and additive masks), its fall-backs, and its use by the static-cache decoder."""
from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from compress.evals.compiled_decode import StaticDecoder
from compress.evals.efficiency import greedy_decode
from compress.model import attention
from compress.model.tiny import tiny_model


def _module(groups=3):
    mod = torch.nn.Module()
    mod.num_key_value_groups, mod.is_causal = groups, True  # what transformers' SDPA function reads off the layer
    return mod


def _qkv(q_len=1, heads=9, kv_heads=3, length=40, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, heads, q_len, d, generator=g), torch.randn(2, kv_heads, length, d, generator=g),
            torch.randn(2, kv_heads, length, d, generator=g))


def test_one_token_attention_equals_sdpa_with_grouped_heads_and_masks():
    q, k, v = _qkv()
    mod = _module()
    valid = torch.ones(2, 1, 1, 40, dtype=torch.bool)
    valid[0, ..., 30:] = False  # a static cache's unused tail
    valid[1, ..., :5] = False  # e.g. left padding
    additive = torch.zeros(2, 1, 1, 40).masked_fill(~valid, float("-inf"))
    for mask in (None, valid, additive):
        ref, _ = sdpa_attention_forward(mod, q, k, v, mask, scaling=0.3)
        got, _ = attention.decode_attention(mod, q, k, v, mask, scaling=0.3)
        assert got.shape == ref.shape == (2, 1, 9, 16)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_other_calls_go_to_sdpa_unchanged():
    mod = _module()
    for args, kw in ((_qkv(q_len=5), {}), (_qkv(), {"dropout": 0.1})):
        q, k, v = args
        torch.manual_seed(0)
        got, _ = attention.decode_attention(mod, q, k, v, None, **kw)
        torch.manual_seed(0)
        ref, _ = sdpa_attention_forward(mod, q, k, v, None, **kw)
        assert torch.equal(got, ref)


def test_static_decoder_attends_through_it_and_keeps_the_greedy_tokens(monkeypatch):
    m = tiny_model(seed=0, hidden=128, intermediate=256, heads=4, kv_heads=2)
    prompt = torch.randint(0, m.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
    calls = []
    real = attention.decode_attention
    monkeypatch.setattr(attention, "decode_attention",
                        lambda mod, q, *a, **k: calls.append(q.shape[2]) or real(mod, q, *a, **k))
    with torch.no_grad():
        expected, _, _ = greedy_decode(m, prompt, 8)
    assert calls == []  # the plain decode loop keeps SDPA
    dec = StaticDecoder(m, 32, compile=False)
    got, _, _ = dec.generate(prompt, 8)
    assert got == expected
    assert calls.count(1) == 7 * m.config.num_hidden_layers  # every one-token step, every layer
    assert m.config._attn_implementation == "sdpa"  # restored afterwards
