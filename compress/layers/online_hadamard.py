"""OnlineHadamardLinear: a linear whose input is rotated at run time by a Hadamard transform (QuaRot's online
rotation before the MLP down-projection, Ashkboos et al. 2024, arXiv 2404.00456, section 4.1; SpinQuant's R4).

    y = W x = (W H^T) (H x),   H = (H_m kron H_p) / sqrt(n) orthogonal (compress.kernels.hadamard)

The wrapped `linear` (an nn.Linear, or any quantized linear that replaced it) holds W H^T; the forward applies the
fast transform H x (butterfly over p = 2^k, dense m x m factor) and then the linear. Quantizers see and replace the
inner linear (`<name>.linear`) like any other. The checkpoint records the wrapper in quantization_config.modules
(type `online_hadamard`, with its order and construction), so the project's loader rebuilds it before loading the
inner layer; the matrix itself is rebuilt from its construction (non-persistent).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from compress.core.errors import ModelError
from compress.kernels.hadamard import hadamard_factor, hadamard_matrix, hadamard_transform, require_plan


class OnlineHadamardLinear(nn.Module):
    module_type = "online_hadamard"
    is_compress_transform = True  # a run-time transform around a linear, not itself a compressed weight

    def __init__(self, linear: nn.Module):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.plan = require_plan(self.in_features, f"online Hadamard of width {self.in_features}")
        self.linear = linear
        self.register_buffer("hadamard_factor", hadamard_factor(self.plan), persistent=False)

    @property
    def bias(self):
        return getattr(self.linear, "bias", None)

    def matrix(self) -> torch.Tensor:
        """H (orthogonal, float64), the dense form of the online transform."""
        return hadamard_matrix(self.in_features).double() / self.in_features ** 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(hadamard_transform(x, self.hadamard_factor, self.plan.p))

    @classmethod
    @torch.no_grad()
    def wrap(cls, linear: nn.Linear) -> "OnlineHadamardLinear":
        """Rotate a float linear's input: W <- W H^T, computed in float64, stored in the weight's dtype."""
        if not isinstance(linear, nn.Linear):
            raise ModelError(f"an online Hadamard wraps a float nn.Linear (rotate before quantizing), not {type(linear).__name__}")
        mod = cls(linear)
        w = linear.weight
        w.copy_((w.double() @ mod.matrix().to(w.device).t()).to(w.dtype))
        return mod

    def folded_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The equivalent plain weight W = W' H of the inner weight W' (float32): a dense export without the online
        transform."""
        return (weight.double() @ self.matrix().to(weight.device)).float()

    def module_config(self) -> dict[str, Any]:
        return {"type": self.module_type, "in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "hadamard": self.plan.describe()}

    @classmethod
    def from_module_config(cls, cfg: dict[str, Any], dtype: torch.dtype) -> "OnlineHadamardLinear":
        mod = cls(nn.Linear(int(cfg["in_features"]), int(cfg["out_features"]), bias=bool(cfg.get("bias")), dtype=dtype))
        if cfg.get("hadamard") and cfg["hadamard"] != mod.plan.describe():
            raise ModelError(f"the checkpoint's online Hadamard is {cfg['hadamard']!r}; this version builds "
                             f"{mod.plan.describe()!r} for width {mod.in_features}")
        return mod

    def extra_repr(self) -> str:
        return f"hadamard={self.plan.describe()}"


def online_hadamards(model: nn.Module) -> dict[str, OnlineHadamardLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, OnlineHadamardLinear)}
