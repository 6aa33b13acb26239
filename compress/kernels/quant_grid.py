"""Integer weight grids: scales, zero points, groups and bit packing, shared by RTN, GPTQ, OWQ, QAT, PEQA...

Conventions (those of the GPTQ reference code, arXiv 2210.17323):
* a weight W [out, in] is split along the input dimension into groups of `group_size` columns (-1: one group, i.e.
  per output channel); a width the group size does not divide gets a shorter last group, never a refusal;
* asymmetric: scale = (max - min) / (2^b - 1), zero = round(-min / scale), the range always containing 0;
  symmetric: scale = 2 max|w| / (2^b - 1), zero = 2^(b-1), the grid always spanning [-max|w|, +max|w|] -- also for a
  group with no negative weight (the GPTQ reference's `xmin[xmin < 0] = -xmax` leaves such a group at scale
  max/(2^b - 1) with zero 2^(b-1), which clips every value above (2^(b-1) - 1)/(2^b - 1) of the max; not done here);
* signed-scale symmetric (`signed_scale`, ggml's Q4_0 / Q5_0 rule, `quantize_row_q4_0_ref`): scale = m / -2^(b-1)
  with m the group's largest-magnitude weight *with its sign*, zero = 2^(b-1): m lands exactly on code 0 and the other
  side reaches (2^(b-1) - 1) |scale|, so all 2^b levels are used (the plain symmetric grid above wastes half a step
  on each side). The layout is the symmetric one; only the float16 scale may be negative;
* q = clamp(round(w / scale) + zero, 0, 2^b - 1);  w_hat = scale * (q - zero).
Scales are rounded to float16 *before* the codes are computed, so the float16 scales stored in every checkpoint
format reproduce exactly the weights the algorithm chose.

Observers (how a group's range is chosen): `minmax` (the above); `mse`, the range shrink search of GPTQ's reference
`Quantizer(mse=True)`: for p = 1, 0.99, ..., 0.21 the grid spanning [p min, p max], the one with the least squared
error sum_j (w_j - w_hat_j)^2 per row; `act-mse`, the same search with each column's error weighted by the
calibration inputs' mean x_j^2 (llama.cpp's imatrix weighting): sum_j E[x_j^2] (w_j - w_hat_j)^2. p = 1 (min/max)
is among the candidates, so neither search ever does worse than min/max on its own objective.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch

from compress.core.errors import ConfigError

SCALE_DTYPE = torch.float16
_MIN_SCALE = float(torch.finfo(torch.float16).tiny)
OBSERVERS = ("minmax", "mse", "act-mse")
_SHRINK_GRID, _MAX_SHRINK = 100, 0.8  # GPTQ reference Quantizer: grid=100, maxshrink=.8


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    group_size: int = 128  # -1: per output channel
    sym: bool = False
    observer: str = "minmax"  # how each group's range is chosen (OBSERVERS); not part of the stored grid
    signed_scale: bool = False  # symmetric only: ggml's signed-extreme scale (see above); stored as a negative scale

    def __post_init__(self):
        if self.signed_scale and not self.sym:
            raise ConfigError("--signed-scale needs a symmetric grid (--sym): an asymmetric grid has a zero point instead")
        if self.observer not in OBSERVERS:
            raise ConfigError(f"observer {self.observer!r} is not known; allowed: {', '.join(OBSERVERS)}")
        if not (1 <= self.bits <= 8):
            raise ConfigError(f"bits {self.bits!r} is out of range; allowed: 1..8")
        if self.group_size == 0 or self.group_size < -1:
            raise ConfigError(f"group size {self.group_size!r} is not allowed; use -1 (per-channel) or >= 1")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else math.ceil(in_features / self.group_size)

    def g_idx(self, in_features: int, device=None) -> torch.Tensor:
        """Group index of every input column in natural order."""
        idx = torch.arange(in_features, device=device, dtype=torch.int32)
        return torch.zeros_like(idx) if self.group_size == -1 else idx // self.group_size

    def label(self) -> str:
        g = "ch" if self.group_size == -1 else f"g{self.group_size}"
        obs = "" if self.observer == "minmax" else f" {self.observer}"
        sym = (" sym-signed" if self.signed_scale else " sym") if self.sym else ""
        return f"w{self.bits} {g}{sym}{obs}"


def find_params(w: torch.Tensor, spec: QuantSpec, col_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per row of `w` [rows, cols] (float32) by the spec's observer: min/max over the columns
    given, or the shrink search (mse; act-mse with `col_weight` [cols], the inputs' mean x^2 of those columns)."""
    w = w.float()
    wmin, wmax = w.min(dim=1).values, w.max(dim=1).values
    if spec.observer == "minmax":
        return params_from_range(wmin, wmax, spec)
    if spec.observer == "act-mse":
        if col_weight is None:
            raise ConfigError("the act-mse observer needs the calibration inputs' mean x^2 per column; none was given")
        cw = col_weight.float().to(w.device)
        cw = cw.reshape(1, -1) if cw.dim() == 1 else cw  # [cols], or [rows, cols] (each row its own weights)
    else:
        cw = None
    return shrink_search(w, wmin, wmax, spec, cw)


