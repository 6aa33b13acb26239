"""compressed-tensors `pack-quantized` (weight-only integer, "W4A16"-style), the format llm-compressor writes and
vLLM serves; transformers with the `compressed-tensors` package loads it with plain `from_pretrained`, on CPU too.
Written from the integers a quantizer produced:

  <linear>.weight_packed      int32 [out, in * bits / 32]  codes (unsigned, i.e. compressed-tensors' signed value
                                                           + 2^(bits-1)) packed along the input dimension, the same
                                                           little-endian bit stream as the native layout
  <linear>.weight_scale       float16 [out, n_groups]
  <linear>.weight_shape       int64 [2]                    (out, in)

config.json's quantization_config: quant_method "compressed-tensors", format "pack-quantized", one config group
targeting Linear with the weights' num_bits / symmetric / strategy ("group" or "channel") / group_size, actorder
and `ignore` listing lm_head and any linear
left unquantized. The format needs a symmetric grid (transformers with compressed-tensors 0.20 fails to load the
packed zero points of asymmetric ones), a group size that divides every quantized layer's input width, and groups
in natural order (compressed-tensors dropped the act-order group index); when any of these fails the exporter says
so and writes the GPTQ format instead.

Bit widths: at 2, 4 and 8 bits every compressed-tensors version lays codes out the same way (32 / bits per word).
At 3, 5, 6 and 7 bits older readers packed 32 // bits codes per word with padding bits, newer ones (0.20) a dense
bit stream like ours; these widths are written only when the installed `compressed_tensors` packs a probe exactly as
this writer does (`reader_layout_reason`), else the exporter falls back to GPTQ naming the version.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from compress.core.readers import read_json_object
from compress.formats.base import AtomicFolder, Format, state_for_saving, write_model_folder
from compress.formats.gptq import export_gptq, quantized_linears
from compress.formats.w8a8 import export_int_quantized, w8a8_modules
from compress.kernels.quant_grid import pack_bits
from compress.model.surgery import is_linear_like

log = logging.getLogger("compress")


_READER_PACKERS = ("compressed_tensors.compressors.pack_quantized.helpers",  # 0.20
                   "compressed_tensors.compressors.quantized_compressors.pack_quantized")  # older releases


def _installed_packer():
    """(version, pack_to_int32) of the installed compressed-tensors, or (None, None) when it is absent."""
    import importlib

    try:
        ct = importlib.import_module("compressed_tensors")
    except ImportError:
        return None, None
    for mod in _READER_PACKERS:
        try:
            return getattr(ct, "__version__", "?"), importlib.import_module(mod).pack_to_int32
        except (ImportError, AttributeError):
            continue
    return getattr(ct, "__version__", "?"), None


def reader_layout_reason(bits: int) -> str | None:
    """Why `bits`-bit pack-quantized codes written here would not read back in the installed compressed-tensors
    (None if they would): 2/4/8 bits have one layout in every version; other widths are checked on a probe."""
    if 32 % bits == 0:
        return None
    version, pack = _installed_packer()
    if pack is None:
        return (f"{bits}-bit pack-quantized layouts differ between compressed-tensors versions and "
                + ("compressed-tensors is not installed" if version is None else
                   f"compressed-tensors {version} has no pack_to_int32 to check against") + " (2, 4 and 8 bits are safe)")
    probe = (torch.arange(3 * 70, dtype=torch.int64).reshape(3, 70) * 7 + 3) % (2**bits)  # codes 0..2^b-1, 70 columns
    ours = pack_bits(probe, bits)[:, :math.ceil(70 * bits / 32)]
    try:
        theirs = pack(probe.sub(2 ** (bits - 1)).to(torch.int8), bits)  # its input: signed values
    except Exception as e:  # noqa: BLE001 - a reader that cannot pack this width cannot read it either
        return f"compressed-tensors {version} cannot pack {bits}-bit weights ({type(e).__name__}: {e})"
    if theirs.shape != ours.shape or not torch.equal(theirs.to(torch.int32), ours):
        return (f"compressed-tensors {version} lays out {bits}-bit codes differently from this writer (it packs "
                f"{32 // bits} per word); 2, 4 and 8 bits read back in every version")
    return None


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the model's quantized linears cannot be written as pack-quantized (None if they can)."""
    mods, spec, _ = quantized_linears(model, "compressed-tensors", every_block_linear=False)
    layout = reader_layout_reason(spec.bits)
    if layout is not None:
        return layout
    if not spec.sym:
        return ("the grid is asymmetric: transformers (with compressed-tensors 0.20) cannot load asymmetric "
                "pack-quantized checkpoints, it builds unpacked zero points where the format stores packed ones; "
                "quantize with --sym for this format (llm-compressor's W4A16 is symmetric)")
    if spec.group_size != -1:
        for name, m in mods.items():
            if m.in_features % spec.group_size:
                return (f"group size {spec.group_size} does not divide the input width {m.in_features} of {name} "
                        f"(compressed-tensors needs it to divide every width)")
    for name, m in mods.items():
        if m.weight_g_idx is not None:
            return (f"{name} uses an act-order group index (--act-order without --static-groups), which "
                    "compressed-tensors no longer supports")
    return None


