"""Weight-only integer matmul kernels: PyTorch's int4 "tinygemm" and int8 weight-only kernels, and the repacking of
this project's integer grid (compress.kernels.quant_grid) into their run-time layouts.

The grid: w = s * (q - z) per group of input columns (q, z integers in [0, 2^b - 1], s float16).

* int4: `torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, g, scales_and_zeros)` (CPU) and
  `torch.ops.aten._weight_int4pack_mm(...)` (CUDA), the kernel gpt-fast and torchao use. Its convention (read from
  the ATen source and checked numerically in tests/test_weight_only_kernels.py): codes q in [0, 15] packed by
  `_convert_weight_to_int4pack[_for_cpu]`, `scales_and_zeros` [K/g, N, 2] in the activation dtype, and
  w = (q - 8) * scale + zero. So our grid maps exactly with scale = s and zero = s * (8 - z). Any b <= 4 fits (codes
  below 16). The kernel's group g must be 32, 64, 128 or 256 and N a multiple of 16 (CPU), or N a multiple of 8 and
  K of 16 * inner_k_tiles (CUDA); our group size need not equal g: any kernel group g dividing both our group size
  and K lies inside one of our groups (a per-channel grid, or a shorter last group whose width g divides, repeat their
  scale), so the largest such g is chosen.
* int8: `torch.ops.aten._weight_int8pack_mm(x, w_int8 [N, K], scales [N])` = x @ (w_int8 * scales)^T, per output
  channel only. Our 8-bit per-channel grid maps as w_int8 = q - 128 and
  y = x @ (s (q - 128))^T + (sum_k x_k) * s (128 - z), the second term zero for a symmetric grid (z = 128).

Everything else (3- or 4-bit groups no kernel group divides, 8-bit groups, act-order group indices) has no exact
kernel layout; the caller falls back to de-quantization and says so.
"""
from __future__ import annotations

import functools

import torch

from compress.kernels.compiled import compiled_form, compiling
from compress.kernels.cpu import has_cpu_flag
from compress.kernels.quant_grid import dequantize_packed

INT4_KERNEL_GROUPS = (256, 128, 64, 32)  # the group sizes tinygemm accepts, largest first
INNER_K_TILES = 8  # CUDA layout parameter (K must be a multiple of 16 * inner_k_tiles); the CPU layout ignores it


# PyTorch's CPU weight-only kernels are built for few rows: above these many rows (tokens) per call the de-quantized
# float matmul is faster, so such calls take it. bench/int4_crossover.py on SmolLM2's 1536x576 and 576x1536 (RTN g64
# for int4, per channel for int8): on an AVX-512 CPU without AMX (1 thread, bfloat16) the int4 kernel won up to
# ~128-256 rows and lost ~1.4x at 512 (int8 not measured separately there: the int4 limit); on a CPU with AMX-bf16
# (1 and 2 threads, 2026-12-04) int4 wins up to 64 rows (loses 1.5x at 128, 4.8x at 512) and int8 up to 32 (loses 7x
# at 512); in float32 either wins at most at 1 row (int4 loses 56-117x at 512, int8 41x).
_AMX = has_cpu_flag("amx_bf16")  # oneDNN's bf16 GEMM on AMX tiles: ~5x faster there
INT4_CPU_MAX_ROWS = {torch.bfloat16: 64 if _AMX else 256, torch.float16: 256, torch.float32: 1}
INT8_CPU_MAX_ROWS = {torch.bfloat16: 32 if _AMX else 256, torch.float16: 256, torch.float32: 1}
CPU_MAX_ROWS = {"int4": INT4_CPU_MAX_ROWS, "int8": INT8_CPU_MAX_ROWS}


def cpu_max_rows(kernel: str, dtype: torch.dtype) -> int:
    """Most rows per call for which the CPU `kernel` ("int4" | "int8") is used (more: the de-quantization fallback)."""
    return CPU_MAX_ROWS[kernel].get(dtype, 1)


def _has(op: str) -> bool:
    return hasattr(torch.ops.aten, op)


def int4_kernel_group(in_features: int, group_size: int) -> int | None:
    """The largest tinygemm group g that lies within our groups: g | group size (the width, per channel) and g | K."""
    gs = in_features if group_size == -1 else group_size
    for g in INT4_KERNEL_GROUPS:
        if gs % g == 0 and in_features % g == 0:
            return g
    return None


