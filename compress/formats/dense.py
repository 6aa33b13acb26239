"""The dense format (`--export dense`): a plain transformers folder of float weights that any tool loads with
AutoModelForCausalLM. Every compressed linear becomes an nn.Linear holding its de-quantized weight (pruned zeros
included); mixture-of-experts matrices split per expert are stacked back into transformers' fused parameters."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch.nn as nn

from compress.formats.base import Format
from compress.formats.bitsandbytes import int8_modules
from compress.formats.native import save_checkpoint
from compress.layers.experts import split_to_fused
from compress.layers.nf4 import is_nf4_linear
from compress.layers.online_hadamard import online_hadamards
from compress.layers.types import compressed_modules
from compress.layers.weights import linear_weight
from compress.model.surgery import set_module


def dequantized_copy(model: nn.Module) -> nn.Module:
    """A copy of the model with every compressed linear replaced by a plain nn.Linear holding its float weight. An
    online Hadamard (rotate's R4) is folded back into its linear's weight, W = W' H: the dense model needs no
    run-time transform (an R1-only model, the same function)."""
    dense = copy.deepcopy(model)
    dtype = dense.get_input_embeddings().weight.dtype  # the model's float dtype
    wrappers = online_hadamards(dense)
    inner = tuple(n + "." for n in wrappers)
    mods = {**compressed_modules(dense), **int8_modules(dense),
            **{n: m for n, m in dense.named_modules() if is_nf4_linear(m)}}
    mods = {n: m for n, m in mods.items() if not n.startswith(inner)}
    experts = {n: mods.pop(n) for n in [n for n, m in mods.items() if getattr(m, "is_container", False)]}
    for name, mod in mods.items():
        w = mod.folded_weight(linear_weight(mod.linear).detach()) if name in wrappers else linear_weight(mod).detach()
        lin = nn.Linear(w.shape[1], w.shape[0], bias=getattr(mod, "bias", None) is not None, dtype=dtype)
        lin.weight.data.copy_(w)
        if lin.bias is not None:
            lin.bias.data.copy_(mod.bias.data)
        set_module(dense, name, lin)
    for name, mod in experts.items():  # split experts go back to transformers' fused [E, 2I, D] / [E, D, I]
        set_module(dense, name, split_to_fused(mod, linear_weight, dtype))
    return dense


class DenseFormat(Format):
    name = "dense"
    summary = "plain transformers folder of float weights (any tool loads it)"
    exports = True
    online_rotation = True  # folded back into the weights (dequantized_copy)

    def export(self, model: nn.Module, tokenizer: Any, target: Path, overwrite: bool) -> Path:
        return save_checkpoint(dequantized_copy(model), tokenizer, target, overwrite=overwrite)


FORMAT = DenseFormat()
