"""SparseLinear: a pruned linear layer whose weight is stored as a bitmask plus the kept values.

In memory the layer is an ordinary nn.Linear holding its dense weight with exact zeros (CPUs and most GPUs have no
kernel that makes unstructured sparsity faster; a plain matmul is the fastest forward). What it stores - its state
dict, hence every checkpoint - is compressed-tensors' `sparse-bitmask` layout, per weight:
  weight_bitmask     uint8 [out, ceil(in/8)]   bit j of byte k of row r set <=> weight (r, 8k + j) is stored
                                               (numpy.packbits(mask, axis=-1, bitorder="little"))
  weight_compressed  [nnz] weight dtype        the stored values, row-major (weight[mask])
  bias               [out] (optional)
and nothing for the removed weights (compressed-tensors also stores per-row offsets; they follow from the bitmask).
A weight is stored when any of its bits is set, so reloading rebuilds the dense weight bit for bit (a -0.0 included),
even after later stages (GPTQ with a fixed mask, SmoothQuant scales) changed the kept values. `storage_bits()`
counts the bitmask and the stored values.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .sparsity import UNSTRUCTURED

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def pack_bitmask(keep: torch.Tensor) -> torch.Tensor:
    """bool [rows, cols] -> uint8 [rows, ceil(cols/8)], little bit order within each byte."""
    rows, cols = keep.shape
    k = F.pad(keep.to(torch.uint8), (0, (-cols) % 8)).view(rows, -1, 8)
    shifts = torch.arange(8, device=keep.device, dtype=torch.uint8)
    return (k << shifts).sum(dim=2, dtype=torch.uint8)


def unpack_bitmask(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of pack_bitmask: uint8 [rows, ceil(cols/8)] -> bool [rows, cols]."""
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.view(packed.shape[0], -1)[:, :cols].bool()


def stored_mask(weight: torch.Tensor) -> torch.Tensor:
    """bool mask of the weights with any bit set (everything but +0.0)."""
    return weight.detach().contiguous().view(_INT_OF_SIZE[weight.element_size()]) != 0


class SparseLinear(nn.Linear):
    is_compress_linear = True
    module_type = "sparse_linear"

    def __init__(self, in_features: int, out_features: int, *, bias: bool = False, structure: str = UNSTRUCTURED,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__(in_features, out_features, bias=bias, dtype=dtype, device=device)
        self.structure = structure

    def reset_parameters(self) -> None:
        """A fresh layer is empty (every weight pruned); its values come from from_dense or a checkpoint."""
        nn.init.zeros_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, keep: torch.Tensor, bias: torch.Tensor | None = None, *,
                   structure: str = UNSTRUCTURED, dtype: torch.dtype | None = None) -> "SparseLinear":
        """The layer with weight[keep] (cast to `dtype`, default the weight's) and +0.0 everywhere else."""
        dtype = dtype or weight.dtype
        out_f, in_f = weight.shape
        mod = cls(in_f, out_f, bias=bias is not None, structure=structure, dtype=dtype, device=weight.device)
        w = weight.detach().to(dtype)
        mod.weight.data = torch.where(keep.to(w.device, torch.bool), w, torch.zeros((), dtype=dtype, device=w.device))
        if bias is not None:
            mod.bias.data = bias.detach().to(dtype).clone()
        return mod

    # ------------------------------------------------------------------------------------------------------------
    def keep_mask(self) -> torch.Tensor:
        """bool [out, in]: the weights stored (all but the +0.0 ones)."""
        return stored_mask(self.weight)

    @property
    def nnz(self) -> int:
        return int(self.keep_mask().sum())

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / (self.in_features * self.out_features)

    def storage_bits(self) -> int:
        """Bits this layer's weight occupies in storage: the bitmask and the stored values (bias excluded)."""
        return self.out_features * math.ceil(self.in_features / 8) * 8 + self.nnz * self.weight.element_size() * 8

    # ---- what is stored: bitmask + values instead of the dense weight -------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        w = destination.pop(prefix + "weight").detach()
        keep = stored_mask(w)
        destination[prefix + "weight_bitmask"] = pack_bitmask(keep)
        destination[prefix + "weight_compressed"] = w[keep]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        bitmask = state_dict.pop(prefix + "weight_bitmask", None)
        values = state_dict.pop(prefix + "weight_compressed", None)
        if bitmask is not None and values is not None:
            keep = unpack_bitmask(bitmask.to(self.weight.device), self.in_features)
            if int(keep.sum()) != values.numel():
                error_msgs.append(f"{prefix}weight: bitmask marks {int(keep.sum())} weights but {values.numel()} values are stored")
                return
            w = torch.zeros(self.out_features, self.in_features, dtype=values.dtype, device=self.weight.device)
            state_dict[prefix + "weight"] = w.masked_scatter_(keep, values.to(w.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    # ---- native checkpoint format (compress.formats) -----------------------------------------------------------
    def module_config(self) -> dict:
        return {"type": self.module_type, "in_features": self.in_features, "out_features": self.out_features,
                "nnz": self.nnz, "sparsity": round(self.sparsity, 6), "structure": self.structure,
                "bias": self.bias is not None}

    @classmethod
    def from_module_config(cls, cfg: dict, dtype: torch.dtype) -> "SparseLinear":
        return cls(cfg["in_features"], cfg["out_features"], bias=cfg.get("bias", False),
                   structure=cfg.get("structure", UNSTRUCTURED), dtype=dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", {self.structure}, sparsity={self.sparsity:.3f}"


def sparse_keep_mask(module: nn.Module) -> torch.Tensor | None:
    """The keep mask of a layer stored sparse (SparseLinear), else None."""
    return module.keep_mask() if isinstance(module, SparseLinear) else None
