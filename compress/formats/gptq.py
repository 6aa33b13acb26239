"""The GPTQ checkpoint format (`quant_method: "gptq"`, `checkpoint_format: "gptq"`, i.e. v1), as AutoGPTQ/GPTQModel,
transformers, vLLM and SGLang read it. Written from the integers a quantizer produced (no re-quantization):

  <linear>.qweight  int32 [in / 32 * bits, out]   codes packed along the input dimension, 32 codes per `bits` words
                                                  (value j of a chunk at bits [bits*j, bits*(j+1)) of the chunk's
                                                  little-endian bit stream, so 3-bit codes straddle words)
  <linear>.qzeros   int32 [n_groups, out / 32 * bits]  zero points MINUS ONE (the v1 convention), packed the same
                                                  way along the output dimension; symmetric 4-bit stores 7 (zero 8)
  <linear>.scales   float16 [n_groups, out]
  <linear>.g_idx    int32 [in]                    group of each input column: i // group_size, or act-order's map
  <linear>.bias     [out]                         only where the layer has one

n_groups = ceil(in / group_size) (a shorter last group where the width is not a multiple, as GPTQ's own code
makes; group_size -1 is one group per output channel). config.json gets quantization_config {quant_method "gptq",
bits, group_size, desc_act, sym, checkpoint_format "gptq", ...; damp_percent, true_sequential and static_groups as
the run that made the codes used them, see gptq_config} and the same dict goes to quantize_config.json (where
GPTQModel/AutoGPTQ look). Every linear inside the decoder blocks must be quantized with one setting; the
embeddings, norms and lm_head stay as they are. `compress eval --model <folder>` reads it back through
`read_gptq` into the project's QuantLinear modules, bit for bit.

A zero point of 0 cannot be written in v1 (stored as -1 it wraps, and readers disagree on the carry), so such a
layer is refused with a message; symmetric grids never have one.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from compress.core.errors import CompressError, ModelError
from compress.core.readers import read_json_object
from compress.formats.base import (
    AtomicFolder,
    Format,
    applied_stages,
    build_empty_model,
    load_remaining,
    read_safetensors,
    state_for_saving,
    write_model_folder,
)
from compress.kernels.quant_grid import QuantizedWeight, QuantSpec, pack_bits, unpack_bits
from compress.layers.quant_linear import OWQLinear, QuantLinear
from compress.layers.types import compressed_modules
from compress.model.arch import find_blocks
from compress.model.surgery import is_linear_like, set_module

GPTQ_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


def quantized_linears(model: nn.Module, fmt: str, *, every_block_linear: bool = True
                      ) -> tuple[dict[str, QuantLinear], QuantSpec, bool]:
    """The model's quantized linears if `fmt` can hold them: QuantLinears of one grid (and, with every_block_linear,
    every linear of the decoder blocks). Returns (modules by name, their spec, whether any uses an act-order index)."""
    mods = compressed_modules(model)
    experts = [n for n, m in mods.items() if getattr(m, "is_container", False)]
    if experts:
        raise CompressError(f"--export {fmt}: {experts[0]} holds mixture-of-experts matrices split per expert, for "
                            f"which this project writes no {fmt} layout yet; the native checkpoint (compress eval "
                            "--model <folder>) or --export dense holds them")
    weak = [n for n, m in mods.items() if isinstance(m, OWQLinear)]
    if weak:
        raise CompressError(f"--export {fmt}: {weak[0]} keeps OWQ float16 weak columns, which the {fmt} format cannot "
                            "hold; the native checkpoint (compress eval --model <folder>) has them")
    other = [n for n, m in mods.items() if not isinstance(m, QuantLinear)]
    if other:
        raise CompressError(f"--export {fmt}: {other[0]} is a {type(mods[other[0]]).__name__}, not an integer-quantized "
                            f"linear; the {fmt} format holds weight-only integer quantization")
    if not mods:
        raise CompressError(f"--export {fmt}: the model has no quantized linear layers")
    prefix, blocks = find_blocks(model)
    for i, block in enumerate(blocks if every_block_linear else []):
        for n, m in block.named_modules():
            if n and is_linear_like(m) and not isinstance(m, QuantLinear):
                raise CompressError(f"--export {fmt}: {prefix}.{i}.{n} is not quantized; the {fmt} format quantizes "
                                    "every linear of the decoder blocks (drop --ignore, or use the native format)")
    specs = {m.spec for m in mods.values()}
    if len(specs) > 1:
        raise CompressError(f"--export {fmt}: the layers use different grids ({', '.join(s.label() for s in specs)}); "
                            f"the {fmt} format needs one")
    act_order = any(m.weight_g_idx is not None for m in mods.values())
    return mods, specs.pop(), act_order


def gptq_tensors(module: QuantLinear, name: str) -> dict[str, torch.Tensor]:
    """qweight, qzeros (v1), scales, g_idx of one QuantLinear (the same integers, repacked)."""
    spec = module.spec
    out_f, in_f = module.out_features, module.in_features
    if in_f % 32 or out_f % 32:
        raise CompressError(f"--export gptq: {name} is {in_f} -> {out_f}; the GPTQ layout packs 32 codes at a time and "
                            "needs both widths to be multiples of 32")
    qw = module.quantized_weight()
    if bool((qw.zeros == 0).any()):
        raise CompressError(f"--export gptq: {name} has a zero point of 0, which the GPTQ v1 format (zero - 1) cannot "
                            "store; quantize with --sym, or use the native or compressed-tensors format")
    t = {
        "qweight": module.weight_packed.t().contiguous(),  # same bit stream per output channel, transposed
        "qzeros": pack_bits((qw.zeros.t().to(torch.int64) - 1), spec.bits),  # [n_groups, out/32*bits]
        "scales": qw.scales.t().contiguous().to(torch.float16),
        "g_idx": qw.g_idx.to(torch.int32).contiguous(),
    }
    if module.bias is not None:
        t["bias"] = module.bias.detach().contiguous()
    return t


# Stage options that GPTQModel/AutoGPTQ's quantize_config names differently (damp_percent) or the same.
_SWEEP_KEYS = {"damp": "damp_percent", "true_sequential": "true_sequential", "static_groups": "static_groups"}


def gptq_config(spec: QuantSpec, act_order: bool, stages: list[dict[str, Any]] | None = None,
                **extra: Any) -> dict[str, Any]:
    """quantization_config / quantize_config.json of a GPTQ folder. desc_act says whether the stored g_idx is an
    act-order map (what readers need); damp_percent, true_sequential and static_groups are the values of the run
    that made the codes (the last stage in `stages` with a bit width, when it has them: GPTQ, OWQ), and are left out
    when it has none (RTN) or no stage is known (a model read from a peer's folder) rather than made up."""
    quant = next((st for st in reversed(stages or []) if "bits" in (st.get("config") or {})), None)
    sweep = quant if quant is not None and "damp" in quant["config"] else None
    qc: dict[str, Any] = {
        "quant_method": "gptq",
        "bits": spec.bits,
        "group_size": spec.group_size,
        "desc_act": act_order,
        "sym": spec.sym,
        "checkpoint_format": "gptq",
        "pack_dtype": "int32",
        "lm_head": False,
    }
    meta: dict[str, Any] = {"quantizer": ["compress"]}
    if sweep is not None:
        cfg = sweep["config"]
        qc.update({out: cfg[k] for k, out in _SWEEP_KEYS.items() if k in cfg})
        meta.update({"method": sweep.get("method"), "act_order": cfg.get("act_order")})
    elif quant is not None:
        meta["method"] = quant.get("method")
    qc["meta"] = meta
    qc.update(extra)
    return qc


def export_gptq(model: nn.Module, tokenizer: Any, target: Path, overwrite: bool) -> Path:
    """GPTQ v1 folder (see the module docstring), loadable by transformers+GPTQModel, vLLM, SGLang and `compress`."""
    mods, spec, act_order = quantized_linears(model, "gptq")
    state = state_for_saving(model)
    for name, m in mods.items():
        for key in [k for k in state if k.startswith(name + ".")]:
            del state[key]
        for suffix, tensor in gptq_tensors(m, name).items():
            state[f"{name}.{suffix}"] = tensor.to("cpu")
    qc = gptq_config(spec, act_order, applied_stages(model))
    with AtomicFolder(target, overwrite) as tmp:
        write_model_folder(tmp, model, tokenizer, state, qc)
        (tmp / "quantize_config.json").write_text(json.dumps(qc, indent=2))
    return Path(target)


def read_gptq(folder: str | Path, dtype: torch.dtype | None = None) -> tuple[nn.Module, Any, dict]:
    """Rebuild a GPTQ-format folder (v1 "gptq" or "gptq_v2") as the project's QuantLinear modules."""
    folder = Path(folder)
    config = read_json_object(folder / "config.json", "model config")
    qc = config.get("quantization_config") or {}
    bits, group_size = int(qc.get("bits", 4)), int(qc.get("group_size", 128))
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise ModelError(f"checkpoint {str(folder)!r}: GPTQ checkpoint_format {fmt!r} is not supported (gptq, gptq_v2)")
    dtype = dtype or getattr(torch, config.get("dtype") or config.get("torch_dtype") or "float16")
    state = read_safetensors(folder)
    model = build_empty_model(config, dtype)
    names = sorted(k[: -len(".qweight")] for k in state if k.endswith(".qweight"))
    if not names:
        raise ModelError(f"checkpoint {str(folder)!r} says quant_method gptq but holds no .qweight tensors")
    for name in names:
        linear = model.get_submodule(name)
        out_f, in_f = linear.out_features, linear.in_features
        codes = unpack_bits(state.pop(f"{name}.qweight").t().contiguous(), bits, in_f)  # [out, in]
        zeros = unpack_bits(state.pop(f"{name}.qzeros"), bits, out_f).to(torch.int64)  # [n_groups, out]
        if fmt == "gptq":
            zeros = (zeros + 1) % (2**bits)
        scales = state.pop(f"{name}.scales").t().contiguous()
        g_idx = state.pop(f"{name}.g_idx", None)
        sym = bool(qc.get("sym", False)) and bool(torch.all(zeros == 2 ** (bits - 1)))
        spec = QuantSpec(bits, group_size, sym)
        if scales.shape[1] != spec.groups(in_f):
            raise ModelError(f"checkpoint {str(folder)!r}: {name}.scales has {scales.shape[1]} groups; group_size "
                             f"{group_size} over {in_f} columns makes {spec.groups(in_f)}")
        g_idx = spec.g_idx(in_f) if g_idx is None else g_idx.to(torch.int32)
        qw = QuantizedWeight(codes, scales.to(torch.float16), zeros.t().to(torch.uint8).contiguous(), g_idx, spec)
        bias = state.pop(f"{name}.bias", None)
        set_module(model, name, QuantLinear.from_quantized(qw, bias, dtype=dtype))
    tok = load_remaining(model, state, folder, config, already_loaded=set(names))
    info = {"format": "gptq", "quantization_config": qc}
    return model, tok, info


class GPTQFormat(Format):
    name = "gptq"
    one_grid = True  # one quantization_config for every layer
    summary = "GPTQ v1 (AutoGPTQ/GPTQModel, transformers, vLLM, SGLang)"
    exports = True

    def handles(self, model: nn.Module) -> bool:
        return True  # export_gptq says in one line why a model's layers do not fit

    def export(self, model: nn.Module, tokenizer: Any, target: Path, overwrite: bool) -> Path:
        return export_gptq(model, tokenizer, target, overwrite)

    def detect(self, config: dict[str, Any]) -> bool:
        return (config.get("quantization_config") or {}).get("quant_method") == "gptq"

    def read(self, folder: Path, dtype: torch.dtype | None) -> tuple[nn.Module, Any, dict]:
        return read_gptq(folder, dtype)


FORMAT = GPTQFormat()
