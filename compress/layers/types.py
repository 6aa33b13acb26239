"""The compressed layer types the native checkpoint format writes and rebuilds, by their `module_type`.

Each type owns its description: `module_type` (its name here and in a checkpoint's `quantization_config.modules`),
`module_config()` (what to write) and the class method `from_module_config(cfg, dtype)` (an empty layer of that
shape, about to be loaded). Entries are lazy: naming the types imports none of them.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn as nn

from compress.core.registry import Registry


class CompressedModule(Protocol):
    module_type: str

    def module_config(self) -> dict[str, Any]: ...

    @classmethod
    def from_module_config(cls, cfg: dict[str, Any], dtype: torch.dtype) -> nn.Module: ...


MODULE_TYPES: Registry[type[CompressedModule]] = Registry("module type", {
    "quant_linear": "compress.layers.quant_linear:QuantLinear",
    "owq_linear": "compress.layers.quant_linear:OWQLinear",
    "sparse_linear": "compress.layers.sparse_linear:SparseLinear",
    "sparse_quant_linear": "compress.layers.sparse_linear:SparseQuantLinear",
    "w8a8_linear": "compress.layers.w8a8_linear:W8A8Linear",
    "quant_embedding": "compress.layers.quant_embedding:QuantEmbedding",
    "tied_quant_head": "compress.layers.quant_embedding:TiedQuantHead",
    "online_hadamard": "compress.layers.online_hadamard:OnlineHadamardLinear",
    "split_experts": "compress.layers.experts:SplitExperts",
})


def compressed_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The model's layers of a registered compressed type, by qualified name."""
    return {n: m for n, m in model.named_modules()
            if getattr(m, "module_type", None) in MODULE_TYPES and hasattr(m, "module_config")}
