"""The integer grid: params, codes, packing, shorter last groups, QuantLinear storage."""
import pytest
import torch

from compress.core.errors import ConfigError
from compress.kernels.quant_grid import QuantSpec, dequantize_codes, find_params, pack_bits, rtn_quantize, unpack_bits
from compress.layers.quant_linear import QuantLinear


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("n", [1, 31, 32, 33, 96, 577])
def test_pack_roundtrip(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 2**bits, (3, n), generator=g).to(torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (3, ((n + 31) // 32) * bits)  # real b-bit storage: 32 values in `bits` words
    assert torch.equal(unpack_bits(packed, bits, n), codes)


def test_pack_layout_is_little_endian_bitstream():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8] + [0] * 24], dtype=torch.uint8)
    word = pack_bits(codes, 4)[0, 0].item() & 0xFFFFFFFF
    assert word == 0x87654321  # value j at bits [4j, 4j+4)


def test_asymmetric_params_cover_range_and_zero():
    w = torch.tensor([[-1.0, 0.5, 2.0], [0.1, 0.2, 0.3]])
    spec = QuantSpec(4, -1, False)
    scale, zero = find_params(w, spec)
    # min is clamped to <= 0 and max to >= 0 (zero exactly representable)
    assert scale[0].item() == pytest.approx(3.0 / 15, rel=1e-3)
    assert scale[1].item() == pytest.approx(0.3 / 15, rel=1e-3)
    assert zero[1].item() == 0


def test_symmetric_zero_is_midpoint():
    w = torch.randn(8, 64)
    qw = rtn_quantize(w, QuantSpec(4, 32, True))
    assert torch.all(qw.zeros == 8)


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_symmetric_one_signed_group_spans_plus_minus_max(sign, bits):
    """A group with no weight of the other sign still gets the grid ±max|w| (scale 2 max / (2^b - 1), zero 2^(b-1)).
    The GPTQ reference's quirk (xmin kept at 0: scale max / (2^b - 1)) clipped every value above 7/15 of the max at 4
    bits: [0.1, 0.5, 1.0, 0.8] came back as [0.13, 0.47, 0.47, 0.47]."""
    w = sign * torch.tensor([[0.1, 0.5, 1.0, 0.8]])
    spec = QuantSpec(bits, -1, True)
    scale, zero = find_params(w, spec)
    assert scale.item() == pytest.approx(2.0 / spec.maxq, rel=1e-3) and zero.item() == 2 ** (bits - 1)
    w_hat = rtn_quantize(w, spec).dequantize()
    step = scale.item()
    # no clipping beyond the grid's own asymmetry: the top code is (2^(b-1) - 1) steps above zero
    top = (2 ** (bits - 1) - 1) * step
    expected = torch.clamp(torch.round(w / step) * step, -(2 ** (bits - 1)) * step, top)
    assert torch.allclose(w_hat, expected, atol=1e-3)
    if bits == 4 and sign > 0:
        assert torch.allclose(w_hat, sign * torch.tensor([[0.1333, 0.5333, 0.9333, 0.8]]), atol=1e-3)
    # the same group mixed with one weight of the other sign gets the same grid (only max|w| matters)
    mixed = torch.cat([w, -0.01 * sign * torch.ones(1, 1)], dim=1)
    assert find_params(mixed, spec)[0].item() == pytest.approx(scale.item())


def test_codes_on_grid_and_error_bounded():
    torch.manual_seed(0)
    w = torch.randn(16, 200)
    spec = QuantSpec(3, 64, False)
    qw = rtn_quantize(w, spec)
    assert qw.codes.max() <= 7
    w_hat = qw.dequantize()
    # every dequantized value is scale * (integer - zero) for its group's scale and zero
    gi = qw.g_idx.long()
    k = w_hat / qw.scales.float()[:, gi] + qw.zeros.float()[:, gi]
    assert torch.allclose(k, k.round(), atol=1e-4)
    # round-to-nearest: error at most half a step (no clipping for asymmetric min/max grids)
    assert torch.all((w - w_hat).abs() <= qw.scales.float()[:, gi] / 2 + 1e-6)


