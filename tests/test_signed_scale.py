"""The signed-scale symmetric grid (ggml's Q4_0 / Q5_0 rule): scale = m / -2^(b-1) with m the group's signed extreme.

Checked against the gguf package's numpy port of llama.cpp's `quantize_row_q4_0_ref`, through RTN, GPTQ, the int4
kernel and the GGUF writer; refused where a method has its own scale rule.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from compress.core.errors import ConfigError
from compress.kernels.quant_grid import QuantSpec, WeightQuantConfig, rtn_quantize

gguf = pytest.importorskip("gguf")


def _w(rows=64, cols=256, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", [4, 5])
def test_extreme_lands_on_lowest_code_and_uses_every_level(bits):
    w = _w()
    qw = rtn_quantize(w, QuantSpec(bits, 32, True, signed_scale=True))
    g = w.reshape(64, -1, 32)
    ext_idx = g.abs().argmax(dim=-1, keepdim=True)
    codes = qw.codes.reshape(64, -1, 32)
    assert torch.all(codes.gather(-1, ext_idx) == 0)  # m / (m / -half) = -half -> code 0
    assert set(qw.codes.unique().tolist()) == set(range(2**bits))  # all 2^b levels used
    assert torch.all((qw.scales < 0) == (g.gather(-1, ext_idx).squeeze(-1) > 0))  # the scale carries -sign(m)
    deq = qw.dequantize().reshape(64, -1, 32)
    assert torch.allclose(deq.gather(-1, ext_idx), g.gather(-1, ext_idx), rtol=2e-3)


@pytest.mark.parametrize("qtype,bits", [("Q4_0", 4), ("Q5_0", 5)])
def test_rtn_matches_llama_cpp_reference_quantizer(qtype, bits):
    """Our RTN on this grid gives llama.cpp's own Q4_0 / Q5_0 weights; the only difference allowed is the fp16
    rounding of d before the codes are computed (ggml divides by the unrounded d) and round-half-up vs -even."""
    w = _w(64, 512, seed=3)
    ours = rtn_quantize(w, QuantSpec(bits, 32, True, signed_scale=True)).dequantize().numpy()
    t = gguf.GGMLQuantizationType[qtype]
    theirs = gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), t), t)
    same = np.isclose(ours, theirs, rtol=0, atol=1e-6)
    assert same.mean() > 0.999, same.mean()
    plain = rtn_quantize(w, QuantSpec(bits, 32, True)).dequantize().numpy()
    assert ((ours - w.numpy()) ** 2).sum() < ((plain - w.numpy()) ** 2).sum()  # 2^b levels beat 2^b - 1 half-steps


def test_gptq_and_kernel_and_gguf_export_carry_negative_scales(tmp_path):
    from compress.formats.gguf import write_gguf
    from compress.layers.quant_linear import QuantLinear
    from compress.model.surgery import set_module
    from compress.model.tiny import tiny_model, tiny_tokenizer

    model = tiny_model("llama", kv_heads=2)
    spec = QuantSpec(4, 32, True, signed_scale=True)
    ref = {}
    for n, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and n.startswith("model.layers"):
            q = QuantLinear.from_quantized(rtn_quantize(mod.weight, spec), mod.bias)
            set_module(model, n, q)
            ref[n] = q
    q = ref["model.layers.0.mlp.down_proj"]
    assert bool((q.weight_scale < 0).any()) and bool((q.weight_scale > 0).any())
    x = torch.randn(3, q.in_features)
    fallback = x @ q.dequantize_weight(torch.float32).t()
    q.select_kernel(True)
    assert torch.allclose(q(x), fallback, atol=1e-4, rtol=1e-4), q.kernel
    write_gguf(model, tiny_tokenizer(), tmp_path / "m.gguf")
    r = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    t = {x.name: x for x in r.tensors}["blk.0.ffn_down.weight"]
    assert t.tensor_type.name == "Q4_0"
    got = gguf.quants.dequantize(t.data, t.tensor_type)
    assert np.array_equal(got, q.dequantize_weight(torch.float32).numpy())


def test_gptq_sweep_on_signed_grid():
    """GPTQ on the signed grid (static groups): each group's scale is the one RTN gives the original weights, and its
    output error sum (W - Q) H (W - Q)^T is below RTN's on the same grid."""
    from compress.kernels.obs import GPTQSweepConfig, gptq_quantize
    cfg = GPTQSweepConfig.from_dict({"bits": 4, "group_size": 32, "sym": True, "signed_scale": True})
    spec = cfg.spec()
    assert spec.signed_scale and spec.label() == "w4 g32 sym-signed"
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 128, generator=g)
    x = torch.randn(512, 128, generator=g) * torch.linspace(0.2, 3, 128)
    h = x.t() @ x / 512
    qw, _ = gptq_quantize(w, h, spec, static_groups=True)
    rtn = rtn_quantize(w, spec)
    assert torch.equal(qw.scales, rtn.scales) and bool((qw.scales < 0).any())
    err = lambda q: float(torch.einsum("oi,ij,oj->", w - q, h, w - q))
    assert err(qw.dequantize()) < err(rtn.dequantize())


def test_signed_scale_needs_sym_and_is_refused_by_methods_with_their_own_scales():
    with pytest.raises(ConfigError, match="--signed-scale needs --sym"):
        WeightQuantConfig.from_dict({"bits": 4, "signed_scale": True})
    with pytest.raises(ConfigError, match="needs a symmetric grid"):
        QuantSpec(4, 32, False, signed_scale=True)
    from compress.methods.autoround import AutoRoundConfig
    from compress.methods.hqq import HQQConfig
    for cls in (AutoRoundConfig, HQQConfig):
        with pytest.raises(ConfigError, match="--signed-scale"):
            cls.from_dict({"bits": 4, "sym": True, "signed_scale": True})
