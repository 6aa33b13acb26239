"""The W8A8 linear layer (int8 weights and activations, int32 products; the arithmetic is compress.kernels.int8).

* `W8A8Linear`: int8 weights per output channel or per tensor (float16 scales; SmoothQuant's O1-O3 use per-tensor
  weight scales), int8 activations per token (dynamic, scale from
  each token's abs-max at run time) or per tensor (static, scale calibrated on the calibration set), the product in
  int32, rescaled to float: (acc * Delta_w) * Delta_x. Stored as it runs: `weight` int8 [out, in], `weight_scale`
  float16 [out, 1] ([1, 1] per tensor), `input_scale` float32 [1] (static only), `bias` in the compute dtype.
  On CPU, calls of at least ONEDNN_MIN_ROWS rows run the product in oneDNN's int8 GEMM with Delta_w fused
  (compress.kernels.int8.onednn_scaled_matmul; its prepacked weight is a run-time copy, rebuilt when `weight`
  changes), other calls torch._int_mm or the exact fallback; all give the same bits.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from compress.kernels.compiled import compiled_form, compiling
from compress.kernels.int8 import (INT8_MAX, absmax_scale, int8_matmul, onednn_int8_supported, onednn_pack,
                                   onednn_scaled_matmul, quantize_activations, quantize_activations_, quantize_int8,
                                   rescale_rows, rescale_rows_)
from compress.kernels.quant_grid import SCALE_DTYPE, round_scale

ACT_SCHEMES = ("per-token", "per-tensor")
# oneDNN's int8 GEMM pays only for long calls: on SmolLM2's shapes (AMX CPU, 2 threads, 2026-12-04) it halved the
# 1536 x 576 layer at 512 rows (1.60 vs 3.28 ms) and tied torch._int_mm elsewhere from 4 to 512 rows, but one row
# through the 192 x 576 layer took 1.45 ms against 0.05: so calls of fewer rows (decode) keep torch._int_mm
ONEDNN_MIN_ROWS = 256
WEIGHT_SCHEMES = ("per-channel", "per-tensor")


# ---------------------------------------------------------------------------------------------------------------
# The W8A8 linear layer
# ---------------------------------------------------------------------------------------------------------------
class W8A8Linear(nn.Module):
    """y = (int8(x) @ int8(W)^T in int32) * Delta_x * Delta_w (+ bias). See the module docstring."""

    is_compress_linear = True
    module_type = "w8a8_linear"

    def __init__(self, in_features: int, out_features: int, *, act_scheme: str = "per-token", bias: bool = False,
                 dtype: torch.dtype = torch.float32, device=None, weight_scheme: str = "per-channel"):
        super().__init__()
        if act_scheme not in ACT_SCHEMES:
            raise ValueError(f"activation scheme {act_scheme!r}: use one of {ACT_SCHEMES}")
        if weight_scheme not in WEIGHT_SCHEMES:
            raise ValueError(f"weight scheme {weight_scheme!r}: use one of {WEIGHT_SCHEMES}")
        self.in_features, self.out_features, self.act_scheme = in_features, out_features, act_scheme
        self.weight_scheme = weight_scheme
        self.compute_dtype = dtype
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        n_scales = out_features if weight_scheme == "per-channel" else 1
        self.register_buffer("weight_scale", torch.ones(n_scales, 1, dtype=SCALE_DTYPE, device=device))
        if act_scheme == "per-tensor":
            self.register_buffer("input_scale", torch.ones(1, dtype=torch.float32, device=device))
        else:
            self.input_scale = None
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, *, act_scheme: str = "per-token",
                   input_absmax: float | torch.Tensor | None = None, dtype: torch.dtype | None = None,
                   weight_scheme: str = "per-channel") -> "W8A8Linear":
        """Quantize W [out, in] per output channel or per tensor (absmax / 127, scale rounded to float16 first, then
        the codes); a per-tensor activation scheme needs the calibrated input abs-max."""
        out_f, in_f = weight.shape
        dtype = dtype or weight.dtype
        mod = cls(in_f, out_f, act_scheme=act_scheme, bias=bias is not None, dtype=dtype, device=weight.device,
                  weight_scheme=weight_scheme)
        w_scale = round_scale(absmax_scale(weight, dim=1) if weight_scheme == "per-channel" else
                              absmax_scale(weight.reshape(1, -1), dim=1))  # [out, 1] or [1, 1], values as stored
        mod.weight.copy_(quantize_int8(weight, w_scale))
        mod.weight_scale.copy_(w_scale.to(SCALE_DTYPE))
        if act_scheme == "per-tensor":
            if input_absmax is None:
                raise ValueError("a per-tensor (static) activation scale needs the calibrated input abs-max")
            amax = torch.as_tensor(input_absmax, dtype=torch.float32).max().reshape(1)
            mod.input_scale.copy_((amax / INT8_MAX).clamp(min=torch.finfo(torch.float32).tiny))
        if bias is not None:
            mod.bias.data.copy_(bias.detach().to(dtype))
        return mod

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return (self.weight.float() * self.weight_scale.float()).to(dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        # the elementwise steps: eager in place, or fused by torch.compile inside compiled_kernels() (the same bits)
        fused = compiling()
        quantize = compiled_form(quantize_activations, dynamic=True) if fused else quantize_activations_
        rescale = compiled_form(rescale_rows, dynamic=True) if fused else rescale_rows_
        xq, sx = quantize(x2, self.input_scale)  # x / Delta in float32, round, clamp, int8
        if x2.device.type == "cpu" and x2.shape[0] >= ONEDNN_MIN_ROWS and onednn_int8_supported():
            y = onednn_scaled_matmul(xq, *self._onednn_weight())
        else:
            acc = int8_matmul(xq, self.weight)  # [T, out] int32
            # in place, in the oneDNN path's order: 5x faster than int32 * float on CPU
            y = acc.float().mul_(self.weight_scale.float().t())
        return rescale(y, sx, self.bias, x.dtype).reshape(*x.shape[:-1], self.out_features)

    def warm_compiled(self) -> None:
        """Compile the activation quantization and the rescale now (compress.kernels.compiled.warm_compiled_kernels):
        one call of ONEDNN_MIN_ROWS rows."""
        self(torch.zeros(ONEDNN_MIN_ROWS, self.in_features, dtype=self.compute_dtype, device=self.weight.device))

    def __getstate__(self):  # copies and pickles leave the packed run-time copy out (an opaque oneDNN tensor)
        return {k: v for k, v in self.__dict__.items() if k not in ("_onednn_packed", "_onednn_key")}

    def _onednn_weight(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """oneDNN's prepacked copy of `weight`, with the weight scales as the float32 [out] vector it reads and its
        zero points: made on first use and again whenever `weight` or `weight_scale` has changed."""
        key = (self.weight.data_ptr(), self.weight._version, self.weight_scale.data_ptr(), self.weight_scale._version)
        if getattr(self, "_onednn_key", None) != key:
            scale = self.weight_scale.float().reshape(-1).expand(self.out_features).contiguous()
            zeros = torch.zeros(self.out_features, dtype=torch.int64, device=self.weight.device)
            self._onednn_packed, self._onednn_key = (onednn_pack(self.weight), scale, zeros), key
        return self._onednn_packed

    # ------------------------------------------------------------------------------------------------------------
    def storage_bits(self) -> int:
        """int8 codes, float16 weight scales, and the float32 static input scale where there is one (bias excluded)."""
        n = self.weight.numel() * 8 + self.weight_scale.numel() * 16
        return n + (32 if self.input_scale is not None else 0)

    def module_config(self) -> dict:
        return {"type": self.module_type, "in_features": self.in_features,
                "out_features": self.out_features, "bias": self.bias is not None, "act_scheme": self.act_scheme,
                **({} if self.weight_scheme == "per-channel" else {"weight_scheme": self.weight_scheme})}

    @classmethod
    def from_module_config(cls, cfg: dict, dtype: torch.dtype) -> "W8A8Linear":
        return cls(cfg["in_features"], cfg["out_features"], act_scheme=cfg["act_scheme"], bias=cfg.get("bias", False), dtype=dtype,
                   weight_scheme=cfg.get("weight_scheme", "per-channel"))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, w8 {self.weight_scheme}, a8 {self.act_scheme}"
