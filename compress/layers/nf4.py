"""4-bit NormalFloat (NF4) weights with double quantization, as QLoRA defines them (Dettmers et al. 2023,
arXiv 2305.14314, Sec. 3), stored and run by bitsandbytes' `Linear4bit`.

* NF4 code book (Sec. 3, Eq. 4 and Appendix E): quantiles of N(0, 1), 8 for the positive half and 7 for the
  negative half plus an exact zero, normalised to [-1, 1]; each block of `block_size` consecutive weights is scaled
  by its absolute maximum (the first-level quantization constant c2, float32).
* Double quantization (Sec. 3, "Double Quantization"): the constants c2 minus their mean are quantized to 8 bits
  (bitsandbytes' dynamic 8-bit float map) in blocks of 256, keeping one float32 constant per 256 blocks plus the
  mean. Bits per weight for block 64: 4 + 8/64 + 32/(64*256) = 4.127 (the paper's 0.127 bits of overhead).

The code book is built here from its definition (and checked against bitsandbytes' table in the tests), the
quantization itself is bitsandbytes' kernel; `storage_bits` counts what an NF4 layer really stores.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn as nn

from compress.core.errors import CompressError
from compress.model.arch import find_blocks
from compress.model.surgery import set_module

log = logging.getLogger("compress")

NF4_BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' kernels accept


def nf4_code_book(bits: int = 4) -> torch.Tensor:
    """The NormalFloat code book (QLoRA Sec. 3, Eq. 4): q_i = (Q_N(p_i) + Q_N(p_i+1)) / 2 estimated, as in the paper's
    reference construction, by quantiles at evenly spaced probabilities from `offset` to 0.5 on each side, where
    offset = 1 - (1/(2*(2^k - 1)) + 1/(2*2^k)) / 2 keeps the extreme quantiles finite; 2^(k-1) positive values,
    2^(k-1) - 1 negative ones and an exact zero, divided by the largest so the range is [-1, 1]."""
    n = 2**bits
    offset = 1.0 - 0.5 * (1.0 / (2 * (n - 1)) + 1.0 / (2 * n))
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, n // 2 + 1, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, n // 2, dtype=torch.float64)[:-1])
    values = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)]).sort().values
    return (values / values.max()).float()


def is_nf4_linear(module: nn.Module) -> bool:
    """A bitsandbytes 4-bit linear (an nn.Linear whose weight carries a quant_state; not a wrapper around one)."""
    return isinstance(module, nn.Linear) and getattr(module.weight, "quant_state", None) is not None


def _require_bnb():
    try:
        import bitsandbytes as bnb
    except ImportError:  # pragma: no cover - bitsandbytes is a declared dependency
        raise CompressError("NF4 needs the bitsandbytes package: pip install bitsandbytes") from None
    return bnb


def use_reference_kernel(module: nn.Module) -> None:
    """Keep a 4-bit linear on bitsandbytes' dequantize-then-matmul path on CPU. Its AVX512-BF16 inference path
    repacks the weight in place on the first eval-mode call, rounds differently and has no backward: training
    after an evaluation would then get no gradient through the frozen base. One path everywhere makes the run,
    its training and a reloaded checkpoint compute the same numbers."""
    if hasattr(module, "support_avx512bf16_for_cpu"):
        module.support_avx512bf16_for_cpu = False


def nf4_linear(linear: nn.Module, *, block_size: int = 64, double_quant: bool = True,
               compute_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A frozen bitsandbytes Linear4bit holding `linear`'s weight in NF4 (blocks of `block_size` along the flattened
    [out, in] weight, i.e. along the input dimension), double-quantized constants if asked."""
    bnb = _require_bnb()
    if block_size not in NF4_BLOCK_SIZES:
        raise CompressError(f"NF4 block size {block_size!r} is not supported; choose one of {NF4_BLOCK_SIZES}")
    weight = linear.weight.detach()
    bias = getattr(linear, "bias", None)
    new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias is not None, compute_dtype=compute_dtype,
                            compress_statistics=double_quant, quant_type="nf4", quant_storage=torch.uint8, device="meta")
    new.weight = bnb.nn.Params4bit(weight.to("cpu", copy=True).contiguous(), requires_grad=False, quant_type="nf4",
                                   compress_statistics=double_quant, blocksize=block_size, quant_storage=torch.uint8)
    if bias is not None:
        new.bias = nn.Parameter(bias.detach().to("cpu", compute_dtype, copy=True), requires_grad=False)
    new = new.to(weight.device if weight.device.type != "meta" else "cpu")  # bitsandbytes quantizes on .to(device)
    use_reference_kernel(new)
    new.train(linear.training)
    return new


def quantize_model_nf4(model: nn.Module, *, block_size: int = 64, double_quant: bool = True,
                       compute_dtype: torch.dtype = torch.bfloat16, include: Callable[[str], bool] = lambda n: True,
                       progress: bool = True) -> list[str]:
    """Replace every nn.Linear inside the decoder blocks by its NF4 Linear4bit (QLoRA quantizes all block linears;
    embeddings and the output head stay). Returns the names replaced."""
    from tqdm.auto import tqdm

    path, blocks = find_blocks(model)
    todo = []
    for i, block in enumerate(blocks):
        for name, mod in block.named_modules():
            full = f"{path}.{i}.{name}"
            if type(mod) is nn.Linear and include(full):
                todo.append(full)
    for full in tqdm(todo, desc="NF4 quantization", unit="linear", disable=not progress, leave=False):
        set_module(model, full, nf4_linear(model.get_submodule(full), block_size=block_size, double_quant=double_quant,
                                           compute_dtype=compute_dtype))
    if todo:
        # What transformers sets on a model it loads in 4 bits: peft then wraps these layers with its bitsandbytes
        # LoRA layer, exactly as it does when the checkpoint is reloaded, so both compute the same numbers.
        model.is_loaded_in_4bit = True
    return todo


def nf4_storage_bits(module: nn.Module) -> int:
    """Bits an NF4 layer's weight stores: the packed 4-bit codes, the per-block constants (8-bit codes when double
    quantized, else float32), the float32 second-level constants (one per 256 blocks) and the float32 mean. The
    16-entry NF4 table and the 256-entry 8-bit map are constants of the data types, the same for every layer, and
    are not counted per layer (the on-disk byte count of a checkpoint includes the copies bitsandbytes writes)."""
    data = module.weight.data
    state = module.weight.quant_state
    bits = data.numel() * data.element_size() * 8
    bits += state.absmax.numel() * state.absmax.element_size() * 8
    if state.nested:
        bits += state.state2.absmax.numel() * state.state2.absmax.element_size() * 8
        bits += 32  # the mean subtracted before the second quantization
    return bits


def nf4_state_bytes(module: nn.Module) -> int:
    """Bytes of an NF4 layer's quantization state held beside its weight (not a parameter or buffer)."""
    state = module.weight.quant_state
    tensors = [state.absmax, state.code]
    if state.nested:
        tensors += [state.state2.absmax, state.state2.code]
    return sum(t.numel() * t.element_size() for t in tensors)


def nf4_dequantize(module: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The float weight [out, in] an NF4 layer represents: code book value x (double-dequantized) block constant."""
    import bitsandbytes.functional as bnbf

    w = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state)
    return w.to(dtype or module.compute_dtype or torch.float32)
