"""Knowledge distillation teacher -> student (Hinton et al. 2015, arXiv 1503.02531; token-level KD for LMs as in
MiniLLM/DistilBERT-style setups): the student minimises

    kd_weight * T^2 KL(softmax(z_teacher / T) || softmax(z_student / T))  +  (1 - kd_weight) * CE(z_student, next token)
    (+ hidden_weight * MSE(final hidden states), the optional hidden-state matching)

over training windows of the calibration source (compress.train.trainer.distillation_loss, the shared Trainer).

The student is the model this stage receives: in `compress distill` the --model itself, in a recipe the output of
the earlier stages (a pruned model: "KD recovery"). `--student-layers K` first drops it to K decoder blocks
(compress.train.layer_drop: evenly spread, or the K with the highest Block Influence on the calibration data). The
teacher is --teacher, or in a recipe the uncompressed model the run started from. Every parameter of the student's
decoder blocks is trained (embeddings and head stay frozen); weights that are exactly zero when training starts
(a pruned student's masks) stay zero, so a pruned model keeps its sparsity.
"""
from __future__ import annotations

from dataclasses import dataclass

from compress.core.config import option
from compress.core.errors import ConfigError
from compress.kernels.losses import lm_loss
from compress.model.arch import find_blocks
from compress.pipeline.method import Method, Needs, register
from compress.train.finetune import keep_zeros_in_training, require_float_linears, sparsity, zero_masks
from compress.train.layer_drop import block_influence, drop_blocks, importance_keep, uniform_keep
from compress.train.trainer import TrainConfig, Trainer, distillation_loss, training_data


@dataclass
class DistillConfig(TrainConfig):
    lr: float = option(1e-4, "peak learning rate (AdamW)", range=(0.0, 1.0))
    kd_weight: float = option(0.5, "weight of the KD term; the LM loss gets 1 - kd_weight (0: plain LM training)",
                              range=(0.0, 1.0))
    temperature: float = option(2.0, "softmax temperature of the KD term", range=(0.05, 100.0))
    hidden_weight: float = option(0.0, "weight of the final-hidden-state matching (MSE) term", range=(0.0, None))
    student_layers: int | None = option(None, "drop the student to this many decoder blocks first (default: keep all)",
                                        range=(1, None))
    layer_selection: str = option("uniform", "which blocks a --student-layers student keeps: uniform (evenly spread, "
                                             "first and last kept) or importance (highest Block Influence, ShortGPT)",
                                  choices=("uniform", "importance"))


@register("distill", family="distillation",
          summary="Knowledge distillation (KD + LM loss, optional hidden matching) into a layer-dropped or compressed student",
          paper="Hinton et al. 2015, arXiv 1503.02531; layer choice: Men et al. 2024, arXiv 2403.03853")
class Distill(Method):
    Config = DistillConfig
    needs = Needs(calibration=True, gradients=True, teacher=True)

    def describe(self) -> str:
        c = self.config
        student = f"{c.student_layers} blocks {c.layer_selection} " if c.student_layers else ""
        return f"{student}kd {c.kd_weight:g} T{c.temperature:g}{f' hidden {c.hidden_weight:g}' if c.hidden_weight else ''} {c.steps} steps"

    def apply(self, model, ctx):
        import torch

        c = self.config
        teacher = ctx.teacher_model()
        if teacher is None and (c.kd_weight > 0 or c.hidden_weight > 0):
            raise ConfigError("distill needs a teacher (--teacher, or a recipe that starts from the uncompressed model)")
        if teacher is not None and teacher.config.vocab_size != model.config.vocab_size:
            raise ConfigError(f"teacher and student vocabularies differ ({teacher.config.vocab_size} vs "
                              f"{model.config.vocab_size}); token-level KD needs the same tokenizer")
        require_float_linears(model, "distill", "run distill before quantization (a student's integer codes cannot "
                                                "be trained)")
        model.to("cpu")
        _, blocks = find_blocks(model)
        n_before = len(blocks)
        if c.student_layers is not None:
            if c.layer_selection == "importance":
                if ctx.calibration is None:
                    raise ConfigError("--layer-selection importance needs calibration data")
                scores = block_influence(model, ctx.calibration.input_ids, batch_size=ctx.batch_size, device="cpu")
                keep = importance_keep(scores, c.student_layers)
                self.report["block_influence"] = [round(s, 5) for s in scores]
            else:
                keep = uniform_keep(n_before, c.student_layers)
            drop_blocks(model, keep)
            self.report["kept_blocks"] = keep
            self.report["blocks"] = f"{n_before} -> {len(keep)}"
        masks = zero_masks(model)
        if masks:
            self.report["sparsity_kept"] = round(sparsity(masks, model), 4)
        ids = training_data(ctx, model, c)
        for p in model.parameters():
            p.requires_grad_(False)
        _, blocks = find_blocks(model)
        params = [p for b in blocks for p in b.parameters()]
        for p in params:
            p.requires_grad_(True)
        plain = c.kd_weight == 0 and c.hidden_weight == 0
        loss_fn = lm_loss if plain else distillation_loss(teacher.to(ctx.device), temperature=c.temperature,
                                                          kd_weight=c.kd_weight, hidden_weight=c.hidden_weight)
        handles = keep_zeros_in_training(model, masks)
        model.to(ctx.device)
        try:
            result = Trainer(model, ids, c, params=params, loss_fn=loss_fn, device=ctx.device, seed=ctx.seed,
                             desc="distill" if not plain else "LM training", progress=ctx.progress).train()
        finally:
            for h in handles:
                h.remove()
        with torch.no_grad():  # the Trainer keeps float32 master weights; the student goes back to the run's dtype
            for p in params:
                p.data = p.data.to(ctx.model_dtype)
                p.requires_grad_(False)
        if teacher is not None:
            teacher.to("cpu")
        model.to("cpu").eval()
        if masks:
            self.report["sparsity_after"] = round(sparsity(zero_masks(model), model), 4)
        self.report.update({"loss": "lm" if plain else "kd", **result.summary()})
        return model