def ct_config(spec, ignore: list[str]) -> dict[str, Any]:
    weights = {
        "num_bits": spec.bits,
        "type": "int",
        "symmetric": spec.sym,
        "strategy": "channel" if spec.group_size == -1 else "group",
        "group_size": None if spec.group_size == -1 else spec.group_size,
        "dynamic": False,
        "observer": "minmax",
        "block_structure": None,
    }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                      "output_activations": None, "format": "pack-quantized"}},
        "ignore": ignore,
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "global_compression_ratio": None,
    }


def export_compressed_tensors(model: nn.Module, tokenizer: Any, target: Path, overwrite: bool) -> Path:
    """pack-quantized folder (see the module docstring); falls back to the GPTQ format when the grid does not fit."""
    reason = unsupported_reason(model)
    if reason is not None:
        gptq_target = Path(str(target)[: -len("-compressed-tensors")] + "-gptq") if str(target).endswith("-compressed-tensors") \
            else Path(f"{target}-gptq")
        log.warning("compressed-tensors not written: %s. Writing the GPTQ format instead: %s", reason, gptq_target)
        cfg = gptq_target / "config.json"
        if cfg.is_file() and (read_json_object(cfg, "model config").get("quantization_config") or {}).get("quant_method") == "gptq" \
                and not overwrite:
            return gptq_target  # written a moment ago by --export gptq in the same run
        return export_gptq(model, tokenizer, gptq_target, overwrite)
    mods, spec, _ = quantized_linears(model, "compressed-tensors", every_block_linear=False)
    ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and is_linear_like(m)]
    if "lm_head" not in ignore and getattr(model, "lm_head", None) is not None:
        ignore.append("lm_head")
    state = state_for_saving(model)
    for name, m in mods.items():
        qw = m.quantized_weight()
        for key in [k for k in state if k.startswith(name + ".") and not k.endswith(".bias")]:
            del state[key]
        # the same bit stream, without the all-padding words compressed-tensors does not store
        state[f"{name}.weight_packed"] = m.weight_packed.detach()[:, :math.ceil(m.in_features * spec.bits / 32)].to("cpu").contiguous()
        state[f"{name}.weight_scale"] = qw.scales.to(torch.float16).to("cpu").contiguous()
        state[f"{name}.weight_shape"] = torch.tensor([m.out_features, m.in_features], dtype=torch.int64)
    qc = ct_config(spec, sorted(ignore))
    with AtomicFolder(target, overwrite) as tmp:
        write_model_folder(tmp, model, tokenizer, state, qc)
    return Path(target)


class CompressedTensorsFormat(Format):
    name = "compressed-tensors"
    one_grid = True  # one quantization_config for every layer
    summary = "compressed-tensors: pack-quantized weight-only (W4A16-style) or int-quantized W8A8 (llm-compressor, vLLM)"
    exports = True

    def export(self, model: nn.Module, tokenizer: Any, target: Path, overwrite: bool) -> Path:
        if w8a8_modules(model):
            return export_int_quantized(model, tokenizer, target, overwrite)
        return export_compressed_tensors(model, tokenizer, target, overwrite)


FORMAT = CompressedTensorsFormat()
