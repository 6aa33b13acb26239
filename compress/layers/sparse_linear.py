"""SparseLinear: a pruned linear layer whose weight is stored as a bitmask plus the kept values (and
SparseQuantLinear: the same for a pruned, then quantized layer: bitmask plus the codes of the kept weights).

In memory the layer is an ordinary nn.Linear holding its dense weight with exact zeros (CPUs and most GPUs have no
kernel that makes unstructured sparsity faster; a plain matmul is the fastest forward). What it stores - its state
dict, hence every checkpoint - is this project's bitmask layout (modelled on compressed-tensors' `sparse-bitmask`:
same bit order, same `sparsity_config` fields, but its own tensor names and no row offsets, so only this project's
loader reads it; `--export dense` writes a folder any tool loads), per weight:
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

from compress.kernels.masks import UNSTRUCTURED
from compress.kernels.quant_grid import QuantSpec, pack_bits, packed_words, unpack_bits
from compress.layers.quant_linear import QuantLinear

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


class _SparseStored:
    """What both sparse layer types share: counts from their keep mask, and the bitmask's size."""

    in_features: int
    out_features: int

    def keep_mask(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def nnz(self) -> int:
        frozen = self.__dict__.get("frozen_nnz")  # a streamed run's block, its tensors freed after being written
        if frozen is not None and any(t.is_meta for t in [*self.buffers(recurse=False), *self.parameters(recurse=False)]):
            return frozen
        return int(self.keep_mask().sum())

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / (self.in_features * self.out_features)

    def bitmask_bits(self) -> int:
        return self.out_features * math.ceil(self.in_features / 8) * 8


class SparseLinear(_SparseStored, nn.Linear):
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

    def storage_bits(self) -> int:
        """Bits this layer's weight occupies in storage: the bitmask and the stored values (bias excluded)."""
        return self.bitmask_bits() + self.nnz * self.weight.element_size() * 8

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


class SparseQuantLinear(_SparseStored, QuantLinear):
    """A pruned, then quantized linear (SparseGPT's joint 50% + 4-bit, Wanda then GPTQ): a QuantLinear in memory whose
    stored form leaves out the codes of its zero weights (code == zero point, exactly 0 on the grid):
      weight_bitmask     uint8 [out, ceil(in/8)]        bit set <=> the code differs from its group's zero point
      weight_compressed  int32 [ceil(nnz/32) * bits]    those codes, row-major, bit-packed as weight_packed is
    plus weight_scale, weight_zero_point and weight_g_idx as for QuantLinear. Reloading restores every code."""

    module_type = "sparse_quant_linear"

    def __init__(self, *args, structure: str = UNSTRUCTURED, **kwargs):
        super().__init__(*args, **kwargs)
        self.structure = structure

    @classmethod
    def from_quantized(cls, qw, bias=None, dtype=torch.float32, *, structure: str = UNSTRUCTURED) -> "SparseQuantLinear":
        mod = super().from_quantized(qw, bias, dtype)
        mod.structure = structure
        return mod

    def keep_mask(self) -> torch.Tensor:
        """bool [out, in]: the codes stored (those not at their group's zero point)."""
        qw = self.quantized_weight()
        return qw.codes != qw.zeros[:, qw.g_idx.long()]

    def storage_bits(self) -> int:
        dense_codes = self.weight_packed.numel() * 32
        return super().storage_bits() - dense_codes + self.bitmask_bits() + packed_words(self.nnz, self.spec.bits) * 32

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.pop(prefix + "weight_packed")
        keep = self.keep_mask()
        codes = unpack_bits(self.weight_packed, self.spec.bits, self.in_features)
        destination[prefix + "weight_bitmask"] = pack_bitmask(keep)
        destination[prefix + "weight_compressed"] = pack_bits(codes[keep], self.spec.bits)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        bitmask = state_dict.pop(prefix + "weight_bitmask", None)
        packed = state_dict.pop(prefix + "weight_compressed", None)
        if bitmask is not None and packed is not None:
            dev = self.weight_packed.device
            keep = unpack_bitmask(bitmask.to(dev), self.in_features)
            n = int(keep.sum())
            if packed.numel() != packed_words(n, self.spec.bits):
                error_msgs.append(f"{prefix}weight: bitmask marks {n} codes but {packed.numel()} words are stored")
                return
            # zero points first (their own key), then every code not stored is its group's zero point
            zkey = prefix + "weight_zero_point"
            if zkey in state_dict:
                zeros = unpack_bits(state_dict[zkey].to(dev), self.spec.bits, self.out_features).t()
            else:
                zeros = torch.full((self.out_features, self.weight_scale.shape[1]), (self.spec.maxq + 1) // 2, dtype=torch.uint8, device=dev)
            gkey = prefix + "weight_g_idx"
            g_idx = state_dict[gkey].to(dev) if gkey in state_dict else self.spec.g_idx(self.in_features, device=dev)
            codes = zeros[:, g_idx.long()].clone()
            codes[keep] = unpack_bits(packed.to(dev), self.spec.bits, n)
            state_dict[prefix + "weight_packed"] = pack_bits(codes, self.spec.bits)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def module_config(self) -> dict:
        return {**self.quant_config(), "type": self.module_type, "nnz": self.nnz, "sparsity": round(self.sparsity, 6),
                "structure": self.structure}

    @classmethod
    def from_module_config(cls, cfg: dict, dtype: torch.dtype) -> "SparseQuantLinear":
        spec = QuantSpec(cfg["bits"], cfg["group_size"], cfg["sym"])
        return cls(cfg["in_features"], cfg["out_features"], spec, bias=cfg.get("bias", False),
                   has_g_idx=cfg.get("act_order", False), dtype=dtype, structure=cfg.get("structure", UNSTRUCTURED))


def sparse_keep_mask(module: nn.Module) -> torch.Tensor | None:
    """The keep mask of a layer stored sparse (SparseLinear, SparseQuantLinear), else None."""
    return module.keep_mask() if isinstance(module, (SparseLinear, SparseQuantLinear)) else None