def test_shorter_last_group():
    """SmolLM2's width 576 with group 128: 5 groups, the last one 64 wide (never a refusal)."""
    spec = QuantSpec(4, 128, False)
    assert spec.groups(576) == 5
    g_idx = spec.g_idx(576)
    assert (g_idx == 4).sum().item() == 64
    w = torch.randn(4, 576)
    w[:, 512:] *= 100  # the last group's grid must come from its own 64 columns only
    qw = rtn_quantize(w, spec)
    assert qw.scales.shape == (4, 5)
    assert qw.scales[:, 4].float().min() > 10 * qw.scales[:, :4].float().max()


@pytest.mark.parametrize("bits,gs,sym", [(0, 128, False), (9, 128, False)])
def test_bad_bits(bits, gs, sym):
    with pytest.raises(ConfigError, match="bits"):
        QuantSpec(bits, gs, sym)


def test_bad_group():
    with pytest.raises(ConfigError, match="group size 0"):
        QuantSpec(4, 0, False)


@pytest.mark.parametrize("bits,gs,sym", [(4, 128, False), (3, 64, True), (2, -1, False), (8, 32, False)])
def test_quantlinear_stores_and_reproduces(bits, gs, sym):
    torch.manual_seed(bits)
    w = torch.randn(48, 200)
    qw = rtn_quantize(w, QuantSpec(bits, gs, sym))
    mod = QuantLinear.from_quantized(qw, torch.randn(48), dtype=torch.float32)
    assert torch.equal(mod.dequantize_weight(), dequantize_codes(qw.codes, qw.scales, qw.zeros, qw.g_idx))
    back = mod.quantized_weight()
    assert torch.equal(back.codes, qw.codes) and torch.equal(back.zeros, qw.zeros)
    x = torch.randn(5, 200)
    ref = x @ qw.dequantize().t() + mod.bias
    assert torch.allclose(mod(x), ref, atol=1e-5)
    # storage: packed codes really take `bits` bits per weight (+ scales/zeros)
    assert mod.weight_packed.numel() * 32 == 48 * 224 * bits
    n_groups = qw.scales.shape[1]
    zero_bits = 0 if sym else n_groups * 64 * bits  # zero points packed along the 48 (padded to 64) outputs
    assert mod.storage_bits() == 48 * 224 * bits + 48 * n_groups * 16 + zero_bits


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_in_row_chunks_equals_one_pass(bits, monkeypatch):
    """pack_bits works a chunk of rows at a time (bounded int64 copies); the words are those of one pass."""
    import compress.kernels.quant_grid as qg

    codes = torch.randint(0, 2**bits, (3, 37, 70), dtype=torch.uint8)
    whole = qg.pack_bits(codes, bits)
    monkeypatch.setattr(qg, "PACK_CHUNK", 100)  # one row of 70 per step
    chunked = qg.pack_bits(codes, bits)
    assert chunked.shape == whole.shape and torch.equal(chunked, whole)
    assert torch.equal(qg.unpack_bits(chunked, bits, 70), codes)


@pytest.mark.parametrize("bits", [3, 5, 6, 7])
def test_byte_packing_equals_the_bit_stream(bits, monkeypatch):
    """The byte-wise pack/unpack for widths not dividing 32 gives the very words of the generic bit-stream path."""
    import types

    import compress.kernels.quant_grid as qg

    codes = torch.randint(0, 2**bits, (5, 577), generator=torch.Generator().manual_seed(bits)).to(torch.uint8)
    fast = pack_bits(codes, bits)
    monkeypatch.setattr(qg, "sys", types.SimpleNamespace(byteorder="big"))  # forces the generic int64 path
    generic = pack_bits(codes, bits)
    assert torch.equal(unpack_bits(generic, bits, 577), codes)
    monkeypatch.undo()
    assert torch.equal(fast, generic)
    assert torch.equal(unpack_bits(fast, bits, 577), codes)
