"""QuantLinear: a linear layer stored as packed integer codes + float16 scales (+ packed zero points, + group index).

Weight-only quantization. `select_kernel()` (called when a model is loaded or a method finishes; see
compress.layers.kernels) picks how the forward pass computes: PyTorch's int4 kernel (codes of <= 4 bits in groups a
kernel group divides) or int8 weight-only kernel (8-bit per channel), fed from a run-time repacking of the codes
(non-persistent buffers: the checkpoint does not change); else, or before any selection, the weight is de-quantized
on the fly and multiplied in float. `kernel` says which, and why. Memory and checkpoints hold the packed integers;
`storage_bits()` counts every stored bit.
Buffers (the project's native layout, written as-is into safetensors):
  weight_packed     int32 [out, ceil(in/32)*bits]        codes, bit-packed along the input dimension
  weight_scale      float16 [out, n_groups]
  weight_zero_point int32 [n_groups, ceil(out/32)*bits]  asymmetric only (symmetric zero is 2^(bits-1)); packed
                                                         along the output dimension, as GPTQ's qzeros are
  weight_g_idx      int32 [in]                           only when groups are not in natural order (act-order)
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from compress.kernels.quant_grid import (
    SCALE_DTYPE,
    QuantizedWeight,
    QuantSpec,
    dequantize_codes,
    pack_bits,
    packed_words,
    unpack_bits,
)
from compress.kernels.weight_only import (
    cpu_max_rows,
    int4_matmul,
    int4_pack,
    int4_unsupported,
    int8_matmul_weight_only,
    int8_pack,
    int8_unsupported,
    packed_dequantizer,
)

FALLBACK = "dequantize-on-the-fly"


class QuantLinear(nn.Module):
    is_compress_linear = True
    module_type = "quant_linear"  # its entry in compress.layers.types.MODULE_TYPES (the native format's "type")

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, *, bias: bool = False,
                 has_g_idx: bool = False, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        self.code_features = in_features  # input columns that have codes (OWQLinear keeps some in float instead)
        self.compute_dtype = dtype
        n_groups = spec.groups(in_features)
        self.register_buffer("weight_packed", torch.zeros(out_features, packed_words(in_features, spec.bits), dtype=torch.int32, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, n_groups, dtype=SCALE_DTYPE, device=device))
        if not spec.sym:
            self.register_buffer("weight_zero_point", torch.zeros(n_groups, packed_words(out_features, spec.bits), dtype=torch.int32, device=device))
        else:
            self.weight_zero_point = None
        if has_g_idx:
            self.register_buffer("weight_g_idx", spec.g_idx(in_features, device=device))
        else:
            self.weight_g_idx = None
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        self._kernel: str | None = None  # "int4" | "int8" | None (de-quantize)
        self._kernel_device: torch.device | None = None
        self.kernel_reason = "no kernel selected yet"
        self.register_load_state_dict_post_hook(lambda mod, _keys: mod._codes_changed())

    # ------------------------------------------------------------------------------------------------------------
    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> "QuantLinear":
        out_f, in_f = qw.codes.shape
        natural = qw.natural_order
        mod = cls(in_f, out_f, qw.spec, bias=bias is not None, has_g_idx=not natural, dtype=dtype, device=qw.codes.device)
        mod.weight_packed.copy_(pack_bits(qw.codes, qw.spec.bits))
        mod.weight_scale.copy_(qw.scales.to(SCALE_DTYPE))
        if not qw.spec.sym:
            mod.weight_zero_point.copy_(pack_bits(qw.zeros.t(), qw.spec.bits))
        elif not torch.all(qw.zeros == (qw.spec.maxq + 1) // 2):
            raise ValueError("symmetric quantization needs every zero point at 2^(bits-1)")
        if not natural:
            mod.weight_g_idx.copy_(qw.g_idx.to(torch.int32))
        if bias is not None:
            mod.bias.data.copy_(bias.detach().to(dtype))
        return mod

    def quantized_weight(self) -> QuantizedWeight:
        spec = self.spec
        n_groups = self.weight_scale.shape[1]
        codes = unpack_bits(self.weight_packed, spec.bits, self.code_features)
        if spec.sym:
            zeros = torch.full((self.out_features, n_groups), (spec.maxq + 1) // 2, dtype=torch.uint8, device=codes.device)
        else:
            zeros = unpack_bits(self.weight_zero_point, spec.bits, self.out_features).t()
        g_idx = self.weight_g_idx if self.weight_g_idx is not None else spec.g_idx(self.code_features, device=codes.device)
        return QuantizedWeight(codes, self.weight_scale, zeros, g_idx, spec)

    def warm_compiled(self) -> None:
        """Compile this shape's de-quantization now (compress.kernels.compiled.warm_compiled_kernels)."""
        self.dequantize_weight()

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        if self.weight_g_idx is None:  # natural groups: straight from the packed words (compiled where enabled)
            return packed_dequantizer()(self.weight_packed, self.weight_zero_point, self.weight_scale, self.spec.bits,
                                        self.code_features, self.out_features, self.spec.group_size,
                                        dtype or self.compute_dtype)
        qw = self.quantized_weight()
        return dequantize_codes(qw.codes, qw.scales, qw.zeros, qw.g_idx, self.spec.group_size).to(dtype or self.compute_dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (read-only view for code that inspects `.weight`)."""
        return self.dequantize_weight()

    # ------------------------------------------------------------------------------------------------------------
    # Kernels
    # ------------------------------------------------------------------------------------------------------------
    def kernel_unsupported(self, device: torch.device | None = None) -> dict[str, str | None]:
        """Why each integer kernel cannot run this layer exactly on `device` ({"int4": reason or None, "int8": ...})."""
        device = torch.device(device or self.weight_packed.device)
        act = self.weight_g_idx is not None
        return {"int4": int4_unsupported(device, self.spec.bits, self.code_features, self.out_features,
                                         self.spec.group_size, act),
                "int8": int8_unsupported(device, self.spec.bits, self.code_features, self.spec.group_size, act)}

    def select_kernel(self, enable: bool = True) -> str:
        """Choose (and prepare) the integer kernel this layer runs on its device, or the de-quantization fallback;
        returns `kernel` (its description). Re-run after the codes or the device change (done automatically)."""
        for name in ("_k_packed", "_k_scales", "_k_zeros"):
            if name in self._buffers:
                del self._buffers[name]
        self._kernel, self._kernel_device = None, self.weight_packed.device
        reasons = self.kernel_unsupported()
        if not enable:
            self.kernel_reason = "integer kernels disabled"
            return self.kernel
        kind = "int4" if reasons["int4"] is None else "int8" if reasons["int8"] is None else None
        if kind is None:
            self.kernel_reason = reasons["int4"] if self.spec.bits <= 4 else reasons["int8"]
            return self.kernel
        qw = self.quantized_weight()
        if kind == "int4":
            packed, sz, self._kernel_group = int4_pack(qw.codes, qw.scales, qw.zeros, self.spec.group_size)
            scales32, zeros32 = sz, None
        else:
            packed, scales32, zeros32 = int8_pack(qw.codes, qw.scales, qw.zeros)
        self.register_buffer("_k_packed", packed, persistent=False)
        self.register_buffer("_k_scales", scales32.to(self.compute_dtype), persistent=False)
        if zeros32 is not None:
            self.register_buffer("_k_zeros", zeros32.to(self.compute_dtype), persistent=False)
        self._kernel, self.kernel_reason = kind, ""
        return self.kernel

    @property
    def kernel(self) -> str:
        """How this layer computes (evals.efficiency reads it)."""
        rows = (f"; calls of more than {cpu_max_rows(self._kernel, self.compute_dtype)} rows de-quantize, which is "
                "faster there" if self._kernel is not None and self._kernel_device.type == "cpu" else "")
        if self._kernel == "int4":
            op = "_weight_int4pack_mm_for_cpu" if self._kernel_device.type == "cpu" else "_weight_int4pack_mm"
            return (f"quantized: int4 weight-only kernel {op} (kernel group {self._kernel_group}; "
                    f"{self._dtype_name()} inputs{rows})")
        if self._kernel == "int8":
            return (f"quantized: int8 weight-only kernel _weight_int8pack_mm (per channel; {self._dtype_name()} "
                    f"inputs{rows})")
        return f"{FALLBACK}: codes unpacked to the compute dtype every forward, then a float matmul ({self.kernel_reason})"

    def _dtype_name(self) -> str:
        return str(self.compute_dtype).replace("torch.", "")

    def _codes_changed(self) -> None:
        if self._kernel is not None:
            self.select_kernel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel is not None and x.device != self._kernel_device:
            self.select_kernel()  # moved to another device: its layout is device-specific
        # the kernel form is prepared for the compute dtype; another input dtype, or a forward that needs gradients
        # (the kernels have no backward), takes the de-quantized path
        if (self._kernel is not None and x.dtype == self._k_scales.dtype
                and not (x.requires_grad and torch.is_grad_enabled())
                and not (x.device.type == "cpu"
                         and x.numel() // max(x.shape[-1], 1) > cpu_max_rows(self._kernel, x.dtype))):
            if self._kernel == "int4":
                y = int4_matmul(x, self._k_packed, self._kernel_group, self._k_scales)
            else:
                y = int8_matmul_weight_only(x, self._k_packed, self._k_scales, self._buffers.get("_k_zeros"))
            return y if self.bias is None else y + self.bias.to(x.dtype)
        w = self.dequantize_weight(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    # ------------------------------------------------------------------------------------------------------------
    def storage_bits(self) -> int:
        """Bits this layer's weight occupies in storage: codes, scales, zero points and group index (bias excluded)."""
        n = self.weight_packed.numel() * 32 + self.weight_scale.numel() * 16
        if self.weight_zero_point is not None:
            n += self.weight_zero_point.numel() * 32
        if self.weight_g_idx is not None:
            n += self.weight_g_idx.numel() * 32
        return n

    def module_config(self) -> dict:
        return {"type": self.module_type, **self.quant_config()}

    @classmethod
    def from_module_config(cls, cfg: dict, dtype: torch.dtype) -> "QuantLinear":
        spec = QuantSpec(cfg["bits"], cfg["group_size"], cfg["sym"])
        return cls(cfg["in_features"], cfg["out_features"], spec, bias=cfg.get("bias", False),
                   has_g_idx=cfg.get("act_order", False), dtype=dtype)

    def quant_config(self) -> dict:
        return {"bits": self.spec.bits, "group_size": self.spec.group_size, "sym": self.spec.sym,
                "act_order": self.weight_g_idx is not None, "in_features": self.in_features,
                "out_features": self.out_features, "bias": self.bias is not None}

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.spec.label()}, g_idx={self.weight_g_idx is not None}"


