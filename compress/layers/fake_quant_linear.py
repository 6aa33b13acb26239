"""FakeQuantLinear: a linear whose weight is fake-quantized on the forward pass (QAT, PEQA, LLM-QAT), exported to
the same packed-integer QuantLinear as RTN/GPTQ (compress.kernels.fake_quant holds the autograd)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from compress.core.errors import ConfigError
from compress.kernels.fake_quant import GroupLayout, _FakeQuant, _ScaledCodes, grad_scale, group_range, stored_scale_ste
from compress.kernels.quant_grid import SCALE_DTYPE, QuantizedWeight, params_from_range, quantize
from compress.layers.quant_linear import QuantLinear

SCALE_MODES = ("fixed", "lsq", "minmax")


# ---------------------------------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------------------------------
class FakeQuantLinear(nn.Module):
    """A linear whose weight is fake-quantized on the forward pass. Build it with `from_quantized`."""

    is_compress_linear = True

    def __init__(self, qw: QuantizedWeight, *, latent: torch.Tensor | None, scale_mode: str = "fixed",
                 learn_scale: bool = False, bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        if scale_mode not in SCALE_MODES:
            raise ConfigError(f"--scale-mode {scale_mode!r} is not allowed; choose one of: {', '.join(SCALE_MODES)}")
        if latent is None and scale_mode == "minmax":
            raise ConfigError("--scale-mode minmax recomputes scales from trainable weights; frozen codes have none")
        spec = qw.spec
        self.spec, self.maxq, self.scale_mode, self.compute_dtype = spec, spec.maxq, scale_mode, dtype
        self.out_features, self.in_features = qw.codes.shape
        self.n_groups = qw.scales.shape[1]
        self.learn_scale = bool(learn_scale) or scale_mode == "lsq"
        self.lsq_gradient_scale = scale_mode == "lsq"  # PEQA trains scales with their plain gradient
        dev = qw.codes.device
        self.register_buffer("g_idx", qw.g_idx.to(torch.int32).clone())
        self.register_buffer("weight_zero", qw.zeros.float().clone())  # [out, G] integer zero points
        scale = qw.scales.float().clone()  # [out, G], float16 values held in float32 (the master copy when trained)
        if self.learn_scale:
            self.weight_scale = nn.Parameter(scale)
        else:
            self.register_buffer("weight_scale", scale)
        if latent is not None:
            self.weight = nn.Parameter(latent.detach().float().clone().to(dev))
            self.register_buffer("weight_codes", None)
        else:
            self.register_parameter("weight", None)
            self.register_buffer("weight_codes", qw.codes.to(torch.uint8).clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype).clone(), requires_grad=False)
        counts = torch.bincount(self.g_idx.long(), minlength=self.n_groups).float().clamp(min=1)  # N_W per group
        self.register_buffer("group_counts", counts)
        self.natural_order = qw.natural_order

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, **kw) -> "FakeQuantLinear":
        return cls(qw, **kw)

    # ---- grid ---------------------------------------------------------------------------------------------------
    def _grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) [out, G] as used in the forward pass: float16-valued scales, integer zeros."""
        if self.scale_mode == "minmax":  # LLM-QAT: MinMax of the current weights, a constant for the gradient
            with torch.no_grad():
                wmin, wmax = group_range(self.weight.detach().float(), self.g_idx, self.n_groups)
                return params_from_range(wmin, wmax, self.spec)
        s = self.weight_scale
        if self.lsq_gradient_scale:
            q_p = (self.maxq - self.weight_zero).clamp(min=1)  # positive levels of each group's grid
            s = grad_scale(s, torch.rsqrt(self.group_counts.unsqueeze(0) * q_p))
        return stored_scale_ste(s), self.weight_zero

    @property
    def layout(self) -> GroupLayout:
        return GroupLayout(self.g_idx, self.n_groups, self.spec.group_size, self.natural_order)

    def fake_weight(self) -> torch.Tensor:
        """W_hat [out, in] float32, differentiable with respect to whatever is trained."""
        s, z = self._grid()
        if self.weight is not None:
            return _FakeQuant.apply(self.weight.float(), s, z, self.layout, self.maxq)
        return _ScaledCodes.apply(s, self.weight_codes, z, self.layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.fake_weight().to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        with torch.no_grad():
            return self.fake_weight().to(dtype or self.compute_dtype)

    # ---- export -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def to_quantized(self) -> QuantizedWeight:
        """The integer codes, float16 scales and zero points the forward pass uses (bit-exact)."""
        s, z = self._grid()
        s, z = s.detach().float(), z.detach().float()
        if self.weight is not None:
            codes = quantize(self.weight.detach().float(), self.layout.expand(s), self.layout.expand(z), self.maxq)
        else:
            codes = self.weight_codes
        return QuantizedWeight(codes.to(torch.uint8), s.to(SCALE_DTYPE), z.to(torch.uint8), self.g_idx.clone(), self.spec)

    def to_quant_linear(self) -> QuantLinear:
        return QuantLinear.from_quantized(self.to_quantized(), self.bias, dtype=self.compute_dtype)

    def trainable(self) -> dict[str, nn.Parameter]:
        out = {}
        if self.weight is not None:
            out["weight"] = self.weight
        if self.learn_scale:
            out["weight_scale"] = self.weight_scale
        return out

    def extra_repr(self) -> str:
        what = "weights" if self.weight is not None else "frozen codes"
        return f"in={self.in_features}, out={self.out_features}, {self.spec.label()}, {what}, scales {self.scale_mode}" + \
            (" (trained)" if self.learn_scale else "")
