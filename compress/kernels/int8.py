"""Real int8 arithmetic: absmax int8 quantization and the int8 x int8 -> int32 matmul.

* `absmax_scale` / `quantize_int8`: symmetric int8 with scale max|x| / 127 per row, per tensor, ... (SmoothQuant,
  arXiv 2211.10438, eq. 1: X_int8 = round(X / Delta), Delta = max|X| / (2^(N-1) - 1)).
* `int8_matmul(a, b)`: a [M, K] int8 times b [N, K] int8 transposed -> [M, N] int32, with `torch._int_mm` where the
  device offers it (probed once per device type), else an exact fallback: float32 matmuls over chunks of at most
  1024 columns (every partial sum is an integer of magnitude <= 1024 * 128 * 128 = 2^24, so float32 holds it
  exactly), accumulated in int32. Both give bit-identical integers.
* `onednn_scaled_matmul(a, packed, w_scale)`: on CPU, oneDNN's int8 GEMM (`torch.ops.onednn.qlinear_pointwise`, the op
  PyTorch's x86 inductor lowering uses; native on AMX-int8 CPUs) with the per-output-channel weight
  scale applied inside the kernel: float32 float(a @ b^T) * w_scale, bit-identical to `int8_matmul(a, b).float() *
  w_scale` (probed once). `b` is prepacked once by `onednn_pack` (a run-time copy in oneDNN's layout). Used only on
  CPUs with AMX-int8: without AMX, oneDNN has no native kernel for signed int8 activations and runs its reference
  implementation, thousands of times slower than torch._int_mm (compress.kernels.cpu).
"""
from __future__ import annotations

import torch

from compress.kernels.cpu import has_cpu_flag

INT8_MAX = 127


_EXACT_CHUNK = 1024  # columns per float32 partial product: |sum| <= 1024 * 128 * 128 = 2^24, exact in float32


_INT_MM_OK: dict[str, bool] = {}
_ONEDNN_OK: list[bool] = []


