"""QLoRA (Dettmers et al. 2023, arXiv 2305.14314): fine-tune LoRA adapters on top of a frozen 4-bit NormalFloat base.

1. Every linear of the decoder blocks becomes NF4 (Sec. 3: the NF4 code book, blocks of 64 weights each scaled by
   its absmax) with double quantization of those absmax constants (8-bit, blocks of 256: 4.127 bits per weight),
   held by bitsandbytes' Linear4bit (compress.layers.nf4).
2. LoRA adapters (Hu et al. 2021: W x + (alpha/r) B A x, B = 0 at the start) on the block linears (peft,
   compress.train.lora), trained in bfloat16 autocast with float32 master weights; the NF4 base stays frozen and gradients
   flow through its dequantized weight (Sec. 3, Eq. 5-6).
3. Data: instructions ({instruction, input, output}, only the response learned) or plain LM text
   (compress.train.finetune); the held-out loss is measured before and after training.

The run's checkpoint holds the NF4 base in bitsandbytes' 4-bit serialization (transformers loads it) plus the peft
adapter in `adapter/`; `--merge dense` instead folds the adapters into de-quantized float weights (a plain dense
model), `--merge nf4` folds them and re-quantizes to NF4 (peft's merge; rounding loses part of the update).
"""
from __future__ import annotations

from dataclasses import dataclass

from compress.core.config import option
from compress.core.errors import ConfigError
from compress.layers.nf4 import NF4_BLOCK_SIZES, is_nf4_linear, nf4_dequantize, quantize_model_nf4, use_reference_kernel
from compress.model.surgery import set_module
from compress.pipeline.method import Method, Needs, register
from compress.train.finetune import InstructionOptions, finetune_data, require_float_linears
from compress.train.lora import LoraOptions, add_lora, merge_lora, train_adapters
from compress.train.trainer import TrainConfig


@dataclass
class QLoRAConfig(TrainConfig, LoraOptions, InstructionOptions):
    lr: float = option(2e-4, "peak learning rate (AdamW); QLoRA uses 2e-4 for models up to 13B", range=(0.0, 1.0))
    nf4_block_size: int = option(64, "weights per NF4 block (one absmax constant each)", choices=NF4_BLOCK_SIZES)
    double_quant: bool = option(True, "quantize the NF4 block constants to 8 bits in blocks of 256 (double quantization)")
    merge: str = option("none", "what the checkpoint holds: none (NF4 base + peft adapter), dense (adapters folded into "
                                "de-quantized float weights), nf4 (folded, then re-quantized to NF4)",
                        choices=("none", "dense", "nf4"))
    adapter_dir: str | None = option(None, "also write the peft adapter (adapter_config.json + adapter_model.safetensors) here")

    def check(self) -> None:
        if self.adapter_dir:
            from compress.formats import check_output_dir

            check_output_dir(self.adapter_dir)


@register("qlora", family="training-aware", summary="QLoRA: LoRA adapters trained on a frozen NF4 (double-quantized) base",
          paper="Dettmers et al. 2023, arXiv 2305.14314")
class QLoRA(Method):
    Config = QLoRAConfig
    needs = Needs(calibration=True, gradients=True)

    def describe(self) -> str:
        c = self.config
        return f"nf4 b{c.nf4_block_size}{' dq' if c.double_quant else ''} r{c.lora_r} {c.steps} steps" + \
            (f" merge {c.merge}" if c.merge != "none" else "")

    def apply(self, model, ctx):
        c = self.config
        require_float_linears(model, "qlora", "qlora quantizes to NF4 itself; put it before any quantization stage")
        model.to("cpu")
        names = quantize_model_nf4(model, block_size=c.nf4_block_size, double_quant=c.double_quant,
                                   compute_dtype=ctx.model_dtype, include=ctx.include, progress=ctx.progress)
        if not names:
            raise ConfigError("qlora found no float linear layer in the decoder blocks to quantize (check --ignore)")
        train, held, data_desc = finetune_data(ctx, model, c)
        peft_model = add_lora(model, c)
        self.report.update({"nf4_layers": len(names), "nf4_block_size": c.nf4_block_size, "double_quant": c.double_quant,
                            "data": data_desc})
        self.report.update(train_adapters(peft_model, ctx, c, train, held, desc="qlora"))
        peft_model.to("cpu")
        if c.adapter_dir:
            from compress.formats import AtomicFolder

            with AtomicFolder(c.adapter_dir) as tmp:
                peft_model.save_pretrained(str(tmp), safe_serialization=True)
            self.report["adapter_dir"] = c.adapter_dir
        if c.merge == "dense":
            return merge_dense(peft_model)
        if c.merge == "nf4":
            merged = merge_lora(peft_model)  # peft de-quantizes, adds the update, re-quantizes with the same settings
            for m in merged.modules():
                if is_nf4_linear(m):
                    use_reference_kernel(m)
            return merged
        for p in peft_model.parameters():
            p.requires_grad_(False)
        peft_model.eval()
        return peft_model


def merge_dense(peft_model):
    """Fold every adapter into its de-quantized NF4 weight (W = dequant(W_nf4) + alpha/r B A) and return the plain
    dense model: every NF4 linear becomes an nn.Linear in its compute dtype."""
    import torch
    import torch.nn as nn

    base = peft_model.get_base_model()
    deltas = {name: mod.get_delta_weight("default").float() for name, mod in base.named_modules()
              if hasattr(mod, "base_layer") and hasattr(mod, "get_delta_weight") and "default" in getattr(mod, "lora_A", {})}
    plain = peft_model.unload()  # the base model with its original (NF4) layers back in place, adapters removed
    for name, mod in list(plain.named_modules()):
        if not is_nf4_linear(mod):
            continue
        weight = nf4_dequantize(mod, torch.float32)
        if name in deltas:
            weight = weight + deltas[name].to(weight.device)
        dense = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, dtype=mod.compute_dtype, device="cpu")
        with torch.no_grad():
            dense.weight.copy_(weight)
            if mod.bias is not None:
                dense.bias.copy_(mod.bias)
        dense.requires_grad_(False)
        set_module(plain, name, dense)
    plain.eval()
    return plain
