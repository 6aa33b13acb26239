"""Per-layer shapes: resize a model's parameters in place (structured pruning's removals, and the loader that gives
a freshly built model the per-layer head counts and MLP widths recorded in its config)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from compress.core.errors import ModelError
from compress.model.arch import find_blocks

CONFIG_KEY = "structured_pruning"  # config.json entry holding per-layer shapes (read by compress.formats.structured)


# ---------------------------------------------------------------------------------------------------------------
# Discovery
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Member:
    module: str  # module name, qualified from the model root
    dim: int  # weight dimension the units partition: 0 = output rows (bias too), 1 = input columns
    width: int  # entries along `dim` per unit


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def _sync_shape_attrs(module: nn.Module) -> None:
    w = module.weight
    if isinstance(module, nn.Linear) or (hasattr(module, "in_features") and hasattr(module, "out_features") and w.dim() == 2):
        module.out_features, module.in_features = int(w.shape[0]), int(w.shape[1])
    elif isinstance(module, nn.Embedding):
        module.embedding_dim = int(w.shape[1])
    elif isinstance(module, nn.LayerNorm):
        module.normalized_shape = (int(w.shape[0]),)


def _resize_member(model: nn.Module, member: Member, *, index: torch.Tensor | None = None, size: int | None = None,
                   replaced: dict[int, tuple[nn.Parameter, nn.Parameter]]) -> None:
    """Keep the entries `index` along the member's dimension, or (size) make that dimension `size` long, uninitialised
    (for loading). Parameters shared with other modules (tied embeddings) are replaced once and everywhere."""
    mod = model.get_submodule(member.module)
    for pname, dim in (("weight", member.dim), ("bias", 0)):
        p = getattr(mod, pname, None)
        if not isinstance(p, torch.Tensor) or (pname == "bias" and member.dim != 0):
            continue
        if id(p) not in replaced:
            with torch.no_grad():
                if index is not None:
                    data = p.detach().index_select(dim, index.to(p.device)).clone()
                else:
                    shape = list(p.shape)
                    shape[dim] = size
                    data = torch.empty(shape, dtype=p.dtype, device=p.device)
            # the old parameter stays referenced so that no new tensor can reuse its id
            replaced[id(p)] = (p, nn.Parameter(data, requires_grad=p.requires_grad))
        setattr(mod, pname, replaced[id(p)][1])
    _sync_shape_attrs(mod)


def _retie(model: nn.Module, replaced: dict[int, tuple[nn.Parameter, nn.Parameter]]) -> None:
    """Point every module still holding a replaced parameter (a tied lm_head) to its replacement."""
    for mod in model.modules():
        for pname, p in list(mod.named_parameters(recurse=False)):
            if id(p) in replaced and replaced[id(p)][0] is p:
                setattr(mod, pname, replaced[id(p)][1])
                if pname == "weight":
                    _sync_shape_attrs(mod)


def set_head_counts(attention: nn.Module, heads: int, kv_heads: int) -> None:
    """Update the head-count attributes an attention module's forward reads (LLaMA: num_key_value_groups; OPT:
    num_heads); head_dim never changes."""
    values = {"num_heads": heads, "num_attention_heads": heads, "num_key_value_heads": kv_heads, "num_kv_heads": kv_heads,
              "num_key_value_groups": heads // kv_heads}
    for attr, value in values.items():
        if isinstance(getattr(attention, attr, None), int):
            setattr(attention, attr, value)


def apply_layer_shapes(model: nn.Module, config: dict[str, Any]) -> None:
    """The structured format's load step: give a freshly built (dense-config) model the per-layer shapes of CONFIG_KEY, with
    uninitialised weights about to be loaded."""
    entry = config[CONFIG_KEY]
    if entry.get("version") != 1:
        raise ModelError(f"{CONFIG_KEY} version {entry.get('version')!r} is unknown to this version of compress")
    prefix = entry["blocks"]
    _, blocks = find_blocks(model)
    if len(blocks) != len(entry["layers"]):
        raise ModelError(f"{CONFIG_KEY} lists {len(entry['layers'])} layers, the model has {len(blocks)}")
    hd = int(entry["head_dim"])
    for i, shape in enumerate(entry["layers"]):
        p = f"{prefix}.{i}."
        replaced: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}
        heads, kv_heads, ch = int(shape["heads"]), int(shape["kv_heads"]), int(shape["channels"])
        for n in entry["q_like"]:
            _resize_member(model, Member(p + n, 0, 1), size=heads * hd, replaced=replaced)
        for n in entry["kv"]:
            _resize_member(model, Member(p + n, 0, 1), size=kv_heads * hd, replaced=replaced)
        for n in entry["out"]:
            _resize_member(model, Member(p + n, 1, 1), size=heads * hd, replaced=replaced)
        for n in entry["mlp_in"]:
            _resize_member(model, Member(p + n, 0, 1), size=ch, replaced=replaced)
        for n in entry["mlp_out"]:
            _resize_member(model, Member(p + n, 1, 1), size=ch, replaced=replaced)
        set_head_counts(model.get_submodule(p + entry["attention"]), heads, kv_heads)
        mlp = model.get_submodule(p + _parent(entry["mlp_in"][0])) if _parent(entry["mlp_in"][0]) else None
        if mlp is not None and isinstance(getattr(mlp, "intermediate_size", None), int):
            mlp.intermediate_size = ch
