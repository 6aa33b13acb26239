"""Coverage of a compression run: every parameter of every decoder block is either inside a compressed module or
listed as deliberately kept (norms, the MoE router, biases, linears left out by --ignore or by the method), never
silently skipped. Mixture-of-experts weights (transformers 5's fused `experts.gate_up_proj` [E, 2I, D] /
`experts.down_proj` [E, D, I]) are compressed per expert matrix by the methods that declare `handles_experts`
(compress.layers.experts: the recipe splits them into one linear per expert matrix); for any other weight method
they are an error naming them before any work (`refuse_fused_experts`): left in 16 bits they would misreport the
model's size. An expert matrix left in float (--ignore) is listed as a linear not compressed."""
from __future__ import annotations

import re
from typing import Any

import torch.nn as nn

from compress.core.errors import CompressError
from compress.layers.types import compressed_modules
from compress.layers.weights import count_parameters
from compress.model.arch import find_blocks
from compress.model.surgery import is_linear_like
from compress.pipeline.recipe import expert_methods


def _kind(module_name: str, module: nn.Module, pname: str, ndim: int) -> str:
    if "norm" in type(module).__name__.lower() or re.search(r"(^|\.)(\w*norm\w*)$", module_name):
        return "norm"
    if pname == "bias":
        return "bias"
    if re.search(r"(^|\.)(gate|router)$", module_name) and not is_linear_like(module) or \
            re.search(r"(^|\.)router$", module_name):
        return "router"
    if ndim >= 3:
        return "fused experts"
    if is_linear_like(module):
        return "linear not compressed"
    return "other"


def block_coverage(model: nn.Module) -> dict[str, Any]:
    """{"compressed_params": n, "compressed_modules": n, "kept": {kind: [names]}} over the decoder blocks."""
    prefix, blocks = find_blocks(model)
    # a run-time transform around a linear (the online Hadamard) and a container of per-expert linears are not
    # compressed weights themselves: their inner linears count
    compressed = {n: m for n, m in compressed_modules(model).items()
                  if not getattr(m, "is_compress_transform", False) and not getattr(m, "is_container", False)}
    comp_prefixes = tuple(n + "." for n in compressed)
    kept: dict[str, list[str]] = {}
    block_names = tuple(f"{prefix}.{i}." for i in range(len(blocks)))
    n_comp = sum(count_parameters(m) for n, m in compressed.items() if n.startswith(block_names))  # logical weights
    for i, block in enumerate(blocks):
        mods = dict(block.named_modules())
        for pname, p in block.named_parameters():
            full = f"{prefix}.{i}.{pname}"
            if full.startswith(comp_prefixes):
                continue
            owner, _, leaf = pname.rpartition(".")
            kept.setdefault(_kind(owner, mods[owner] if owner in mods else block, leaf, p.dim()), []).append(full)
    return {"compressed_params": n_comp, "compressed_modules": len(compressed), "kept": kept}


def refuse_fused_experts(model: nn.Module, method: str) -> None:
    """Before any work: a run of a weight method that cannot compress experts (`method`) on a model with fused
    expert weights is one clear error."""
    fused = block_coverage(model)["kept"].get("fused experts", [])
    if fused:
        raise CompressError(f"{fused[0]} (and {len(fused) - 1} more) are fused mixture-of-experts weights, which "
                            f"{method} cannot compress; they would silently stay in 16 bits, so the run stops "
                            f"(methods that compress experts: {', '.join(expert_methods())})")


def coverage_summary(cov: dict[str, Any]) -> str:
    """One line: what was compressed and what was kept, by kind."""
    kept = ", ".join(f"{len(v)} {k}" for k, v in sorted(cov["kept"].items()))
    return f"{cov['compressed_modules']} modules compressed ({cov['compressed_params']:,} parameters); kept: {kept or 'nothing'}"
