"""The rotation transform of QuaRot (Ashkboos et al. 2024, arXiv 2404.00456, sections 3-4) and SpinQuant (Liu et al.
2024, arXiv 2405.16406, R1 and R4), reusable before any weight quantizer.

1. Fold every RMSNorm's scale into the linears that read it (W <- W diag(g), g <- 1) and the final norm's into the
   head (QuaRot section 4, "computational invariance": RMSNorm(x R) = RMSNorm(x) R for orthogonal R once g = 1).
2. Rotate the residual stream by an orthogonal R1 [D, D]: embedding E <- E R1; every linear reading the residual
   (q/k/v, gate/up, the head) W <- W R1; every linear writing to it (o_proj, down_proj) W <- R1^T W, b <- R1^T b.
   The float model's outputs are unchanged (up to rounding). A tied head is untied (the head absorbs the final norm).
3. Online R4 (optional): the down-projection's input is rotated at run time by a Hadamard transform H (fast
   Walsh-Hadamard butterfly, compress.layers.online_hadamard), W_down <- W_down H^T.
4. R2 (optional, SpinQuant section 3.1, fused like R1): every attention head's values are rotated by one orthogonal
   R2 [head_dim, head_dim]: v_proj's rows of each key/value head W_v,h <- R2^T W_v,h (b_v,h <- R2^T b_v,h), o_proj's
   columns of each query head W_o,h <- W_o,h R2. Attention mixes value vectors of one head linearly, so each head's
   output is rotated by R2 and o_proj undoes it: exact, grouped-query attention included.

R1 is QuaRot's randomized Hadamard diag(s) H_D / sqrt(D) (s random signs from the run's seed) where a Hadamard
matrix of order D is built here (2^k, or a Paley order times 2^k: SmolLM2's 576 = 36 x 16), else the caller asks for
a random orthogonal matrix (`r1="random"`). Supported: pre-norm decoders with RMSNorm and the LLaMA layout (llama,
mistral, qwen2, qwen3); LayerNorm models (OPT, ...) subtract the mean, which a rotation does not commute with,
and are refused in one line.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from compress.core.errors import ConfigError
from compress.kernels.hadamard import random_hadamard, random_orthogonal, require_plan
from compress.layers.online_hadamard import OnlineHadamardLinear
from compress.model.arch import find_blocks

ROTATABLE = ("llama", "mistral", "qwen2", "qwen3")
R1_KINDS = ("hadamard", "random")
_IN_ATTN, _OUT_ATTN = ("q_proj", "k_proj", "v_proj"), "o_proj"
_IN_MLP, _OUT_MLP = ("gate_proj", "up_proj"), "down_proj"


def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def check_rotatable(model: nn.Module, r1: str = "hadamard", online: bool = True, r2: bool = False) -> None:
    """Before any work: the model's architecture and widths allow the rotation asked for (one-line errors)."""
    if r1 not in R1_KINDS:
        raise ConfigError(f"--r1 {r1!r} is not known; allowed: {', '.join(R1_KINDS)}")
    cfg = getattr(model, "config", None)
    mt = getattr(cfg, "model_type", None)
    if mt not in ROTATABLE:
        raise ConfigError(f"rotate: model type {mt!r} is not supported (RMSNorm pre-norm decoders with the LLaMA "
                          f"layout: {', '.join(ROTATABLE)}); LayerNorm's mean subtraction does not commute with a rotation")
    _, blocks = find_blocks(model)
    b = blocks[0]
    for name in ("input_layernorm", "post_attention_layernorm"):
        norm = getattr(b, name, None)
        if norm is None or getattr(norm, "bias", None) is not None:
            raise ConfigError(f"rotate: block 0 has no bias-free {name}; the rotation folds RMSNorm scales only")
    if getattr(getattr(b, "mlp", None), "experts", None) is not None:
        raise ConfigError("rotate: mixture-of-experts MLPs are not supported")
    if r1 == "hadamard":
        require_plan(cfg.hidden_size, f"rotate --r1 hadamard (hidden width {cfg.hidden_size})")
    if online:
        require_plan(cfg.intermediate_size, f"rotate's online Hadamard (MLP width {cfg.intermediate_size})")
    if r2:
        require_plan(_head_dim(cfg), f"rotate --r2 (head dimension {_head_dim(cfg)})")


def _linear(block: nn.Module, path: str) -> nn.Linear:
    mod = block.get_submodule(path)
    if not isinstance(mod, nn.Linear):
        raise ConfigError(f"rotate: {path} is a {type(mod).__name__}; rotate float nn.Linear layers, before quantizing")
    return mod


@torch.no_grad()
def _fold_norm(norm: nn.Module, linears: list[nn.Linear]) -> None:
    g = norm.weight.double()
    for lin in linears:
        lin.weight.copy_((lin.weight.double() * g.to(lin.weight.device)[None, :]).to(lin.weight.dtype))
    norm.weight.fill_(1.0)


