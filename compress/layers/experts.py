"""Mixture-of-experts weights, one matrix per expert.

transformers 5 stores the experts of Mixtral, Qwen2/3-MoE and DeepSeek-style models as fused 3-D parameters:
`experts.gate_up_proj` [E, 2I, D] (gate rows then up rows, concatenated) and `experts.down_proj` [E, D, I], run by
a loop over the experts the router picked. `SplitExperts` holds the same weights as one linear per expert matrix —
`gate_up.{e}` [2I, D] and `down.{e}` [D, I] — and runs the same loop, so every weight method of the project sees an
expert matrix as an ordinary linear: its forward hooks receive exactly the tokens routed to that expert (the
statistics of GPTQ, Wanda, SparseGPT come from those tokens), and its compressed replacement (QuantLinear,
SparseLinear, ...) is saved and reloaded by its own registered type. `SplitExperts` itself is a container
(`is_container`): its checkpoint entry records the shape and activation, each expert matrix has its own entry.

`fused_to_split(model)` replaces every fused experts module of the standard layout (concatenated gate/up, not
transposed, no biases) by a SplitExperts holding views of the same tensors (no copy); any other fused layout is one
clear error naming it. `split_to_fused(module)` stacks float weights back into the fused parameters (dense export).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from compress.core.errors import CompressError

FUSED_NAMES = ("gate_up_proj", "down_proj")


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers-5 experts module: 3-D float `gate_up_proj` and `down_proj` parameters."""
    return all(isinstance(getattr(module, n, None), torch.Tensor) and getattr(module, n).dim() == 3 for n in FUSED_NAMES)


def fused_experts_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The model's fused experts modules by qualified name."""
    return {n: m for n, m in model.named_modules() if n and is_fused_experts(m)}


def _unsupported_layout(name: str, module: nn.Module) -> str | None:
    for attr, want in (("is_concatenated", True), ("is_transposed", False), ("has_bias", False), ("has_gate", True),
                       ("has_post_expert_norm", False)):
        if getattr(module, attr, want) != want:
            return f"{attr}={getattr(module, attr)}"
    extra = [p for p, _ in module.named_parameters(recurse=True) if p not in FUSED_NAMES]
    if extra:
        return f"extra parameter {name}.{extra[0]}"
    E, two_i, D = module.gate_up_proj.shape
    if module.down_proj.shape != (E, D, two_i // 2) or two_i % 2:
        return f"down_proj {tuple(module.down_proj.shape)} does not match gate_up_proj {tuple(module.gate_up_proj.shape)}"
    return None


class SplitExperts(nn.Module):
    module_type = "split_experts"  # its entry in compress.layers.types.MODULE_TYPES
    is_container = True  # its children are the compressed (or float) layers; it compresses nothing itself

    def __init__(self, num_experts: int, hidden_dim: int, intermediate_dim: int, hidden_act: str, *,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        from transformers.activations import ACT2FN

        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden_dim, intermediate_dim
        self.hidden_act = hidden_act
        self.act_fn = ACT2FN[hidden_act]
        self.gate_up = nn.ModuleList(nn.Linear(hidden_dim, 2 * intermediate_dim, bias=False, dtype=dtype, device=device)
                                     for _ in range(num_experts))
        self.down = nn.ModuleList(nn.Linear(intermediate_dim, hidden_dim, bias=False, dtype=dtype, device=device)
                                  for _ in range(num_experts))

    @classmethod
    def from_fused(cls, name: str, module: nn.Module, hidden_act: str | None = None) -> "SplitExperts":
        why = _unsupported_layout(name, module)
        if why is not None:
            raise CompressError(f"{name} ({type(module).__name__}): fused experts layout not supported ({why}); "
                                "supported: concatenated gate/up [E, 2I, D], down [E, D, I], no biases")
        act = hidden_act or getattr(getattr(module, "config", None), "hidden_act", None)
        if act is None:
            raise CompressError(f"{name} ({type(module).__name__}): no hidden_act on the module's config")
        E, two_i, D = module.gate_up_proj.shape
        gu, dn = module.gate_up_proj.data, module.down_proj.data
        new = cls(E, D, two_i // 2, act, dtype=gu.dtype, device="meta")
        for e in range(E):  # views of the fused tensors: no copy
            new.gate_up[e].weight = nn.Parameter(gu[e], requires_grad=False)
            new.down[e].weight = nn.Parameter(dn[e], requires_grad=False)
        return new

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """transformers' eager experts loop (MixtralExperts.forward), one linear per expert matrix."""
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            hit = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)
            experts = torch.greater(hit.sum(dim=(-1, -2)), 0).nonzero().flatten().tolist()
        for e in experts:
            top_k_pos, token_idx = torch.where(hit[e])
            gate, up = self.gate_up[e](hidden_states[token_idx]).chunk(2, dim=-1)
            h = self.down[e](self.act_fn(gate) * up)
            h = h * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, h.to(out.dtype))
        return out

    def module_config(self) -> dict[str, Any]:
        return {"type": self.module_type, "num_experts": self.num_experts, "hidden_dim": self.hidden_dim,
                "intermediate_dim": self.intermediate_dim, "hidden_act": self.hidden_act}

    @classmethod
    def from_module_config(cls, cfg: dict[str, Any], dtype: torch.dtype) -> "SplitExperts":
        # float children allocated empty; the checkpoint's entries for compressed expert matrices replace them
        return cls(cfg["num_experts"], cfg["hidden_dim"], cfg["intermediate_dim"], cfg["hidden_act"], dtype=dtype)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, hidden={self.hidden_dim}, intermediate={self.intermediate_dim}, act={self.hidden_act}"


def fused_to_split(model: nn.Module) -> list[str]:
    """Replace every fused experts module by a SplitExperts (views, no copy). Returns the names replaced."""
    from compress.model.surgery import set_module

    mods = fused_experts_modules(model)
    act = getattr(getattr(model, "config", None), "hidden_act", None)
    for name, mod in mods.items():
        set_module(model, name, SplitExperts.from_fused(name, mod, getattr(getattr(mod, "config", None), "hidden_act", act)))
    return list(mods)


class FusedExpertWeights(nn.Module):
    """The fused parameters alone (what a transformers folder stores for an experts module): dense export."""

    def __init__(self, gate_up_proj: torch.Tensor, down_proj: torch.Tensor):
        super().__init__()
        self.gate_up_proj = nn.Parameter(gate_up_proj, requires_grad=False)
        self.down_proj = nn.Parameter(down_proj, requires_grad=False)


def split_to_fused(module: SplitExperts, weight_of, dtype: torch.dtype) -> FusedExpertWeights:
    """Stack each expert matrix's float weight (`weight_of(linear)`) back into [E, 2I, D] and [E, D, I]."""
    gu = torch.stack([weight_of(m).detach().to(dtype) for m in module.gate_up])
    dn = torch.stack([weight_of(m).detach().to(dtype) for m in module.down])
    return FusedExpertWeights(gu, dn)
