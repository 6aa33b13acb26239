"""Real int8 arithmetic: torch._int_mm and the exact fallback agree bit for bit; W8A8Linear computes what SmoothQuant's
eq. 1 defines, in int32, on either path."""
import pytest
import torch

import compress.kernels.int8 as int8
from compress.kernels.int8 import int8_matmul, int8_matmul_fallback, int_mm_supported
import compress.layers.w8a8_linear as w8a8_linear
from compress.layers.w8a8_linear import W8A8Linear


def _reference_int32(a, b):
    return (a.long() @ b.long().t()).to(torch.int32)


@pytest.mark.parametrize("m,k,n", [(1, 576, 1536), (37, 1536, 576), (5, 3000, 7), (64, 576, 192)])
def test_int_mm_and_fallback_give_identical_integers(m, k, n):
    g = torch.Generator().manual_seed(m * k + n)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    ref = _reference_int32(a, b)
    assert torch.equal(int8_matmul_fallback(a, b), ref)
    assert int_mm_supported("cpu") == hasattr(torch, "_int_mm")  # this CPU build runs it; a probe failure would show here
    assert torch.equal(int8_matmul(a, b, use_int_mm=True), ref)
    assert int8_matmul(a, b).dtype == torch.int32


def test_fallback_exact_where_one_float32_matmul_is_not():
    """Sums far beyond 2^24 (long rows of +-127/-128): the chunked fallback stays exact."""
    g = torch.Generator().manual_seed(0)
    k = 8192
    a = (127 - torch.randint(0, 3, (4, k), generator=g)).to(torch.int8)
    b = torch.where(torch.rand(6, k, generator=g) < 0.5, -128, 127).to(torch.int8)
    b[:, : k // 2] = -128
    ref = _reference_int32(a, b)
    assert ref.abs().max() > 2**24
    assert torch.equal(int8_matmul_fallback(a, b), ref)
    assert torch.equal(int8_matmul(a, b, use_int_mm=True), ref)


def test_int8_matmul_refuses_floats():
    with pytest.raises(TypeError, match="int8 operands"):
        int8_matmul(torch.zeros(2, 3), torch.zeros(4, 3, dtype=torch.int8))


@pytest.mark.parametrize("scheme", ["per-token", "per-tensor"])
def test_w8a8_linear_matches_reference_and_both_paths(scheme, monkeypatch):
    torch.manual_seed(0)
    w, bias = torch.randn(48, 80), torch.randn(48)
    x = torch.randn(3, 7, 80)
    x[..., 5] *= 30  # an outlier channel
    absmax = x.abs().amax()
    mod = W8A8Linear.from_float(w, bias, act_scheme=scheme, input_absmax=absmax if scheme == "per-tensor" else None)
    # weights: int8 codes on the per-channel grid, scale = max|W_row| / 127 (float16), within half a step of W
    assert mod.weight.dtype == torch.int8 and mod.weight.abs().max() <= 127
    assert mod.weight_scale.dtype == torch.float16 and mod.weight_scale.shape == (48, 1)
    assert torch.all((mod.dequantize_weight(torch.float32) - w).abs() <= mod.weight_scale.float() / 2 + 1e-6)
    # reference: eq. 1 for both operands, the product in exact integers, one rescale
    x2 = x.reshape(-1, 80)
    sx = x2.abs().amax(dim=1, keepdim=True) / 127 if scheme == "per-token" else (absmax / 127).reshape(1, 1)
    xq = torch.clamp(torch.round(x2 / sx), -128, 127)
    acc = xq.double() @ mod.weight.double().t()
    ref = (acc * mod.weight_scale.double().t() * sx.double() + bias.double()).reshape(3, 7, 48)
    with torch.no_grad():
        got = mod(x)
    assert torch.allclose(got.double(), ref, rtol=1e-6, atol=1e-5)
    monkeypatch.setattr(int8, "_ONEDNN_OK", [False])  # torch._int_mm, then the exact fallback: bit-identical outputs
    with torch.no_grad():
        assert torch.equal(mod(x), got)
    monkeypatch.setitem(int8._INT_MM_OK, "cpu", False)
    with torch.no_grad():
        assert torch.equal(mod(x), got)


def test_onednn_is_used_only_with_amx_int8(monkeypatch):
    """Without AMX-int8, oneDNN runs signed int8 activations through its reference kernel (seconds per call), so the
    W8A8 layer must keep torch._int_mm there, whatever the op's availability."""
    monkeypatch.setattr(int8, "has_cpu_flag", lambda name: False)
    monkeypatch.setattr(int8, "_ONEDNN_OK", [])
    assert not int8.onednn_int8_supported()
    mod = W8A8Linear.from_float(torch.randn(24, 72))
    with torch.no_grad():
        mod(torch.randn(w8a8_linear.ONEDNN_MIN_ROWS, 72))
    assert getattr(mod, "_onednn_key", None) is None  # it did not go through oneDNN


def test_onednn_path_is_exact_and_repacks_changed_weights(monkeypatch):
    # the path's arithmetic on any CPU (without AMX oneDNN's reference kernel: slow, but exact on these small shapes)
    monkeypatch.setattr(int8, "has_cpu_flag", lambda name: True)
    monkeypatch.setattr(int8, "_ONEDNN_OK", [])
    if not int8.onednn_int8_supported():
        pytest.skip("oneDNN's int8 GEMM is not available in this torch build")
    g = torch.Generator().manual_seed(3)
    a = torch.randint(-128, 128, (5, 72), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (24, 72), dtype=torch.int8, generator=g)
    ws = torch.rand(24, generator=g)
    assert torch.equal(int8.onednn_scaled_matmul(a, int8.onednn_pack(b), ws), int8_matmul(a, b).float() * ws)
    mod = W8A8Linear.from_float(torch.randn(24, 72, generator=g))
    x = torch.randn(w8a8_linear.ONEDNN_MIN_ROWS, 72, generator=g)  # long enough for the oneDNN path
    with torch.no_grad():
        before = mod(x)
        assert getattr(mod, "_onednn_key", None) is not None  # it ran through oneDNN
        mod.weight.neg_()  # an in-place change of the codes: the packed copy must follow
        after = mod(x)
        monkeypatch.setattr(int8, "_ONEDNN_OK", [False])
        assert torch.equal(mod(x), after)  # and torch._int_mm gives the same bits
    assert torch.allclose(after, -before, rtol=1e-5, atol=1e-5)


def test_w8a8_bf16_input_keeps_dtype_and_static_needs_scale():
    w = torch.randn(16, 32, dtype=torch.bfloat16)
    mod = W8A8Linear.from_float(w)
    assert mod(torch.randn(2, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert mod.storage_bits() == 16 * 32 * 8 + 16 * 16
    with pytest.raises(ValueError, match="input abs-max"):
        W8A8Linear.from_float(w, act_scheme="per-tensor")


@pytest.mark.parametrize("act_scheme,bias", [("per-token", False), ("per-token", True), ("per-tensor", False)])
def test_w8a8_compiled_kernels_are_bit_identical(act_scheme, bias):
    """Inside compiled_kernels() the activation quantization and the rescale run fused by torch.compile (one graph for
    every row count): the same bits as the eager in-place steps, on the oneDNN path and below it."""
    from compress.evals.compiled_decode import compiler_missing
    from compress.kernels.compiled import compiled_kernels, warm_compiled_kernels
    from compress.layers.w8a8_linear import ONEDNN_MIN_ROWS, W8A8Linear

    if compiler_missing():
        pytest.skip(f"torch.compile cannot run here: {compiler_missing()}")
    g = torch.Generator().manual_seed(0)
    layer = W8A8Linear.from_float(torch.randn(48, 80, generator=g), torch.randn(48, generator=g) if bias else None,
                                  act_scheme=act_scheme, input_absmax=4.0, dtype=torch.bfloat16)
    assert warm_compiled_kernels(layer)[0] == 1
    for rows in (1, 7, ONEDNN_MIN_ROWS + 3):
        x = (3 * torch.randn(rows, 80, generator=g)).to(torch.bfloat16)
        eager = layer(x)
        with compiled_kernels():
            fused = layer(x)
        assert torch.equal(fused, eager), rows