@torch.no_grad()
def _rotate_input(lin: nn.Linear, r: torch.Tensor) -> None:  # W <- W R (the input x R of a rotated stream)
    lin.weight.copy_((lin.weight.double() @ r.to(lin.weight.device)).to(lin.weight.dtype))


@torch.no_grad()
def _rotate_output(lin: nn.Linear, r: torch.Tensor) -> None:  # W <- R^T W, b <- R^T b (the output o R)
    rr = r.to(lin.weight.device)
    lin.weight.copy_((rr.t() @ lin.weight.double()).to(lin.weight.dtype))
    if lin.bias is not None:
        lin.bias.copy_((lin.bias.double() @ rr).to(lin.bias.dtype))


@torch.no_grad()
def _rotate_heads(v_proj: nn.Linear, o_proj: nn.Linear, r2: torch.Tensor, hd: int) -> None:
    """Step 4 for one block: v_proj's output rows and o_proj's input columns, head by head."""
    rr = r2.to(v_proj.weight.device)
    wv = v_proj.weight.double().view(-1, hd, v_proj.in_features)  # [kv heads, hd, D]
    v_proj.weight.copy_(torch.einsum("ji,hjd->hid", rr, wv).reshape(v_proj.weight.shape).to(v_proj.weight.dtype))
    if v_proj.bias is not None:
        v_proj.bias.copy_((v_proj.bias.double().view(-1, hd) @ rr).reshape(-1).to(v_proj.bias.dtype))
    wo = o_proj.weight.double().view(o_proj.out_features, -1, hd)  # [D, q heads, hd]
    o_proj.weight.copy_((wo @ rr.to(o_proj.weight.device)).reshape(o_proj.weight.shape).to(o_proj.weight.dtype))


def _untie(model: nn.Module) -> bool:
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == emb.weight.data_ptr()
    if tied:
        head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
    model.config.tie_word_embeddings = False
    text = getattr(model.config, "get_text_config", None)
    if callable(text) and text() is not model.config:
        text().tie_word_embeddings = False
    return tied


def r1_matrix(kind: str, width: int, seed: int) -> tuple[torch.Tensor, str]:
    if kind == "hadamard":
        plan = require_plan(width, f"rotate --r1 hadamard (hidden width {width})")
        return random_hadamard(width, seed), f"randomized Hadamard {plan.describe()}, signs seed {seed}"
    return random_orthogonal(width, seed), f"random orthogonal {width} (QR of a Gaussian, seed {seed})"


@torch.no_grad()
def rotate_model(model: nn.Module, *, r1: str = "hadamard", online: bool = True, seed: int = 0,
                 r2: bool = False) -> dict[str, Any]:
    """Steps 1-4 above, in place. Returns what was done (for the run record)."""
    check_rotatable(model, r1, online, r2)
    cfg = model.config
    prefix, blocks = find_blocks(model)
    untied = _untie(model)
    r, r1_desc = r1_matrix(r1, cfg.hidden_size, seed)
    emb = model.get_input_embeddings()
    emb.weight.copy_((emb.weight.double() @ r.to(emb.weight.device)).to(emb.weight.dtype))
    online_desc = None
    hd = _head_dim(cfg)
    r2m = random_hadamard(hd, seed + 1) if r2 else None
    for block in blocks:
        attn_in = [_linear(block, f"self_attn.{n}") for n in _IN_ATTN]
        mlp_in = [_linear(block, f"mlp.{n}") for n in _IN_MLP]
        _fold_norm(block.input_layernorm, attn_in)
        _fold_norm(block.post_attention_layernorm, mlp_in)
        for lin in attn_in + mlp_in:
            _rotate_input(lin, r)
        for path in (f"self_attn.{_OUT_ATTN}", f"mlp.{_OUT_MLP}"):
            _rotate_output(_linear(block, path), r)
        if r2:
            _rotate_heads(_linear(block, "self_attn.v_proj"), _linear(block, f"self_attn.{_OUT_ATTN}"), r2m, hd)
        if online:
            wrapped = OnlineHadamardLinear.wrap(_linear(block, f"mlp.{_OUT_MLP}"))
            block.mlp.down_proj = wrapped
            online_desc = wrapped.plan.describe()
    head = model.get_output_embeddings()
    norm = model.get_submodule(prefix.rsplit(".", 1)[0] + ".norm") if "." in prefix else model.norm
    _fold_norm(norm, [head])
    _rotate_input(head, r)
    r2_desc = (f"per head of {hd}: randomized Hadamard {require_plan(hd, 'r2').describe()}, signs seed {seed + 1}"
               if r2 else None)
    return {"r1": r1_desc, "r2": r2_desc,
            "online_r4": f"before every down_proj: Hadamard {online_desc}" if online else None,
            "untied_head": untied, "blocks": len(blocks)}
