"""LoRA adapters (Hu et al. 2021, arXiv 2106.09685: W + (alpha/r) B A, B initialised to zero) through peft, shared by
QLoRA fine-tuning and by "LoRA recovery" stages after pruning or quantization."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn

from compress.core.config import MethodConfig, option
from compress.kernels.losses import Batch, lm_loss
from compress.train.trainer import Trainer, heldout_loss

log = logging.getLogger("compress")


@dataclass
class LoraOptions(MethodConfig):
    lora_r: int = option(8, "LoRA rank r", range=(1, 4096))
    lora_alpha: float = option(16.0, "LoRA scaling alpha (the update is alpha/r * B A)", range=(0.0, None))
    lora_dropout: float = option(0.05, "dropout on the LoRA input", range=(0.0, 1.0))
    lora_targets: str = option("all-linear", "comma-separated module name suffixes to adapt (e.g. q_proj,v_proj), or all-linear")


def lora_target_modules(model: nn.Module, targets: str) -> list[str] | str:
    """peft's target_modules: every linear inside the decoder blocks for 'all-linear', else the given suffixes."""
    if targets.strip() == "all-linear":
        from compress.model.arch import find_blocks, linear_names

        _, blocks = find_blocks(model)
        names = sorted({n.rsplit(".", 1)[-1] for b in blocks for n in linear_names(b)})
        return names
    return [t.strip() for t in targets.split(",") if t.strip()]


def add_lora(model: nn.Module, opts: LoraOptions, *, targets: Sequence[str] | str | None = None) -> nn.Module:
    """Wrap `model` with trainable LoRA adapters; every original weight is frozen. Returns the peft model."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=opts.lora_r, lora_alpha=opts.lora_alpha, lora_dropout=opts.lora_dropout, bias="none",
                     task_type="CAUSAL_LM", target_modules=targets or lora_target_modules(model, opts.lora_targets))
    peft_model = get_peft_model(model, cfg)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    log.info("LoRA r=%d on %s: %d trainable parameters", opts.lora_r, cfg.target_modules, trainable)
    return peft_model


def merge_lora(peft_model: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights (W <- W + alpha/r B A) and return the plain model."""
    merged = peft_model.merge_and_unload()
    for p in merged.parameters():
        p.requires_grad_(False)
    return merged


def describe_losses(before: float, after: float) -> dict[str, float]:
    return {"heldout_loss_before": round(before, 5), "heldout_loss_after": round(after, 5),
            "heldout_ppl_before": round(math.exp(before), 4), "heldout_ppl_after": round(math.exp(after), 4)}


# ---------------------------------------------------------------------------------------------------------------
# Training adapters, and keeping a pruned model's zeros where they are
# ---------------------------------------------------------------------------------------------------------------
def train_adapters(peft_model: nn.Module, ctx: Any, config: Any, train: Batch | torch.Tensor, held: Batch | None, *,
                   desc: str, loss_fn=lm_loss) -> dict[str, Any]:
    """Train the adapters of `peft_model` with the shared Trainer (`config`: a TrainConfig); with a held-out batch,
    its loss before and after. Returns the report: training summary (plus held-out losses)."""
    bs = config.train_batch_size
    peft_model.to(ctx.device)
    if held is None:
        return Trainer(peft_model, train, config, loss_fn=loss_fn, device=ctx.device, seed=ctx.seed, desc=desc,
                       progress=ctx.progress).train().summary()
    before = heldout_loss(peft_model, held, bs)
    log.info("%s: held-out loss before training %.4f", desc, before)
    trainer = Trainer(peft_model, train, config, loss_fn=loss_fn, device=ctx.device, seed=ctx.seed, desc=desc,
                      progress=ctx.progress, eval_fn=lambda m: {"heldout_loss": heldout_loss(m, held, bs)})
    result = trainer.train()
    after = result.evals[-1]["heldout_loss"] if result.evals else heldout_loss(peft_model, held, bs)
    log.info("%s: held-out loss %.4f -> %.4f after %d steps", desc, before, after, result.steps)
    return {**result.summary(), **describe_losses(before, after)}