class OWQLinear(QuantLinear):
    """OWQ's mixed-precision linear (Lee et al. 2023, arXiv 2306.02272): k "weak" input columns kept in float16, the
    other in_features - k columns quantized exactly as a QuantLinear over those columns (natural order, their own
    groups). Buffers, in addition to QuantLinear's (which describe the [out, in - k] quantized part):
      weak_idx     int32 [k]          sorted input columns kept in 16 bits
      weak_weight  float16 [out, k]   their values (after GPTQ's error feedback from the quantized columns)
    The full weight is W[:, rest] = dequant(codes), W[:, weak_idx] = weak_weight, rest = the other columns in order.
    """
    module_type = "owq_linear"


    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, n_weak: int, *, bias: bool = False,
                 has_g_idx: bool = False, dtype: torch.dtype = torch.float32, device=None):
        if not 0 <= n_weak < in_features:
            raise ValueError(f"OWQLinear: {n_weak} weak columns out of {in_features} input columns")
        super().__init__(in_features - n_weak, out_features, spec, bias=bias, has_g_idx=has_g_idx, dtype=dtype, device=device)
        self.in_features = in_features  # logical width; code_features = in_features - n_weak
        self.register_buffer("weak_idx", torch.arange(n_weak, dtype=torch.int32, device=device))
        self.register_buffer("weak_weight", torch.zeros(out_features, n_weak, dtype=torch.float16, device=device))

    @property
    def n_weak(self) -> int:
        return self.weak_idx.numel()

    @classmethod
    def from_parts(cls, qw: QuantizedWeight, weak_idx: torch.Tensor, weak_weight: torch.Tensor,
                   bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> "OWQLinear":
        """qw: the codes of the non-weak columns [out, in - k]; weak_weight [out, k] for the sorted weak_idx."""
        out_f, n_q = qw.codes.shape
        k = weak_idx.numel()
        mod = cls(n_q + k, out_f, qw.spec, k, bias=bias is not None, has_g_idx=not qw.natural_order, dtype=dtype,
                  device=qw.codes.device)
        inner = QuantLinear.from_quantized(qw, bias, dtype=dtype)
        mod.load_state_dict({**inner.state_dict(), "weak_idx": weak_idx.to(torch.int32),
                             "weak_weight": _to_float16(weak_weight)}, strict=True)
        return mod

    def quant_columns(self) -> torch.Tensor:
        """Indices of the quantized input columns, in order."""
        mask = torch.ones(self.in_features, dtype=torch.bool, device=self.weak_idx.device)
        mask[self.weak_idx.long()] = False
        return torch.nonzero(mask).flatten()

    def warm_compiled(self) -> None:
        """Compile this shape's de-quantization now (compress.kernels.compiled.warm_compiled_kernels)."""
        self.dequantize_weight()

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        part = super().dequantize_weight(torch.float32)
        w = torch.empty(self.out_features, self.in_features, dtype=torch.float32, device=part.device)
        w[:, self.quant_columns()] = part
        w[:, self.weak_idx.long()] = self.weak_weight.float()
        return w.to(dtype or self.compute_dtype)

    def storage_bits(self) -> int:
        return super().storage_bits() + self.weak_weight.numel() * 16 + self.weak_idx.numel() * 32

    def kernel_unsupported(self, device: torch.device | None = None) -> dict[str, str | None]:
        why = f"OWQ: {self.n_weak} float16 weak columns interleaved with the codes"
        return {"int4": why, "int8": why}

    def quant_config(self) -> dict:
        return {**super().quant_config(), "in_features": self.in_features, "n_weak": self.n_weak}

    @classmethod
    def from_module_config(cls, cfg: dict, dtype: torch.dtype) -> "OWQLinear":
        spec = QuantSpec(cfg["bits"], cfg["group_size"], cfg["sym"])
        return cls(cfg["in_features"], cfg["out_features"], spec, cfg["n_weak"], bias=cfg.get("bias", False),
                   has_g_idx=cfg.get("act_order", False), dtype=dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", weak={self.n_weak} fp16 columns"


def _to_float16(w: torch.Tensor) -> torch.Tensor:
    fmax = torch.finfo(torch.float16).max
    return w.detach().float().clamp(-fmax, fmax).to(torch.float16)


