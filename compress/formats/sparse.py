"""Sparse checkpoints: pruned linears stored as a bitmask plus their kept values (a layout modelled on
compressed-tensors' sparse-bitmask, read by this project's loader; see compress.layers.sparse_linear), inside the native format.

In the native checkpoint (compress.formats.native) every SparseLinear is listed in `quantization_config.modules` with type
`sparse_linear` (its shape, number of kept values, sparsity and structure) and writes two tensors,
`<layer>.weight_bitmask` (uint8 [out, ceil(in/8)]) and `<layer>.weight_compressed` (the kept values, row-major), in
place of `<layer>.weight`; `quantization_config.sparsity_config` summarises them in compressed-tensors' terms
(`format: sparse-bitmask`, `global_sparsity`, `sparsity_structure`, `targets`). Reloading rebuilds bit-identical
dense weights. A pruned, then quantized linear (SparseGPT with --bits, Wanda then GPTQ) is a `sparse_quant_linear`:
the native quantized tensors, except that `<layer>.weight_packed` gives way to `weight_bitmask` plus
`weight_compressed` (the packed codes that differ from their group's zero point). `--export dense` writes the plain
float folder (zeros included) that any tool loads.
"""
from __future__ import annotations

from typing import Any

import torch.nn as nn

from compress.formats.base import Format
from compress.layers.sparse_linear import SparseLinear, SparseQuantLinear

SPARSE_FORMAT = "sparse-bitmask"


def sparsity_config(modules: dict[str, nn.Module]) -> dict[str, Any] | None:
    """The `sparsity_config` entry of a checkpoint holding sparse linears (None when it holds none)."""
    sparse = {n: m for n, m in modules.items() if isinstance(m, (SparseLinear, SparseQuantLinear))}
    if not sparse:
        return None
    total = sum(m.in_features * m.out_features for m in sparse.values())
    kept = sum(m.nnz for m in sparse.values())
    structures = sorted({m.structure for m in sparse.values()})
    return {
        "format": SPARSE_FORMAT,
        "global_sparsity": round(1 - kept / total, 6),
        "sparsity_structure": structures[0] if len(structures) == 1 else "mixed",
        "targets": sorted(sparse),
        "ignore": [],
    }


class SparseBitmaskFormat(Format):
    name = SPARSE_FORMAT
    summary = "sparse linears in the native format, described by a sparsity_config entry"

    def config_section(self, modules: dict[str, nn.Module]) -> tuple[str, Any] | None:
        value = sparsity_config(modules)
        return None if value is None else ("sparsity_config", value)


FORMAT = SparseBitmaskFormat()
