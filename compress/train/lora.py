"""LoRA adapters (Hu et al. 2021, arXiv 2106.09685: W + (alpha/r) B A, B initialised to zero) through peft, shared by
QLoRA fine-tuning and by "LoRA recovery" stages after pruning or quantization."""
from __future__ import annotations

import logging
from typing import Sequence

import torch.nn as nn

from compress.core.config import MethodConfig, option
from dataclasses import dataclass

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


def lora_finetune(model: nn.Module, data, opts: LoraOptions, train, *, device="cpu", seed: int = 0,
                  progress: bool = True, desc: str = "LoRA"):
    """Train LoRA adapters on `model` with the shared Trainer (`train`: a compress.train.trainer.TrainConfig), then merge
    them into its weights. Returns (the plain merged model, the TrainResult). Used for recovery after pruning."""
    from compress.train.trainer import Trainer

    peft_model = add_lora(model, opts)
    result = Trainer(peft_model, data, train, device=device, seed=seed, desc=desc, progress=progress).train()
    return merge_lora(peft_model), result
