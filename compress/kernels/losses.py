"""Losses shared by training, distillation and gradient-based importance."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

Batch = dict[str, torch.Tensor]


def lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean next-token cross-entropy; labels default to the inputs, -100 marks ignored positions."""
    labels = batch.get("labels", batch["input_ids"])
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)
    logits = out.logits[:, :-1, :].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
          mask: torch.Tensor | None = None) -> torch.Tensor:
    """Token-level knowledge distillation (Hinton et al. 2015, arXiv 1503.02531): T^2 * KL(p_teacher || p_student) of
    the temperature-softened next-token distributions, averaged over (unmasked) token positions."""
    t = float(temperature)
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)  # [..., tokens]
    if mask is not None:
        kl = kl[mask]
    return kl.mean() * t * t