def absmax_scale(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Delta = max|x| / 127 (float32) over `dim` (kept), or over the whole tensor when dim is None; never zero."""
    x = x.detach().float()
    amax = x.abs().amax() if dim is None else x.abs().amax(dim=dim, keepdim=True)
    return (amax / INT8_MAX).clamp(min=torch.finfo(torch.float32).tiny)


def quantize_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """round(x / scale) clamped to the int8 range [-128, 127] (the range compressed-tensors and vLLM use)."""
    return torch.clamp(torch.round(x.float() / scale), -128, 127).to(torch.int8)


def quantize_activations(x2: torch.Tensor, static_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """W8A8's activation codes of x2 [T, in]: (int8 codes, Delta_x) with Delta_x [T, 1] from each token's abs-max
    (dynamic; |x| and its max are exact in any float dtype, so they run in x's own dtype) or the static [1] scale.
    The out-of-place form, which torch.compile fuses into one loop (compress.kernels.compiled)."""
    sx = static_scale if static_scale is not None else \
        (x2.abs().amax(dim=1, keepdim=True).float() / INT8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    return torch.div(x2, sx).round().clamp(-128, 127).to(torch.int8), sx


def quantize_activations_(x2: torch.Tensor, static_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_activations with in-place steps (fewer temporaries when eager): the same bits."""
    sx = static_scale if static_scale is not None else \
        (x2.abs().amax(dim=1, keepdim=True).float() / INT8_MAX).clamp_(min=torch.finfo(torch.float32).tiny)
    return torch.div(x2, sx).round_().clamp_(-128, 127).to(torch.int8), sx


def rescale_rows(y: torch.Tensor, sx: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """y [T, N] float32 (the product already times Delta_w) times Delta_x, plus the bias, rounded once to `dtype`.
    The out-of-place form for torch.compile."""
    y = y * sx
    return (y if bias is None else y + bias.float()).to(dtype)


def rescale_rows_(y: torch.Tensor, sx: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """rescale_rows in place where eager (the last scale and the cast in one pass without a bias): the same bits."""
    if bias is not None:
        return y.mul_(sx).add_(bias.float()).to(dtype)
    return torch.mul(y, sx, out=torch.empty(y.shape, dtype=dtype, device=y.device))


# ---------------------------------------------------------------------------------------------------------------
# int8 x int8 -> int32
# ---------------------------------------------------------------------------------------------------------------
def int_mm_supported(device: torch.device | str) -> bool:
    """Whether torch._int_mm runs on this device type and gives exact results (probed once per device type)."""
    dev = torch.device(device)
    if dev.type not in _INT_MM_OK:
        ok = False
        if hasattr(torch, "_int_mm"):
            try:
                g = torch.Generator().manual_seed(0)
                a = torch.randint(-128, 128, (32, 64), dtype=torch.int8, generator=g)
                b = torch.randint(-128, 128, (64, 32), dtype=torch.int8, generator=g)
                got = torch._int_mm(a.to(dev), b.to(dev)).cpu()
                ok = bool(torch.equal(got, (a.long() @ b.long()).to(torch.int32)))
            except (RuntimeError, NotImplementedError, TypeError):
                ok = False
        _INT_MM_OK[dev.type] = ok
    return _INT_MM_OK[dev.type]


def _int_mm_shape_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch._int_mm's shape rules: anything on CPU; on CUDA M > 16 and K, N multiples of 8."""
    if a.device.type == "cpu":
        return True
    m, k = a.shape
    n = b.shape[0]
    return m > 16 and k % 8 == 0 and n % 8 == 0


def int8_matmul_fallback(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [M, K] int8 @ b [N, K]^T -> [M, N] int32, exactly, without integer kernels (see the module docstring)."""
    m, k = a.shape
    out = torch.zeros(m, b.shape[0], dtype=torch.int32, device=a.device)
    for s in range(0, k, _EXACT_CHUNK):
        part = a[:, s:s + _EXACT_CHUNK].float() @ b[:, s:s + _EXACT_CHUNK].float().t()
        out += part.to(torch.int32)
    return out


def int8_matmul(a: torch.Tensor, b: torch.Tensor, *, use_int_mm: bool | None = None) -> torch.Tensor:
    """a [M, K] int8 @ b [N, K]^T -> [M, N] int32: torch._int_mm where supported, else the exact fallback."""
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"int8_matmul needs int8 operands, got {a.dtype} and {b.dtype}")
    if use_int_mm is None:
        use_int_mm = int_mm_supported(a.device) and _int_mm_shape_ok(a, b)
    if use_int_mm:
        return torch._int_mm(a, b.t())
    return int8_matmul_fallback(a, b)


# ---------------------------------------------------------------------------------------------------------------
# oneDNN int8 GEMM with the weight scale fused (CPU)
# ---------------------------------------------------------------------------------------------------------------
def onednn_pack(b: torch.Tensor) -> torch.Tensor:
    """b [N, K] int8 -> oneDNN's prepacked weight for `onednn_scaled_matmul`."""
    return torch.ops.onednn.qlinear_prepack(b, None)


def onednn_scaled_matmul(a: torch.Tensor, packed: torch.Tensor, w_scale: torch.Tensor,
                         zeros: torch.Tensor | None = None) -> torch.Tensor:
    """a [M, K] int8 times the packed b [N, K]^T, times w_scale [N] (float32) -> [M, N] float32. `zeros`: the
    weight's zero points [N] int64 (all zero; a caller calling often passes its own, made once)."""
    if zeros is None:
        zeros = torch.zeros(w_scale.numel(), dtype=torch.int64)
    return torch.ops.onednn.qlinear_pointwise(a, 1.0, 0, packed, w_scale, zeros, None, 1.0, 0, torch.float32,
                                              "none", [], "")


def onednn_int8_supported() -> bool:
    """Whether oneDNN's int8 GEMM has a native kernel here (a CPU with AMX-int8) and equals the exact int8 product
    times the weight scale, bit for bit (probed once, on odd shapes and the full int8 range)."""
    if not _ONEDNN_OK:
        ok = False
        if has_cpu_flag("amx_int8") and hasattr(torch.ops, "onednn") and hasattr(torch.ops.onednn, "qlinear_pointwise") \
                and torch.backends.mkldnn.is_available():
            try:
                g = torch.Generator().manual_seed(0)
                a = torch.randint(-128, 128, (7, 200), dtype=torch.int8, generator=g)
                b = torch.randint(-128, 128, (40, 200), dtype=torch.int8, generator=g)
                ws = torch.rand(40, generator=g) * 0.01
                got = onednn_scaled_matmul(a, onednn_pack(b), ws)
                ok = bool(torch.equal(got, int8_matmul_fallback(a, b).float() * ws))
            except (RuntimeError, NotImplementedError, TypeError, AttributeError):
                ok = False
        _ONEDNN_OK.append(ok)
    return _ONEDNN_OK[0]