def int4_unsupported(device: torch.device, bits: int, in_features: int, out_features: int, group_size: int,
                     act_order: bool) -> str | None:
    """Why the int4 kernel cannot run this grid exactly on `device` (None: it can)."""
    if bits > 4:
        return f"{bits}-bit codes do not fit the int4 kernel"
    if act_order:
        return "act-order group index (groups not in natural column order)"
    op = "_weight_int4pack_mm_for_cpu" if device.type == "cpu" else "_weight_int4pack_mm"
    if device.type not in ("cpu", "cuda") or not _has(op):
        return f"no int4 kernel ({op}) for device {device.type} in torch {torch.__version__}"
    g = int4_kernel_group(in_features, group_size)
    if g is None:
        return (f"no kernel group of {INT4_KERNEL_GROUPS} divides both the group size {group_size} and the width "
                f"{in_features}")
    if device.type == "cpu" and out_features % 16:
        return f"out_features {out_features} is not a multiple of 16 (CPU int4 layout)"
    if device.type == "cuda" and (out_features % 8 or in_features % (16 * INNER_K_TILES)):
        return f"shape {out_features}x{in_features} does not fit the CUDA int4 layout"
    return None


def int4_pack(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
              ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(packed weight, scales_and_zeros [K/g, N, 2] float32, kernel group g) of a grid with natural groups:
    codes [N, K] (0..15), scales / zeros [N, n_groups] (float16 / integer)."""
    n, k = codes.shape
    g = int4_kernel_group(k, group_size)
    if g is None:
        raise ValueError(f"int4 kernel: no kernel group divides group size {group_size} and width {k}")
    gs = k if group_size == -1 else group_size
    rep = gs // g
    s = scales.float().repeat_interleave(rep, dim=1)[:, : k // g]  # [N, K/g]: each kernel group's own scale
    z = zeros.float().repeat_interleave(rep, dim=1)[:, : k // g]
    sz = torch.stack([s.t(), (s * (8.0 - z)).t()], dim=-1).contiguous()  # zero = s (8 - z): (q - 8) s + zero = s (q - z)
    q = codes.to(torch.int32).contiguous()
    if codes.device.type == "cpu":
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, INNER_K_TILES)
    else:
        u8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)  # CUDA op takes two codes per byte, high nibble first
        packed = torch.ops.aten._convert_weight_to_int4pack(u8, INNER_K_TILES)
    return packed, sz, g


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, group: int, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ W^T through the int4 kernel; scales_and_zeros in x's dtype."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    if x.device.type == "cpu":
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, group, scales_and_zeros)
    else:
        y = torch.ops.aten._weight_int4pack_mm(x2, packed, group, scales_and_zeros)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def int8_unsupported(device: torch.device, bits: int, in_features: int, group_size: int, act_order: bool) -> str | None:
    """Why the int8 weight-only kernel cannot run this grid exactly (None: it can)."""
    if bits != 8:
        return f"{bits}-bit codes are not the int8 kernel's"
    if group_size != -1 and group_size < in_features:
        return f"8-bit groups of {group_size} (the int8 kernel has one scale per output channel)"
    if act_order:
        return "act-order group index"
    if not _has("_weight_int8pack_mm"):
        return f"no _weight_int8pack_mm in torch {torch.__version__}"
    return None


def int8_pack(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(int8 weight q - 128 [N, K], scales [N] float32, zero correction s (128 - z) [N] float32 or None when
    symmetric) of an 8-bit per-channel grid: codes [N, K], scales / zeros [N, 1]."""
    w8 = (codes.to(torch.int16) - 128).to(torch.int8).contiguous()
    s = scales.float().reshape(-1)
    z = zeros.float().reshape(-1)
    corr = s * (128.0 - z)
    return w8, s.contiguous(), (corr.contiguous() if bool((z != 128).any()) else None)


def int8_matmul_weight_only(x: torch.Tensor, w8: torch.Tensor, scales: torch.Tensor,
                            correction: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] @ (s (q - z))^T through _weight_int8pack_mm; scales (and correction) in x's dtype."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.ops.aten._weight_int8pack_mm(x2, w8, scales)
    if correction is not None:
        y = (y.float() + x2.float().sum(dim=-1, keepdim=True) * correction.float()).to(y.dtype)
    return y.reshape(*x.shape[:-1], y.shape[-1])


# ---------------------------------------------------------------------------------------------------------------
# Compiled de-quantization (the fallback's unpack-and-scale as one fused loop per layer shape)
# ---------------------------------------------------------------------------------------------------------------
# the form torch.compile fuses (bit-identical to the in-place eager one; on the CPU ~2x faster for SmolLM2's shapes)
_FUSED_DEQUANT = functools.partial(dequantize_packed, inplace=False)


def packed_dequantizer():
    """dequantize_packed, or its compiled form inside `compress.kernels.compiled.compiled_kernels()`."""
    return compiled_form(_FUSED_DEQUANT) if compiling() else dequantize_packed
