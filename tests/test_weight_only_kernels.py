"""The integer weight-only kernels of QuantLinear against its de-quantized float matmul (compress.kernels.weight_only,
compress.layers.kernels): every layout a kernel takes, asymmetric zero points, group sizes 32/64/128, per channel,
a partial last group, and the layouts that must fall back."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from compress.kernels.quant_grid import QuantSpec, rtn_quantize
from compress.kernels.weight_only import int4_kernel_group
from compress.layers.kernels import kernel_table, select_kernels
from compress.layers.quant_linear import OWQLinear, QuantLinear

from unittest import mock  # noqa: E402

from compress.kernels import weight_only  # noqa: E402
from compress.kernels.compiled import compiled_kernels  # noqa: E402

HAS_INT4 = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
HAS_INT8 = hasattr(torch.ops.aten, "_weight_int8pack_mm")


def _layer(out_f, in_f, bits, group, sym, *, bias=False, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.05 + 0.01 * torch.randn(out_f, 1, generator=g)
    qw = rtn_quantize(w, QuantSpec(bits, group, sym))
    b = torch.randn(out_f, generator=g) if bias else None
    return QuantLinear.from_quantized(qw, b, dtype=dtype)


def _compare(layer, dtype, tokens=5):
    """The kernel's output (forced for this many rows) against the exact float32 product and the fallback."""
    x = torch.randn(tokens, layer.in_features, generator=torch.Generator().manual_seed(1)).to(dtype)
    ref = F.linear(x.float(), layer.dequantize_weight(torch.float32),
                   None if layer.bias is None else layer.bias.float())  # exact float32 reference
    fallback = F.linear(x, layer.dequantize_weight(dtype), None if layer.bias is None else layer.bias.to(dtype))
    kernel = layer.select_kernel()
    assert kernel.startswith("quantized:"), kernel
    with mock.patch.dict(weight_only.INT4_CPU_MAX_ROWS, {dtype: 10**9}), \
            mock.patch.dict(weight_only.INT8_CPU_MAX_ROWS, {dtype: 10**9}):  # the kernel for every row count
        got = layer(x)
    assert got.dtype == dtype
    scale = ref.abs().max().item()
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * scale)
    else:  # to bf16 rounding: no further from the exact product than the bf16 fallback is, within a small factor
        fb_err = (fallback.float() - ref).abs().max().item()
        err = (got.float() - ref).abs().max().item()
        assert err <= max(3 * fb_err, 2 ** -7 * scale), (err, fb_err, scale)
    return got


@pytest.mark.skipif(not HAS_INT4, reason="this torch has no _weight_int4pack_mm_for_cpu")
@pytest.mark.parametrize("group", [32, 64, 128, -1])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_kernel_equals_dequantized_matmul(group, sym, dtype):
    layer = _layer(48, 256, 4, group, sym, bias=True, dtype=dtype)
    _compare(layer, dtype)
    assert "_weight_int4pack_mm" in layer.kernel


@pytest.mark.skipif(not HAS_INT4, reason="this torch has no _weight_int4pack_mm_for_cpu")
@pytest.mark.parametrize("bits", [2, 3])
def test_low_bit_codes_run_on_the_int4_kernel(bits):
    _compare(_layer(32, 128, bits, 64, False), torch.float32)


@pytest.mark.skipif(not HAS_INT4, reason="this torch has no _weight_int4pack_mm_for_cpu")
def test_partial_last_group_a_kernel_group_divides_runs_exactly():
    # width 576 (SmolLM2), group 128: 4 full groups and one of 64; the kernel runs groups of 64 with repeated scales
    assert int4_kernel_group(576, 128) == 64
    layer = _layer(32, 576, 4, 128, False)
    _compare(layer, torch.float32)
    assert "kernel group 64" in layer.kernel


def test_layouts_without_an_exact_kernel_fall_back_and_say_why():
    partial = _layer(32, 100, 4, 32, False)  # 3 groups of 32 and one of 4: no kernel group divides the width
    assert partial.select_kernel().startswith("dequantize-on-the-fly")
    assert "width 100" in partial.kernel
    odd_rows = _layer(24, 128, 4, 32, False)  # the CPU int4 layout needs out_features % 16 == 0
    assert odd_rows.select_kernel().startswith("dequantize-on-the-fly") and "multiple of 16" in odd_rows.kernel
    w8_grouped = _layer(32, 256, 8, 128, False)
    assert "8-bit groups of 128" in w8_grouped.select_kernel()
    qw = rtn_quantize(torch.randn(32, 128), QuantSpec(4, 32, False))
    perm = torch.randperm(128)
    qw.g_idx = qw.g_idx[perm]  # act-order: groups not in natural column order
    act = QuantLinear.from_quantized(qw)
    assert "act-order" in act.select_kernel()
    x = torch.randn(3, 100)
    torch.testing.assert_close(partial(x), F.linear(x, partial.dequantize_weight()))