def shrink_search(w: torch.Tensor, wmin: torch.Tensor, wmax: torch.Tensor, spec: QuantSpec,
                  col_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's reference range search (Quantizer.find_params with mse=True, squared error): per row, the grid spanning
    [p wmin, p wmax] for p in 1, 0.99, ..., 1 - 0.8 + 0.01 with the least (optionally column-weighted) squared error."""
    best_s, best_z = params_from_range(wmin, wmax, spec)  # p = 1: min/max
    best = weighted_sq_error(w, best_s, best_z, spec.maxq, col_weight)
    for i in range(1, int(_MAX_SHRINK * _SHRINK_GRID)):
        p = 1 - i / _SHRINK_GRID
        s, z = params_from_range(p * wmin, p * wmax, spec)
        err = weighted_sq_error(w, s, z, spec.maxq, col_weight)
        better = err < best
        best = torch.where(better, err, best)
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
    return best_s, best_z


def weighted_sq_error(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int,
                      col_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per row of w [rows, cols]: sum_j c_j (w_j - w_hat_j)^2 on the grid (scale, zero) [rows] (c = 1 when None)."""
    d = (fake_quantize(w, scale[:, None], zero[:, None], maxq) - w) ** 2
    return (d * col_weight).sum(dim=1) if col_weight is not None else d.sum(dim=1)


def params_from_range(wmin: torch.Tensor, wmax: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (float32, same shape as the inputs) of the grid spanning [wmin, wmax] widened to hold 0."""
    zero_t = torch.zeros_like(wmin, dtype=torch.float32)
    xmin = torch.minimum(wmin.float(), zero_t)
    xmax = torch.maximum(wmax.float(), zero_t)
    if spec.sym and spec.signed_scale:  # ggml quantize_row_q4_0_ref: d = max / -8, max the signed extreme
        half = (spec.maxq + 1) // 2
        ext = torch.where(-xmin > xmax, xmin, xmax)
        ext = torch.where(ext == 0, torch.full_like(ext, float(half)), ext)  # an all-zero group: any scale is exact
        return round_signed_scale(ext / -half), torch.full_like(ext, half)
    if spec.sym:  # ±max|w| whatever the signs (GPTQ ref. quant.py keeps xmin = 0 for a one-signed group: a bug)
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(empty, torch.full_like(xmax, 1.0), xmax)
    scale = round_scale((xmax - xmin) / spec.maxq)
    if spec.sym:
        zero = torch.full_like(scale, (spec.maxq + 1) // 2)
    else:
        zero = torch.clamp(torch.round(-xmin / scale), 0, spec.maxq)
    return scale, zero


def round_scale(scale: torch.Tensor) -> torch.Tensor:
    """Round scales to their stored precision (float16), keeping them positive and finite."""
    s = scale.float().clamp(min=_MIN_SCALE, max=float(torch.finfo(torch.float16).max))
    return s.to(SCALE_DTYPE).float()


def round_signed_scale(scale: torch.Tensor) -> torch.Tensor:
    """round_scale keeping each scale's sign (the signed-scale symmetric grid)."""
    return torch.where(scale < 0, -round_scale(-scale), round_scale(scale))


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes (float tensor holding integers) of w given broadcastable scale/zero."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (q - zero)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    return dequantize(quantize(w, scale, zero, maxq), scale, zero)


@dataclass
class QuantizedWeight:
    """What a weight quantizer produces: integer codes on a grid, independent of any storage format."""

    codes: torch.Tensor  # [out, in] uint8 (values 0..2^bits-1), input columns in natural order
    scales: torch.Tensor  # [out, n_groups] float16
    zeros: torch.Tensor  # [out, n_groups] uint8 integer zero points
    g_idx: torch.Tensor  # [in] int32 group of each input column
    spec: QuantSpec

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_codes(self.codes, self.scales, self.zeros, self.g_idx).to(dtype)

    @property
    def natural_order(self) -> bool:
        return bool(torch.equal(self.g_idx.cpu(), self.spec.g_idx(self.g_idx.numel())))


def dequantize_packed(words: torch.Tensor, zero_words: torch.Tensor | None, scales: torch.Tensor, bits: int,
                      n_in: int, n_out: int, group_size: int, dtype: torch.dtype, inplace: bool = True) -> torch.Tensor:
    """W_hat [n_out, n_in] in `dtype` straight from packed codes (natural group order) and packed zero points
    (None: symmetric, z = 2^(b-1)): the same numbers as unpacking a QuantizedWeight and dequantize_codes.
    `inplace=False`: the form for torch.compile (the padded in-place form gave wrong last groups there, torch 2.13)."""
    codes = unpack_bits(words, bits, n_in)
    if zero_words is None:
        zeros = torch.full(scales.shape, float(2 ** (bits - 1)), dtype=torch.float32, device=scales.device)
    else:
        zeros = unpack_bits(zero_words, bits, n_out).t()
    return dequantize_codes(codes, scales, zeros, None, group_size, inplace=inplace).to(dtype)


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor | None,
                     group_size: int | None = None, inplace: bool = True) -> torch.Tensor:
    """W_hat [out, in] float32 from codes and per-group scales/zeros: through g_idx, or (g_idx None) natural groups
    of `group_size` columns (the last one possibly shorter)."""
    if g_idx is None:
        out_f, in_f = codes.shape
        n_groups = scales.shape[1]
        gs = in_f if n_groups == 1 else group_size
        pad = n_groups * gs - in_f
        if not inplace:  # each column's group by index (no padding: the form torch.compile fuses into one loop)
            gi = torch.arange(in_f, device=codes.device) // gs
            return (codes.float() - zeros.float()[:, gi]) * scales.float()[:, gi]
        c = codes.float()
        if pad:
            c = torch.nn.functional.pad(c, (0, pad))
        w = c.view(out_f, n_groups, gs)  # in place: (c - z) * s is exact in float32 for codes and fp16 scales
        w.sub_(zeros.float().unsqueeze(-1)).mul_(scales.float().unsqueeze(-1))
        return w.view(out_f, -1)[:, :in_f]
    gi = g_idx.long()
    s = scales.float()[:, gi]
    z = zeros.float()[:, gi]
    return s * (codes.float() - z)


def rtn_quantize(w: torch.Tensor, spec: QuantSpec, col_weight: torch.Tensor | None = None) -> QuantizedWeight:
    """Round-to-nearest quantization of W [out, in], per channel or per group (shorter last group allowed), each
    group's range by the spec's observer (`col_weight` [in]: the inputs' mean x^2, for act-mse)."""
    w = w.detach().float()
    out_f, in_f = w.shape
    gs = in_f if spec.group_size == -1 else spec.group_size
    n_groups = spec.groups(in_f)
    codes = torch.empty(out_f, in_f, dtype=torch.uint8, device=w.device)
    scales = torch.empty(out_f, n_groups, dtype=SCALE_DTYPE, device=w.device)
    zeros = torch.empty(out_f, n_groups, dtype=torch.uint8, device=w.device)
    first = 0
    n_full = in_f // gs
    if spec.observer != "minmax" and n_full > 1:  # the range searches: every full group at once, as rows of one batch
        full = w[:, :n_full * gs].reshape(out_f * n_full, gs)
        cw = None if col_weight is None else col_weight[:n_full * gs].float().reshape(1, n_full, gs).expand(out_f, -1, -1).reshape(-1, gs)
        scale, zero = (t.view(out_f, n_full) for t in find_params(full, spec, cw))
        codes[:, :n_full * gs] = quantize(w[:, :n_full * gs].view(out_f, n_full, gs), scale[..., None], zero[..., None],
                                          spec.maxq).reshape(out_f, -1).to(torch.uint8)
        scales[:, :n_full], zeros[:, :n_full] = scale.to(SCALE_DTYPE), zero.to(torch.uint8)
        first = n_full
    for g in range(first, n_groups):
        cols = slice(g * gs, min((g + 1) * gs, in_f))
        scale, zero = find_params(w[:, cols], spec, None if col_weight is None else col_weight[cols])
        codes[:, cols] = quantize(w[:, cols], scale[:, None], zero[:, None], spec.maxq).to(torch.uint8)
        scales[:, g] = scale.to(SCALE_DTYPE)
        zeros[:, g] = zero.to(torch.uint8)
    return QuantizedWeight(codes, scales, zeros, spec.g_idx(in_f, device=w.device), spec)


def rtn_fake_quantize(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """rtn_quantize(w, spec).dequantize() for the min/max observer, all full groups at once (a search loop's inner
    step, e.g. AWQ's); float32 [out, in]."""
    if spec.observer != "minmax":
        return rtn_quantize(w, spec).dequantize()
    w = w.detach().float()
    out_f, in_f = w.shape
    gs = in_f if spec.group_size == -1 else min(spec.group_size, in_f)
    n_full = in_f // gs
    out = torch.empty_like(w)
    g = w[:, :n_full * gs].reshape(out_f, n_full, gs)
    scale, zero = params_from_range(g.amin(dim=2), g.amax(dim=2), spec)
    out[:, :n_full * gs] = fake_quantize(g, scale[..., None], zero[..., None], spec.maxq).reshape(out_f, -1)
    if n_full * gs < in_f:
        rest = w[:, n_full * gs:]
        scale, zero = params_from_range(rest.amin(dim=1), rest.amax(dim=1), spec)
        out[:, n_full * gs:] = fake_quantize(rest, scale[:, None], zero[:, None], spec.maxq)
    return out
def mse_fake_quantize(w: torch.Tensor, bits: int, sym: bool, *, num: int = 40, norm: float = 2.4) -> torch.Tensor:
    """W_hat of W [rows, cols] on a per-row grid whose range is tuned to minimise sum |w - w_hat|^norm, the
    temporary grid of the OWQ reference (xvyaward/owq quant.py Quantizer.find_params, mse=True, num=40, p=2.4) that
    OWQ's weak-column sensitivity uses: candidate ranges max_range * i / num (i = 1..num); symmetric: scale =
    range / 2^(b-1), codes -2^(b-1)..2^(b-1)-1; asymmetric: range [0, r] shifted by every zero point 0..2^b-1."""
    x = w.detach().float()
    eps = torch.tensor(1e-8, device=x.device)
    zero_t = torch.zeros(x.shape[0], device=x.device)
    xmin, xmax = torch.minimum(x.min(1).values, zero_t), torch.maximum(x.max(1).values, zero_t)
    best = torch.full_like(xmin, float("inf"))
    if sym:
        minq, maxq = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        xrange = torch.maximum(xmin.abs(), xmax)
        best_max = xrange.clone()
        for i in range(1, num + 1):
            tmp_max = xrange / num * i
            scale = torch.maximum(tmp_max / -minq, eps)[:, None]
            score = ((torch.clamp(torch.round(x / scale), minq, maxq) * scale - x).abs() ** norm).mean(1)
            best_max = torch.where(score < best, tmp_max, best_max)
            best = torch.minimum(score, best)
        scale = torch.maximum(best_max / -minq, eps)[:, None]
        return torch.clamp(torch.round(x / scale), minq, maxq) * scale
    maxq = 2 ** bits - 1
    xrange = xmax - xmin
    best_min, best_max = xmin.clone(), xmax.clone()
    for i in range(1, num + 1):
        tmp_max = xrange / num * i
        delta = torch.maximum(tmp_max / maxq, eps)
        x_round = torch.round(x / delta[:, None])
        for zp in range(0, maxq + 1):
            new_min, new_max = -zp * delta, tmp_max - zp * delta
            zero = torch.clamp(-torch.round(new_min / delta), 0, maxq)[:, None]
            score = (((torch.clamp(x_round + zero, 0, maxq) - zero) * delta[:, None] - x).abs() ** norm).mean(1)
            better = score < best
            best_min, best_max = torch.where(better, new_min, best_min), torch.where(better, new_max, best_max)
            best = torch.minimum(best, score)
    lo, hi = torch.minimum(best_min, zero_t), torch.maximum(best_max, zero_t)
    scale = torch.maximum((hi - lo) / maxq, eps)[:, None]
    zero = torch.clamp(-torch.round(lo[:, None] / scale), 0, maxq)
    return (torch.clamp(torch.round(x / scale) + zero, 0, maxq) - zero) * scale


# ---------------------------------------------------------------------------------------------------------------
# Bit packing: little-endian bit streams, 32 values per `bits` int32 words along the last dimension.
# For bits in {2, 4, 8} this is the usual "value j at bits [b*j, b*(j+1)) of word j // (32/b)" layout; for 3 bits
# 32 values span 3 words (the GPTQ layout). The last dimension is zero-padded to a multiple of 32.
# ---------------------------------------------------------------------------------------------------------------
def packed_words(n: int, bits: int) -> int:
    return math.ceil(n / 32) * bits


PACK_CHUNK = 1 << 20  # codes packed per step: the int64 working copies stay a few MB whatever the layer's size


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes [..., n] (0 <= c < 2^bits) into int32 words [..., ceil(n/32)*bits]; rows a chunk at a
    time (an 11008 x 4096 layer would otherwise need three int64 copies of its codes, 1 GB, at once)."""
    *lead, n = codes.shape
    rows = codes.reshape(-1, n)
    step = max(1, PACK_CHUNK // max(n, 1))
    if rows.shape[0] > step:
        out = torch.empty(rows.shape[0], packed_words(n, bits), dtype=torch.int32, device=codes.device)
        for r in range(0, rows.shape[0], step):
            out[r:r + step] = _pack_rows(rows[r:r + step], bits)
        return out.reshape(*lead, -1)
    return _pack_rows(codes, bits)


def _pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    *lead, n = codes.shape
    if 32 % bits and sys.byteorder == "little":
        return _pack_rows_bytes(codes, bits)
    c = codes.to(torch.int64)
    pad = (-n) % 32
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    chunks = c.reshape(*lead, -1, 32)  # [..., C, 32]
    if 32 % bits == 0:
        per = 32 // bits
        v = chunks.reshape(*lead, -1, bits, per)  # word w holds values w*per .. w*per+per-1 of the chunk
        shifts = torch.arange(per, device=c.device, dtype=torch.int64) * bits
        words = (v << shifts).sum(dim=-1)
    else:
        bit_idx = torch.arange(bits, device=c.device, dtype=torch.int64)
        stream = ((chunks.unsqueeze(-1) >> bit_idx) & 1).reshape(*lead, -1, bits, 32)  # [..., C, bits words, 32 bits]
        words = (stream << torch.arange(32, device=c.device, dtype=torch.int64)).sum(dim=-1)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.reshape(*lead, -1).to(torch.int32)


def _pack_rows_bytes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The bit stream by bytes, for widths that do not divide 32 (3, 5, 6, 7): 8 values make one `bits`-byte integer
    (v_0 | v_1 << b | ... | v_7 << 7b), cut into its bytes; a little-endian int32 view of that byte stream is the
    stream's words. Two passes over small integers instead of a 32 x bits int64 bit matrix (5-10x faster)."""
    *lead, n = codes.shape
    pad = (-n) % 32
    wide = torch.int32 if 8 * bits < 32 else torch.int64
    c = codes.to(wide)
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    octets = c.reshape(*lead, -1, 8)
    shifts = torch.arange(8, device=c.device, dtype=wide) * bits
    x = (octets << shifts).sum(dim=-1, dtype=wide)  # [..., n/8], 8 * bits bits each
    byte_shifts = torch.arange(bits, device=c.device, dtype=wide) * 8
    stream = ((x.unsqueeze(-1) >> byte_shifts) & 0xFF).to(torch.uint8)  # [..., n/8, bits] bytes, low byte first
    return stream.reshape(*lead, -1).view(torch.int32)


def _unpack_bytes(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of _pack_rows_bytes: every `bits` bytes of the stream hold 8 values."""
    *lead, nw = words.shape
    wide = torch.int32 if 8 * bits < 32 else torch.int64
    b = words.contiguous().view(torch.uint8).reshape(*lead, -1, bits).to(wide)
    x = (b << (torch.arange(bits, device=b.device, dtype=wide) * 8)).sum(dim=-1, dtype=wide)  # [..., n/8]
    vals = (x.unsqueeze(-1) >> (torch.arange(8, device=b.device, dtype=wide) * bits)) & (2**bits - 1)
    return vals.reshape(*lead, -1)[..., :n].to(torch.uint8)


def unpack_bits(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_bits: int32 words [..., W] -> uint8 codes [..., n]."""
    *lead, nw = words.shape
    if bits in (2, 4, 8) and sys.byteorder == "little":
        # the words' bytes hold the values in order (value j of a word at bits [b*j, b*(j+1))): unpack bytes, 3-4x
        # faster than shifting int32 words (no int32 copy of the codes)
        b = words.contiguous().view(torch.uint8)
        per, mask = 8 // bits, 2**bits - 1
        vals = b if per == 1 else torch.stack([(b >> (bits * i)) & mask for i in range(per)], -1).flatten(-2)
        return vals[..., :n].contiguous()
    if 32 % bits == 0:
        # int32 arithmetic shifts: sign-extended high bits are masked away
        per = 32 // bits
        shifts = torch.arange(per, device=words.device, dtype=torch.int32) * bits
        vals = (words.unsqueeze(-1) >> shifts) & (2**bits - 1)  # [..., W, per]
        return vals.reshape(*lead, -1)[..., :n].to(torch.uint8)
    if sys.byteorder == "little":
        return _unpack_bytes(words, bits, n)
    w = words.to(torch.int64) & 0xFFFFFFFF
    chunks = w.reshape(*lead, -1, bits)  # [..., C, bits]
    stream = (chunks.unsqueeze(-1) >> torch.arange(32, device=w.device, dtype=torch.int64)) & 1  # [..., C, bits, 32]
    stream = stream.reshape(*lead, -1, 32, bits)
    vals = (stream << torch.arange(bits, device=w.device, dtype=torch.int64)).sum(dim=-1).reshape(*lead, -1)
    return vals[..., :n].to(torch.uint8)


# ---------------------------------------------------------------------------------------------------------------
# Options shared by every weight quantizer (RTN, GPTQ, OWQ, QAT, PEQA, ...)
# ---------------------------------------------------------------------------------------------------------------
from dataclasses import dataclass as _dataclass  # noqa: E402

from compress.core.config import MethodConfig, option  # noqa: E402


@_dataclass
class WeightQuantConfig(MethodConfig):
    bits: int = option(4, "weight bits", range=(2, 8))
    group_size: int = option(128, "input columns sharing one scale/zero (a shorter last group where the width is not a "
                                  "multiple); -1: one group per output channel", range=(1, None), special={-1: "per-channel"})
    sym: bool = option(False, "symmetric grid (zero point fixed at 2^(bits-1)) instead of asymmetric min/max")
    signed_scale: bool = option(False, "with --sym: each group's scale takes the sign of its largest-magnitude weight, "
                                       "which lands exactly on the lowest code (ggml's Q4_0/Q5_0 rule: all 2^bits "
                                       "levels used, the grid llama.cpp's own quantizer uses); same layout, the float16 "
                                       "scale may be negative")
    observer: str = option("minmax", "each group's range: minmax; mse (the clip ratio with the least squared error, "
                                     "GPTQ's mse search); act-mse (that error weighted per column by the calibration "
                                     "inputs' mean x^2, the imatrix idea; needs calibration)", choices=OBSERVERS)

    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size, self.sym, self.observer, self.signed_scale)

    def validate(self) -> None:  # here, not in check(): methods override check() without calling it
        if self.signed_scale and not self.sym:
            raise ConfigError("--signed-scale needs --sym (a symmetric grid); an asymmetric grid has a zero point instead")
        super().validate()
