"""LoRA recovery (Hu et al. 2021, arXiv 2106.09685; the recovery step of LLM-Pruner, Ma et al. 2023, arXiv
2305.11627, Sec. 3.3): after pruning, train low-rank adapters W + (alpha/r) B A on the compressed model's float
linears, with the LM loss (or, with --kd-weight > 0, the KD mix against the uncompressed model), then fold them in.

Used as the last stage of a recipe (e.g. llm-pruner -> lora, wanda -> lora) or on its own via `compress finetune`.
Folding a dense update B A into a pruned weight would fill its zeros; with --keep-sparsity (default) the merged
weights are masked again, so the model keeps exactly the sparsity it came with (the adapters' update is dropped at
pruned positions). `--no-merge-adapters` keeps the adapters beside the base instead (checkpoint: base + peft `adapter/`).
Quantized bases are refused: adapters on NF4 are QLoRA (`qlora`).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from compress.core.config import option
from compress.core.errors import ConfigError
from compress.kernels.losses import lm_loss
from compress.pipeline.method import Method, Needs, register
from compress.train.finetune import (
    InstructionOptions,
    finetune_data,
    reapply_zeros,
    require_float_linears,
    sparsity,
    zero_masks,
)
from compress.train.lora import LoraOptions, add_lora, merge_lora, train_adapters
from compress.train.trainer import TrainConfig, distillation_loss


@dataclass
class LoraRecoveryConfig(TrainConfig, LoraOptions, InstructionOptions):
    lr: float = option(2e-4, "peak learning rate (AdamW)", range=(0.0, 1.0))
    kd_weight: float = option(0.0, "weight of a KD term against the uncompressed model (0: LM loss only)", range=(0.0, 1.0))
    temperature: float = option(2.0, "softmax temperature of the KD term", range=(0.05, 100.0))
    merge_adapters: bool = option(True, "fold the adapters into the weights at the end (else keep them beside the base)")
    keep_sparsity: bool = option(True, "after folding, set the weights that were zero before training back to zero")


@register("lora", family="training-aware",
          summary="LoRA recovery: low-rank adapters trained on a pruned/float model, folded in keeping its sparsity",
          paper="Hu et al. 2021, arXiv 2106.09685 (recovery as in LLM-Pruner, arXiv 2305.11627)")
class LoraRecovery(Method):
    Config = LoraRecoveryConfig
    needs = Needs(calibration=True, gradients=True)

    def __init__(self, config=None):
        super().__init__(config)
        if self.config.kd_weight > 0:  # the recipe keeps the uncompressed model as teacher only when asked
            self.needs = replace(self.needs, teacher=True)

    def describe(self) -> str:
        c = self.config
        return f"r{c.lora_r} {c.steps} steps" + (f" kd {c.kd_weight:g}" if c.kd_weight else "")

    def apply(self, model, ctx):
        c = self.config
        require_float_linears(model, "lora", "put lora before quantization, or use qlora (adapters on an NF4 base)")
        model.to("cpu")
        masks = zero_masks(model) if c.keep_sparsity else {}
        train, held, data_desc = finetune_data(ctx, model, c)
        loss_fn = lm_loss
        if c.kd_weight > 0:
            teacher = ctx.teacher_model()
            if teacher is None:
                raise ConfigError("--kd-weight > 0 needs a teacher (--teacher, or a recipe starting from the uncompressed model)")
            loss_fn = distillation_loss(teacher.to(ctx.device), temperature=c.temperature, kd_weight=c.kd_weight)
        peft_model = add_lora(model, c)
        self.report["data"] = data_desc
        self.report.update(train_adapters(peft_model, ctx, c, train, held, desc="lora", loss_fn=loss_fn))
        peft_model.to("cpu")
        if c.kd_weight > 0:
            ctx.teacher_model().to("cpu")
        if not c.merge_adapters:
            for p in peft_model.parameters():
                p.requires_grad_(False)
            return peft_model.eval()
        merged = merge_lora(peft_model)
        for p in merged.parameters():  # the Trainer's float32 masters were folded in; back to the run's dtype
            if p.is_floating_point():
                p.data = p.data.to(ctx.model_dtype)
        if masks:
            before = sparsity(masks, merged)
            reapply_zeros(merged, masks)
            self.report["sparsity_kept"] = round(before, 4)
        return merged.eval()
