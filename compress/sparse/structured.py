"""Structured pruning machinery: the dependency groups of a decoder model, per-group importance, physically removing
attention heads / MLP channels / hidden channels, and the config that describes the smaller model.

Discovery (LLM-Pruner, Ma et al. 2023, arXiv 2305.11627, Sec. 3.1) is read off the traced data flow of each block
(compress.model.arch.trace_block: linears in call order, the ones reading the same tensor grouped) plus the config's head
counts, not off a table of layer names:
  * attention: the first reader group (q, k, v: three linears of widths H*d, KV*d, KV*d) and the writer that reads
    their attention output (o: in_features H*d). A KV head j couples rows [j*d, (j+1)*d) of k and v, the rows of its
    H/KV query heads in q (repeat_kv serves query head h from KV head h // (H/KV)) and the same query heads' columns
    of o. `gqa="kv"` removes such whole KV groups; `gqa="query"` removes query heads only, the same number from every
    KV group (k and v stay), so every KV head keeps an equal share of query heads and GQA stays consistent.
  * MLP: the next reader group (gate, up, or OPT's fc1) and the writer reading their product (down / fc2): channel c
    couples row c of every reader (and its bias) with column c of the writer.
  * hidden channels (the paper's "channel" strategy): channel c of the residual stream couples column c of the
    embedding (and of an untied lm_head), entry c of every norm on the stream, column c of every reader and row c of
    every writer. Only for models whose config states the attention width apart from the hidden size (LLaMA family).

A `Coupled` is all units of one kind in one place (the 3 KV groups of block 5, the 1536 MLP channels of block 5):
unit u of every member is one dependency group. Members are (module, weight dimension, width per unit); a member
sliced along its output dimension takes its bias along.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

from compress.core.errors import CompressError
from compress.kernels.losses import lm_loss
from compress.model.arch import find_blocks, is_norm, trace_block
from compress.model.shapes import (
    CONFIG_KEY,
    Member,
    _parent,
    _resize_member,
    _retie,
    apply_layer_shapes,
    set_head_counts,
)
from compress.pipeline.engine import Engine

log = logging.getLogger("compress")

AGGREGATIONS = ("sum", "prod", "max", "last")


@dataclass
class Coupled:
    """`units` dependency groups of one kind: unit u of every member is removed (or kept) together."""

    kind: str  # "attention" | "mlp" | "hidden"
    block: int | None  # block index (None: hidden channels span the model)
    units: int
    members: list[Member]  # in execution order; the last one is the group's output (aggregation "last")
    per_kv: int = 1  # attention with gqa="query": units are query heads, `per_kv` consecutive ones share a KV head

    def unit_cost(self, model: nn.Module) -> int:
        """Parameters one unit holds (each distinct parameter counted once)."""
        seen: set[int] = set()
        total = 0
        for m in self.members:
            mod = model.get_submodule(m.module)
            for p, dim in _member_params(mod, m.dim):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                total += p.numel() // p.shape[dim] * m.width
        return total


@dataclass
class BlockLayout:
    """The prunable structure of one decoder block (module names relative to the block)."""

    attention: str  # the attention module (common parent of q, k, v, o)
    q: str
    kv: list[str]  # k, v (empty when q, k, v cannot be told apart: multi-head attention, all three in `q_like`)
    q_like: list[str]  # linears sliced per query head (q; or q, k, v under multi-head attention)
    out: list[str]  # o_proj / out_proj
    heads: int
    kv_heads: int
    head_dim: int
    mlp_in: list[str]  # gate, up / fc1
    mlp_out: list[str]  # down / fc2
    channels: int
    norms: list[str] = field(default_factory=list)  # norms producing the readers' inputs (hidden strategy)

    def names(self) -> dict[str, Any]:
        return {"attention": self.attention, "q": self.q, "kv": self.kv, "q_like": self.q_like, "out": self.out,
                "mlp_in": self.mlp_in, "mlp_out": self.mlp_out, "head_dim": self.head_dim}


def head_dim_of(config: Any) -> int:
    hd = getattr(config, "head_dim", None)
    return int(hd) if hd else int(config.hidden_size) // int(config.num_attention_heads)


def _linear(block: nn.Module, name: str) -> nn.Module:
    return block.get_submodule(name)


def _unsupported(block: nn.Module, why: str, groups: list[list[str]]) -> CompressError:
    shown = " | ".join(",".join(g) for g in groups)
    return CompressError(f"{type(block).__name__}: {why} (traced linears: {shown}); structured pruning knows blocks "
                         "of the form q,k,v | o | gate,up (or fc1) | down (LLaMA family, OPT)")


def block_layout(block: nn.Module, hidden: torch.Tensor, kwargs: dict, config: Any) -> BlockLayout:
    """Trace one block and read its attention and MLP dependency structure."""
    graph = trace_block(block, hidden, kwargs)
    groups = graph.input_groups
    if len(groups) != 4:
        raise _unsupported(block, f"expected 4 groups of linears reading the same tensor, found {len(groups)}", groups)
    (attn_in, attn_out, mlp_in, mlp_out) = groups
    lin = lambda n: _linear(block, n)  # noqa: E731
    width = int(config.hidden_size) if hasattr(config, "hidden_size") else lin(attn_in[0]).in_features
    head_dim = head_dim_of(config)
    # Attention: three readers of the normed stream; the writer reads the attention output (width H*d).
    if len(attn_in) != 3 or len(attn_out) != 1:
        raise _unsupported(block, "the first reader group is not q,k,v followed by one output projection", groups)
    outs = [lin(n).out_features for n in attn_in]
    o_in = lin(attn_out[0]).in_features
    if any(o % head_dim for o in outs) or o_in % head_dim:
        raise _unsupported(block, f"attention widths {outs} are not multiples of head_dim {head_dim}", groups)
    q_cands = [n for n, o in zip(attn_in, outs) if o == o_in]
    heads = o_in // head_dim
    others = [n for n in attn_in if n not in q_cands]
    if len(q_cands) == 3:  # multi-head attention: q, k, v all sliced per head
        q, kv, q_like, kv_heads = q_cands[0], [], list(attn_in), heads
    elif len(q_cands) == 1 and len(others) == 2 and lin(others[0]).out_features == lin(others[1]).out_features:
        q, kv, q_like = q_cands[0], others, [q_cands[0]]
        kv_heads = lin(others[0]).out_features // head_dim
        if heads % kv_heads:
            raise _unsupported(block, f"{heads} query heads do not split evenly over {kv_heads} KV heads", groups)
    else:
        raise _unsupported(block, f"cannot tell q from k, v by their widths {outs} (attention output {o_in})", groups)
    parent = _parent(q)
    if any(_parent(n) != parent for n in attn_in + attn_out):
        raise _unsupported(block, "q, k, v and o are not in one attention module", groups)
    # MLP: readers of equal width, the writer reads that width and writes the stream.
    widths = {lin(n).out_features for n in mlp_in}
    if len(widths) != 1 or len(mlp_out) != 1 or lin(mlp_out[0]).in_features != next(iter(widths)):
        raise _unsupported(block, "the MLP readers and writer do not share one intermediate width", groups)
    for n in attn_out + mlp_out:
        if lin(n).out_features != width:
            raise _unsupported(block, f"{n} does not write the hidden stream of width {width}", groups)
    norms = [graph.producers.get(g[0]) for g in (attn_in, mlp_in)]
    return BlockLayout(attention=parent, q=q, kv=kv, q_like=q_like, out=list(attn_out), heads=heads, kv_heads=kv_heads,
                       head_dim=head_dim, mlp_in=list(mlp_in), mlp_out=list(mlp_out), channels=next(iter(widths)),
                       norms=[n for n in norms if n])


def discover(model: nn.Module) -> tuple[str, list[BlockLayout]]:
    """(block path, layout of every block), from one traced forward pass per block on a short random sequence."""
    prefix, blocks = find_blocks(model)
    hidden, kwargs = Engine(model, None).synthetic_block_input()
    layouts = [block_layout(b, hidden, kwargs, model.config) for b in blocks]
    first = layouts[0].names()
    for i, lay in enumerate(layouts):
        if lay.names() != first:
            raise CompressError(f"block {i} of {type(model).__name__} is built differently from block 0; "
                                "structured pruning needs blocks of one structure")
    return prefix, layouts


def attention_coupled(prefix: str, index: int, lay: BlockLayout, gqa: str = "kv") -> Coupled:
    """The head groups of one block's attention. gqa="kv": a unit is a KV head with its query heads (multi-head
    attention: one head); gqa="query": a unit is one query head (q rows, o columns), k and v untouched."""
    p = f"{prefix}.{index}."
    d, g = lay.head_dim, lay.heads // lay.kv_heads
    if gqa == "query" and lay.kv:
        members = [Member(p + lay.q, 0, d), Member(p + lay.out[0], 1, d)]
        return Coupled("attention", index, lay.heads, members, per_kv=g)
    if gqa not in ("kv", "query"):
        raise CompressError(f"gqa mode {gqa!r} is not one of: kv, query")
    members = [Member(p + n, 0, g * d) for n in lay.q_like] + [Member(p + n, 0, d) for n in lay.kv]
    members.append(Member(p + lay.out[0], 1, g * d))
    return Coupled("attention", index, lay.kv_heads, members)


def mlp_coupled(prefix: str, index: int, lay: BlockLayout) -> Coupled:
    p = f"{prefix}.{index}."
    members = [Member(p + n, 0, 1) for n in lay.mlp_in] + [Member(p + n, 1, 1) for n in lay.mlp_out]
    return Coupled("mlp", index, lay.channels, members)


def hidden_coupled(model: nn.Module, prefix: str, layouts: list[BlockLayout]) -> Coupled:
    """Every parameter on the residual stream, channel by channel (the paper's channel strategy)."""
    hidden = int(model.config.hidden_size)
    emb = model.get_input_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    members = [Member(names[id(emb)], 1, 1)]
    for i, lay in enumerate(layouts):
        p = f"{prefix}.{i}."
        if len(lay.norms) != 2:
            raise CompressError("channel structure: a block's attention or MLP input does not come from a norm; "
                                "use --structure block")
        members += [Member(p + lay.norms[0], 0, 1)] + [Member(p + n, 1, 1) for n in lay.q_like + lay.kv]
        members += [Member(p + n, 0, 1) for n in lay.out]
        members += [Member(p + lay.norms[1], 0, 1)] + [Member(p + n, 1, 1) for n in lay.mlp_in]
        members += [Member(p + n, 0, 1) for n in lay.mlp_out]
    block_params = {id(p) for p in model.get_submodule(prefix).parameters()}
    for name, mod in model.named_modules():
        if name.startswith(prefix + ".") or mod is emb:
            continue
        if is_norm(mod) and mod.weight.shape[0] == hidden:
            members.append(Member(name, 0, 1))
    out = model.get_output_embeddings()
    if out is not None and out.weight is not emb.weight:
        members.append(Member(names[id(out)], 1, 1))
    covered = {id(p) for m in members for p, _ in _member_params(model.get_submodule(m.module), m.dim)}
    loose = [n for n, p in model.named_parameters() if id(p) not in covered and id(p) not in block_params]
    if loose:
        raise CompressError(f"channel structure: {', '.join(loose[:3])} also hold hidden-size channels this "
                            f"structure does not know how to cut; use --structure block")
    return Coupled("hidden", None, hidden, members)


# ---------------------------------------------------------------------------------------------------------------
# Importance (LLM-Pruner Sec. 3.2)
# ---------------------------------------------------------------------------------------------------------------
def _member_params(module: nn.Module, dim: int) -> list[tuple[nn.Parameter, int]]:
    """(parameter, sliced dimension) of a member: the weight along `dim`, and the bias when rows are sliced."""
    out = [(module.weight, dim)]
    bias = getattr(module, "bias", None)
    if dim == 0 and isinstance(bias, torch.Tensor):
        out.append((bias, 0))
    return out


def _per_unit(t: torch.Tensor, dim: int, units: int) -> torch.Tensor:
    """[units, rest]: the entries of t belonging to each unit (units are consecutive blocks along dim)."""
    return t.movedim(dim, 0).reshape(units, -1)


Salience = Callable[[str, nn.Parameter], torch.Tensor]  # (parameter name, parameter) -> per-element salience


def unit_scores(model: nn.Module, coupled: Coupled, salience: Salience, level: str = "element") -> torch.Tensor:
    """[members, units] importance of each unit in each member. level "element": sum of |salience| over the member's
    entries of the unit (eq. 4, element-wise); "vector": |sum of salience| over them (eq. 3, the member as a vector)."""
    names = {id(p): n for n, p in model.named_parameters()}
    rows = []
    for m in coupled.members:
        mod = model.get_submodule(m.module)
        signed = torch.zeros(coupled.units, dtype=torch.float64)
        absolute = torch.zeros(coupled.units, dtype=torch.float64)
        for p, dim in _member_params(mod, m.dim):
            s = _per_unit(salience(names[id(p)], p).double(), dim, coupled.units)
            signed += s.sum(1)
            absolute += s.abs().sum(1)
        rows.append(absolute if level == "element" else signed.abs())
    return torch.stack(rows)


def aggregate(scores: torch.Tensor, how: str = "sum") -> torch.Tensor:
    """Group importance from its members' (LLM-Pruner Sec. 3.2, "aggregation"): summation, product (compared in log
    space: the same order without underflow), max, or the last member only."""
    if how == "sum":
        return scores.sum(0)
    if how == "prod":
        return torch.log(scores.clamp_min(1e-300)).sum(0)
    if how == "max":
        return scores.max(0).values
    if how == "last":
        return scores[-1]
    raise CompressError(f"aggregation {how!r} is not one of: {', '.join(AGGREGATIONS)}")


def choose_keep(scores: torch.Tensor, coupled: Coupled, remove: int) -> torch.Tensor:
    """Sorted unit indices to keep: the least important `remove` units go; with per_kv > 1 (query heads), `remove`
    is per KV group and each KV group drops its own least important query heads."""
    g = coupled.per_kv
    if remove <= 0:
        return torch.arange(coupled.units)
    if g > 1:
        per = scores.view(-1, g)
        keep = per.argsort(dim=1, descending=True, stable=True)[:, : g - remove].sort(dim=1).values
        return (keep + torch.arange(per.shape[0])[:, None] * g).flatten()
    return scores.argsort(descending=True, stable=True)[: coupled.units - remove].sort().values


# ---------------------------------------------------------------------------------------------------------------
# Gradients (first-order Taylor terms and the diagonal Fisher)
# ---------------------------------------------------------------------------------------------------------------
def lm_gradients(model: nn.Module, input_ids: torch.Tensor, params: dict[str, nn.Parameter], *, fisher: bool = False,
                 device: torch.device | str = "cpu", batch_tokens: int = 4096, progress: bool = True
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """Mean gradient of the next-token loss over the sequences (float32), and with `fisher` the diagonal empirical
    Fisher, the mean of squared per-sequence gradients (LLM-Pruner eq. 5: H_kk ~ sum_j (dL(D_j)/dW_k)^2 / N)."""
    from tqdm.auto import tqdm

    n, seqlen = input_ids.shape
    bs = 1 if fisher else max(1, min(n, batch_tokens // max(1, seqlen)))
    flags = {id(p): p.requires_grad for p in model.parameters()}
    was_training = model.training
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    grad = {k: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for k, p in params.items()}
    fish = {k: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for k, p in params.items()} if fisher else None
    model.eval()  # no dropout: the gradients of the model as it will run
    try:
        for s in tqdm(range(0, n, bs), desc="gradients", unit="batch", disable=not progress, leave=False):
            ids = input_ids[s:s + bs].to(device)
            loss = lm_loss(model, {"input_ids": ids})
            loss.backward()
            share = ids.shape[0] / n
            for k, p in params.items():
                g = p.grad.float()
                grad[k].add_(g, alpha=share)
                if fish is not None:
                    fish[k].add_(g * g, alpha=1.0 / n)
                p.grad = None
    finally:
        for p in model.parameters():
            p.requires_grad_(flags.get(id(p), False))
            p.grad = None
        model.train(was_training)
    return grad, fish


# ---------------------------------------------------------------------------------------------------------------
# Removing units
# ---------------------------------------------------------------------------------------------------------------
def unit_index(units: torch.Tensor, width: int) -> torch.Tensor:
    """Entry indices along a dimension of the given units (each `width` consecutive entries)."""
    units = torch.as_tensor(units, dtype=torch.long)
    return (units[:, None] * width + torch.arange(width)[None, :]).flatten()


def _after_resize(model: nn.Module, coupled: Coupled, kept: int, prefix: str, layouts: list[BlockLayout] | None) -> None:
    if coupled.kind == "attention" and layouts is not None:
        lay = layouts[coupled.block]
        block = model.get_submodule(f"{prefix}.{coupled.block}")
        q = block.get_submodule(lay.q)
        heads = q.out_features // lay.head_dim
        kv_heads = block.get_submodule(lay.kv[0]).out_features // lay.head_dim if lay.kv else heads
        set_head_counts(block.get_submodule(lay.attention), heads, kv_heads)
        lay.heads, lay.kv_heads = heads, kv_heads
    elif coupled.kind == "mlp" and layouts is not None:
        lay = layouts[coupled.block]
        lay.channels = kept
        mlp = model.get_submodule(f"{prefix}.{coupled.block}.{_parent(lay.mlp_in[0])}") if _parent(lay.mlp_in[0]) else None
        if mlp is not None and isinstance(getattr(mlp, "intermediate_size", None), int):
            mlp.intermediate_size = kept


def remove_units(model: nn.Module, coupled: Coupled, keep: torch.Tensor, *, prefix: str = "",
                 layouts: list[BlockLayout] | None = None) -> None:
    """Physically keep only the units `keep` (sorted) in every member; update head counts and the layouts."""
    keep = torch.as_tensor(keep, dtype=torch.long)
    if coupled.per_kv > 1 and len(keep) % (coupled.units // coupled.per_kv):
        raise CompressError("query heads must be removed in equal numbers from every KV group")
    replaced: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}
    for m in coupled.members:
        _resize_member(model, m, index=unit_index(keep, m.width), replaced=replaced)
    _retie(model, replaced)
    _after_resize(model, coupled, len(keep), prefix, layouts)


@torch.no_grad()
def zero_units(model: nn.Module, coupled: Coupled, units: Iterable[int]) -> None:
    """Set the weights of the given units to zero in every member (the reference a removal must equal)."""
    units = torch.as_tensor(list(units), dtype=torch.long)
    for m in coupled.members:
        mod = model.get_submodule(m.module)
        for p, dim in _member_params(mod, m.dim):
            p.index_fill_(dim, unit_index(units, m.width).to(p.device), 0.0)


# ---------------------------------------------------------------------------------------------------------------
# Allocation: how many units to remove so that the whole model loses `ratio` of its parameters
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Allocation:
    attention_remove: int  # units removed per pruned attention (KV groups, or query heads per KV group)
    mlp_remove: int  # channels removed per pruned MLP
    target: int  # parameters to remove
    planned: int  # parameters the plan removes
    inner_ratio: float  # share of the prunable parameters (the pruned blocks' attention + MLP) removed


def _steps(co: Coupled) -> int:
    """How many removal steps an attention has: its units, or (query heads) the query heads per KV group."""
    return co.per_kv if co.per_kv > 1 else co.units


def allocate(ratio: float, total_params: int, attention: list[tuple[Coupled, int]], mlp: list[tuple[Coupled, int]],
             accept: Callable[[int], bool] | None = None, round_to: int = 1) -> Allocation:
    """LLM-Pruner prunes every selected block by the same ratio (local pruning). Here the ratio applies to the whole
    model: the prunable blocks lose rho of their attention units (rounded: heads are coarse) and MLP channels take up
    the rest, so that exactly `ratio` of the total parameter count goes. `attention`/`mlp`: (coupled, unit cost).
    `accept(steps)`: whether removing that many attention steps is allowed (the nearest allowed count is taken);
    `round_to`: the kept MLP width is a multiple of it (matrix kernels run faster on aligned widths)."""
    target = int(round(ratio * total_params))
    a_steps = _steps(attention[0][0]) if attention else 0  # removal steps per attention
    a_cost = sum(c * co.units // _steps(co) for co, c in attention)  # parameters one step removes over all of them
    prunable = sum(co.units * c for co, c in attention) + sum(co.units * c for co, c in mlp)
    if prunable == 0:
        raise CompressError("nothing is left to prune: every block is kept")
    rho = target / prunable
    if rho >= 0.95:
        raise CompressError(f"--ratio {ratio} would remove {100 * rho:.0f}% of the prunable parameters (the pruned "
                            f"blocks hold {prunable:,} of {total_params:,}); lower --ratio or prune more blocks")
    m_cost = sum(c for _, c in mlp)
    m_units = mlp[0][0].units if mlp else 0
    options = [a for a in range(a_steps) if accept is None or accept(a)] if attention else [0]
    # nearest to the common ratio first; the MLPs must be able to take up the rest
    for a_remove in sorted(options, key=lambda a: (abs(a - rho * a_steps), a)):
        m_remove = int(round((target - a_remove * a_cost) / m_cost)) if mlp else 0
        if mlp and round_to > 1 and m_units > round_to:
            m_remove = m_units - max(round_to, int(round((m_units - m_remove) / round_to)) * round_to)
        if 0 <= m_remove < max(1, m_units):
            break
    else:
        raise CompressError(f"--ratio {ratio}: no split between head groups ({a_steps} per block) and MLP channels "
                            f"removes {target:,} parameters from the pruned blocks; choose another --ratio")
    planned = int(a_remove * a_cost + m_remove * m_cost)
    return Allocation(a_remove, m_remove, target, planned, planned / prunable)


# ---------------------------------------------------------------------------------------------------------------
# Config: a standard one when every block has the same shape, else per-layer shapes for this project's loader
# ---------------------------------------------------------------------------------------------------------------
_CONFIG_NAMES = {"heads": ("num_attention_heads", "n_head"), "kv_heads": ("num_key_value_heads",),
                 "channels": ("intermediate_size", "ffn_dim", "n_inner"), "hidden": ("hidden_size",)}


def layer_shapes(layouts: list[BlockLayout]) -> list[dict[str, int]]:
    return [{"heads": lay.heads, "kv_heads": lay.kv_heads, "channels": lay.channels} for lay in layouts]


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in model.state_dict().items()}


def config_updates(model: nn.Module, values: dict[str, int], head_dim: int) -> dict[str, Any] | None:
    """The family's config keys for new sizes (`values`: heads, kv_heads, channels, hidden), or None when its config
    class refuses them (e.g. LlamaConfig wants hidden_size divisible by the head count)."""
    cfg = model.config
    updates: dict[str, Any] = {}
    for what, value in values.items():
        key = next((k for k in _CONFIG_NAMES[what] if isinstance(getattr(cfg, k, None), int)), None)
        if key is not None:
            updates[key] = value
    if "head_dim" in cfg.to_dict():
        updates["head_dim"] = head_dim
    cand = cfg.to_dict()
    cand.pop(CONFIG_KEY, None)
    cand.update(updates)
    try:
        type(cfg).from_dict(cand)
    except Exception:  # noqa: BLE001 - the config class's own validation says no
        return None
    return updates


def heads_after(lay: BlockLayout, coupled: Coupled, steps: int) -> tuple[int, int]:
    """(query heads, KV heads) of an attention after removing `steps` removal steps from it."""
    if coupled.per_kv > 1:
        return lay.heads - steps * (coupled.units // coupled.per_kv), lay.kv_heads
    g = lay.heads // lay.kv_heads
    return lay.heads - steps * g, (lay.kv_heads - steps if lay.kv else lay.heads - steps * g)


def standard_config(model: nn.Module, layouts: list[BlockLayout]) -> dict[str, Any] | None:
    """Config updates that describe the pruned model in the family's own terms, or None when no standard config can
    (per-layer sizes differ, or the family ties head count to width, as OPT does). Checked by building the model
    from the candidate config on the meta device and comparing every tensor shape."""
    from transformers import AutoModelForCausalLM

    shapes = layer_shapes(layouts)
    if any(s != shapes[0] for s in shapes):
        return None
    values = {**shapes[0], "hidden": int(model.get_input_embeddings().weight.shape[1])}
    updates = config_updates(model, values, layouts[0].head_dim)
    if updates is None:
        return None
    cand = model.config.to_dict()
    cand.pop(CONFIG_KEY, None)
    cand.update(updates)
    try:
        with torch.device("meta"):
            probe = AutoModelForCausalLM.from_config(type(model.config).from_dict(cand))
    except Exception:  # noqa: BLE001 - the family's modules refuse these sizes (OPT: hidden not divisible by heads)
        return None
    return updates if _shapes(probe) == _shapes(model) else None


def describe_config(model: nn.Module, prefix: str, layouts: list[BlockLayout]) -> str:
    """Make model.config describe the pruned model. Returns "standard" (plain transformers config) or "per-layer"
    (the CONFIG_KEY entry, loaded by compress.formats.load_checkpoint)."""
    updates = standard_config(model, layouts)
    if updates is not None:
        for k, v in updates.items():
            setattr(model.config, k, v)
        if hasattr(model.config, CONFIG_KEY):
            delattr(model.config, CONFIG_KEY)
        return "standard"
    if int(model.get_input_embeddings().weight.shape[1]) != int(model.config.hidden_size):
        raise CompressError(f"{type(model.config).__name__} cannot describe hidden size "
                            f"{model.get_input_embeddings().weight.shape[1]} (per-layer shapes cover heads and MLP widths only)")
    setattr(model.config, CONFIG_KEY, {"version": 1, "blocks": prefix, **layouts[0].names(),
                                       "layers": layer_shapes(layouts)})
    return "per-layer"


def param_count_line(before: int, after: int) -> str:
    return f"{before:,} -> {after:,} parameters (-{100 * (before - after) / before:.2f}%)"


__all__ = [
    "AGGREGATIONS", "Allocation", "BlockLayout", "CONFIG_KEY", "Coupled", "Member", "aggregate", "allocate",
    "apply_layer_shapes", "attention_coupled", "choose_keep", "describe_config", "discover", "hidden_coupled",
    "layer_shapes", "lm_gradients", "mlp_coupled", "remove_units", "set_head_counts", "standard_config",
    "unit_scores", "zero_units",
]


def check_hidden_separable(model: nn.Module, layouts: list[BlockLayout]) -> None:
    """The channel strategy shrinks hidden_size alone, so the family's config must keep the attention and MLP widths
    when the hidden size changes (LLaMA: an explicit head_dim). Checked by building the family's model with a smaller
    hidden size on the meta device; OPT, whose head width is hidden_size / heads, fails it."""
    from transformers import AutoModelForCausalLM

    cfg = model.config.to_dict()
    cfg.pop(CONFIG_KEY, None)
    lay = layouts[0]
    cfg["hidden_size"] = int(model.config.hidden_size) - int(model.config.num_attention_heads)
    if "head_dim" in cfg:
        cfg["head_dim"] = lay.head_dim
    ok = False
    try:
        with torch.device("meta"):
            probe = AutoModelForCausalLM.from_config(type(model.config).from_dict(cfg))
        _, blocks = find_blocks(probe)
        ok = blocks[0].get_submodule(lay.q).out_features == lay.heads * lay.head_dim and \
            blocks[0].get_submodule(lay.mlp_in[0]).out_features == lay.channels
    except Exception:  # noqa: BLE001 - a config that refuses another hidden size cannot take this structure
        ok = False
    if not ok:
        raise CompressError(f"--structure channel: {type(model).__name__}'s config ties its attention or MLP width to "
                            "the hidden size, so hidden channels cannot be removed alone; use --structure block")