def test_owq_falls_back():
    qw = rtn_quantize(torch.randn(32, 120), QuantSpec(4, 32, False))
    owq = OWQLinear.from_parts(qw, torch.tensor([3, 7, 9, 11, 20, 30, 40, 50]), torch.randn(32, 8))
    assert "weak columns" in owq.select_kernel()


@pytest.mark.skipif(not HAS_INT8, reason="this torch has no _weight_int8pack_mm")
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_kernel_equals_dequantized_matmul(sym, dtype):
    layer = _layer(40, 96, 8, -1, sym, bias=True, dtype=dtype)
    _compare(layer, dtype)
    assert "_weight_int8pack_mm" in layer.kernel


@pytest.mark.skipif(not HAS_INT4, reason="this torch has no _weight_int4pack_mm_for_cpu")
def test_kernel_form_is_not_saved_and_follows_reloaded_codes():
    layer = _layer(32, 128, 4, 64, False)
    before = set(layer.state_dict())
    layer.select_kernel()
    assert set(layer.state_dict()) == before  # the repacked layout is a run-time form only
    other = _layer(32, 128, 4, 64, False, seed=5)
    layer.load_state_dict(other.state_dict())  # new codes: the kernel form is rebuilt from them
    x = torch.randn(2, 128)
    torch.testing.assert_close(layer(x), F.linear(x, other.dequantize_weight()), rtol=1e-5, atol=1e-5)


def test_disabled_kernels_and_grad_use_the_fallback(monkeypatch):
    layer = _layer(32, 128, 4, 64, False)
    monkeypatch.setenv("COMPRESS_KERNELS", "0")
    table = select_kernels(torch.nn.Sequential(layer))
    assert list(table.values())[0].startswith("dequantize-on-the-fly") and "disabled" in layer.kernel
    layer.select_kernel(True)
    x = torch.randn(2, 128, requires_grad=True)
    layer(x).sum().backward()  # autograd needs the float path; the kernels have no backward
    assert x.grad is not None
    assert kernel_table(torch.nn.Sequential(layer)) == {"0": layer.kernel}


@pytest.mark.skipif(not (HAS_INT4 and HAS_INT8), reason="this torch lacks _weight_int4pack_mm_for_cpu or _weight_int8pack_mm")
@pytest.mark.parametrize("kernel,bits,group", [("int4", 4, 64), ("int8", 8, -1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_calls_with_many_rows_take_the_faster_fallback(dtype, kernel, bits, group):
    """Above CPU_MAX_ROWS rows per call a CPU int4 / int8 layer de-quantizes (bit-equal to the disabled-kernel path);
    at or below it the kernel runs (its own rounding); the layer says so in its kernel description."""
    layer = _layer(48, 256, bits, group, False, dtype=dtype)
    limit = weight_only.cpu_max_rows(kernel, dtype)
    many = torch.randn(limit + 1, 256).to(dtype)
    few = torch.randn(limit, 256).to(dtype)
    layer.select_kernel(False)
    fb_many, fb_few = layer(many), layer(few)
    desc = layer.select_kernel(True)
    assert f"{kernel} weight-only kernel" in desc and f"calls of more than {limit} rows" in desc
    assert torch.equal(layer(many), fb_many)
    assert not torch.equal(layer(few), fb_few) or dtype == torch.float32  # the kernel's own rounding
    calls = []
    import compress.layers.quant_linear as ql
    op = "int4_matmul" if kernel == "int4" else "int8_matmul_weight_only"
    real = getattr(weight_only, op)
    with mock.patch.object(ql, op, side_effect=lambda *a: calls.append(1) or real(*a)):
        layer(few)
        layer(many)
    assert calls == [1]


@pytest.mark.parametrize("bits,group,sym", [(4, 64, False), (4, 40, True), (8, -1, False), (3, 32, False)])
def test_compiled_dequantization_is_bit_identical(bits, group, sym):
    from compress.evals.compiled_decode import compiler_missing

    if compiler_missing():
        pytest.skip(f"torch.compile cannot run here: {compiler_missing()}")
    layer = _layer(24, 100, bits, group, sym, dtype=torch.bfloat16)
    eager = layer.dequantize_weight()
    assert weight_only.packed_dequantizer() is not None
    with compiled_kernels():
        assert weight_only.packed_dequantizer() is not weight_only.dequantize_packed
        got = layer.dequantize_weight()
    assert weight_only.packed_dequantizer() is weight_only.dequantize_packed
    assert torch.equal(got, eager)
    # and the packed path equals the QuantizedWeight path it replaced
    assert torch.equal(eager, layer.quantized_weight().dequantize(torch.float32).to(torch.bfloat16))
