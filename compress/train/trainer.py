"""The one training loop, shared by every training-aware method (QAT, PEQA, LLM-QAT, QLoRA, distillation, LoRA
recovery after pruning).

A short, deterministic loop: AdamW, linear warm-up then cosine decay, gradient clipping, gradient accumulation,
gradient checkpointing where the model supports it, bfloat16 autocast where the device runs it, a progress bar
with the loss, periodic evaluation, and checkpoint/resume of the whole training state (trainable weights, AdamW
moments, step, loss history) in safetensors + JSON. The batch order is a pure function of (seed, step), so a run
resumed from its saved state continues on the same loss curve.

Data is a dict of tensors with the same first dimension: {"input_ids": [N, L], optional "labels" (-100 =
ignored), optional "attention_mask"}. The loss is next-token cross-entropy unless a `loss_fn(model, batch)` is given
(knowledge distillation passes its own).
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from compress.core.config import MethodConfig, option
from compress.core.errors import ConfigError, DataError
from compress.core.paths import atomic_write_bytes
from compress.core.readers import load_safetensors, read_json_object
from compress.kernels.losses import Batch, kd_kl, lm_loss
from compress.sources.data import get_calibration

log = logging.getLogger("compress")

@dataclass
class TrainConfig(MethodConfig):
    """Options of the shared training loop; training-aware method configs inherit them (same CLI flags)."""

    steps: int = option(200, "optimizer steps", range=(1, None))
    lr: float = option(1e-5, "peak learning rate (AdamW)", range=(0.0, 1.0))
    weight_decay: float = option(0.0, "AdamW weight decay", range=(0.0, 1.0))
    warmup: float = option(0.05, "linear warm-up, as a fraction of the steps", range=(0.0, 1.0))
    train_batch_size: int = option(4, "sequences per micro-batch", range=(1, None))
    grad_accum: int = option(1, "micro-batches accumulated per optimizer step", range=(1, None))
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0: no clipping)", range=(0.0, None))
    train_samples: int = option(256, "training sequences drawn from the calibration source", range=(1, None))
    train_seqlen: int = option(256, "tokens per training sequence", range=(2, None))
    grad_checkpointing: bool = option(False, "recompute activations in the backward pass to save memory")
    autocast: str = option("auto", "compute dtype in the loop: auto (bfloat16 where supported), bfloat16, float32",
                           choices=("auto", "bfloat16", "float32"))
    eval_every: int = option(0, "evaluate every N steps (0: only at the end)", range=(0, None))
    save_every: int = option(0, "save the training state every N steps for --resume (0: never)", range=(0, None))
    resume: str | None = option(None, "folder of a saved training state to resume from (also where states are saved)")

    def schedule(self, step: int) -> float:
        """Learning-rate multiplier at optimizer step `step` (0-based): linear warm-up, then cosine to zero."""
        warm = int(round(self.warmup * self.steps))
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, self.steps - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # mean loss of each optimizer step
    evals: list[dict[str, Any]] = field(default_factory=list)  # {"step": s, **metrics}
    steps: int = 0
    seconds: float = 0.0
    trainable_params: int = 0

    def summary(self) -> dict[str, Any]:
        head = self.losses[: max(1, min(10, len(self.losses)))]
        tail = self.losses[-max(1, min(10, len(self.losses))):]
        return {"steps": self.steps, "seconds": round(self.seconds, 1), "trainable_params": self.trainable_params,
                "loss_first": round(sum(head) / len(head), 5) if self.losses else None,
                "loss_last": round(sum(tail) / len(tail), 5) if self.losses else None, "evals": self.evals}


def distillation_loss(teacher: nn.Module, *, temperature: float = 2.0, kd_weight: float = 1.0,
                      hidden_weight: float = 0.0) -> Callable[[nn.Module, Batch], torch.Tensor]:
    """loss_fn for the Trainer: kd_weight * KD + (1 - kd_weight) * LM loss (+ hidden_weight * mean-squared error of
    the final hidden states, the optional hidden-state matching). The teacher runs without gradients."""
    if not 0.0 <= kd_weight <= 1.0:
        raise ConfigError(f"--kd-weight {kd_weight!r} is out of range; allowed: 0.0..1.0")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    def loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
        ids, att = batch["input_ids"], batch.get("attention_mask")
        want_hidden = hidden_weight > 0
        with torch.no_grad():
            t_out = teacher(input_ids=ids, attention_mask=att, use_cache=False, output_hidden_states=want_hidden)
        s_out = model(input_ids=ids, attention_mask=att, use_cache=False, output_hidden_states=want_hidden)
        labels = batch.get("labels", ids)[:, 1:]
        mask = labels != -100
        s_logits, t_logits = s_out.logits[:, :-1], t_out.logits[:, :-1]
        loss = kd_weight * kd_kl(s_logits, t_logits, temperature, mask)
        if kd_weight < 1.0:
            ce = F.cross_entropy(s_logits.float().reshape(-1, s_logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
            loss = loss + (1.0 - kd_weight) * ce
        if want_hidden:
            loss = loss + hidden_weight * F.mse_loss(s_out.hidden_states[-1].float(), t_out.hidden_states[-1].float())
        return loss

    return loss_fn


def resolve_autocast(choice: str, device: torch.device) -> torch.dtype | None:
    if choice == "float32":
        return None
    if choice == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16  # CPU autocast in bfloat16 runs the matmuls ~2x faster than float32 here


class Trainer:
    """Train `params` of `model` on `data`. Parameters being trained are kept in float32 (master weights)."""

    def __init__(self, model: nn.Module, data: Batch | torch.Tensor, config: TrainConfig, *,
                 params: Iterable[nn.Parameter] | None = None, loss_fn: Callable[[nn.Module, Batch], torch.Tensor] = lm_loss,
                 eval_fn: Callable[[nn.Module], dict[str, float]] | None = None, device: torch.device | str = "cpu",
                 seed: int = 0, desc: str = "training", progress: bool = True):
        config.validate()
        self.model, self.config, self.loss_fn, self.eval_fn = model, config, loss_fn, eval_fn
        self.data = {"input_ids": data} if isinstance(data, torch.Tensor) else dict(data)
        n = {v.shape[0] for v in self.data.values()}
        if len(n) != 1:
            raise ConfigError(f"training data tensors disagree on their number of sequences: {sorted(n)}")
        self.n = n.pop()
        if self.n < 1:
            raise ConfigError("training data is empty")
        self.device = torch.device(device)
        self.seed, self.desc, self.progress = seed, desc, progress
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        self.params = list(params)
        if not self.params:
            raise ConfigError("nothing to train: no parameter requires a gradient")
        ids = {id(p) for p in self.params}
        self.names = [n for n, p in model.named_parameters() if id(p) in ids]
        if len(self.names) != len(self.params):
            raise ConfigError("every trained parameter must belong to the model")
        for p in self.params:
            if p.dtype != torch.float32:
                p.data = p.data.float()
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.autocast_dtype = resolve_autocast(config.autocast, self.device)
        self.result = TrainResult(trainable_params=sum(p.numel() for p in self.params))
        self.state_dir = Path(config.resume) if config.resume else None

    # ---- data order: a pure function of (seed, step) ------------------------------------------------------------
    def _indices(self, step: int, micro: int) -> torch.Tensor:
        bs = self.config.train_batch_size
        per_epoch = max(1, self.n // bs)
        k = step * self.config.grad_accum + micro
        epoch, pos = divmod(k, per_epoch)
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        idx = perm[pos * bs:(pos + 1) * bs]
        return idx if len(idx) else perm[:bs]

    def _batch(self, step: int, micro: int) -> Batch:
        idx = self._indices(step, micro)
        return {k: v[idx].to(self.device) for k, v in self.data.items()}

    # ---- state --------------------------------------------------------------------------------------------------
    def save_state(self, step: int) -> None:
        from safetensors.torch import save_file

        assert self.state_dir is not None
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tensors = {f"param.{n}": p.detach().cpu().contiguous() for n, p in zip(self.names, self.params)}
        for i, p in enumerate(self.params):
            st = self.optimizer.state.get(p, {})
            for k in ("exp_avg", "exp_avg_sq"):
                if k in st:
                    tensors[f"adam.{i}.{k}"] = st[k].detach().cpu().contiguous()
        tmp = self.state_dir / f".state.safetensors.tmp-{os.getpid()}"
        save_file(tensors, str(tmp))
        os.replace(tmp, self.state_dir / "state.safetensors")
        meta = {"step": step, "losses": self.result.losses, "evals": self.result.evals, "seed": self.seed,
                "adam_step": {i: float(self.optimizer.state[p]["step"]) for i, p in enumerate(self.params) if p in self.optimizer.state},
                "config": asdict(self.config)}
        atomic_write_bytes(self.state_dir / "trainer_state.json", json.dumps(meta, indent=1).encode())

    def load_state(self) -> int:
        assert self.state_dir is not None
        meta_path = self.state_dir / "trainer_state.json"
        if not meta_path.is_file():
            return 0
        meta = read_json_object(meta_path, "trainer state")
        tensors = load_safetensors(self.state_dir / "state.safetensors", "trainer state")
        missing = [n for n in self.names if f"param.{n}" not in tensors]
        if missing:
            raise ConfigError(f"--resume {str(self.state_dir)!r} holds a different set of trained parameters (missing {missing[:3]})")
        for i, (n, p) in enumerate(zip(self.names, self.params)):
            p.data.copy_(tensors[f"param.{n}"])
            if f"adam.{i}.exp_avg" in tensors:
                self.optimizer.state[p] = {
                    "step": torch.tensor(meta["adam_step"][str(i)]),
                    "exp_avg": tensors[f"adam.{i}.exp_avg"].to(p.device),
                    "exp_avg_sq": tensors[f"adam.{i}.exp_avg_sq"].to(p.device),
                }
        self.result.losses = list(meta["losses"])
        self.result.evals = list(meta["evals"])
        log.info("resuming training from step %d (%s)", meta["step"], self.state_dir)
        return int(meta["step"])

    # ---- loop ---------------------------------------------------------------------------------------------------
    def _evaluate(self, step: int) -> None:
        if self.eval_fn is None:
            return
        was = self.model.training
        self.model.eval()
        with torch.no_grad():
            metrics = self.eval_fn(self.model)
        self.model.train(was)
        self.result.evals.append({"step": step, **metrics})
        log.info("step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    def train(self, *, stop_after: int | None = None) -> TrainResult:
        """Run to `config.steps` (or stop after `stop_after` steps of this call, for tests of resumption)."""
        from tqdm.auto import tqdm

        cfg = self.config
        start = self.load_state() if self.state_dir is not None else 0
        if cfg.grad_checkpointing and hasattr(self.model, "gradient_checkpointing_enable"):
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.train()
        t0 = time.perf_counter()

        def amp():
            return torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype else nullcontext()

        bar = tqdm(range(start, cfg.steps), desc=self.desc, unit="step", disable=not self.progress, initial=start, total=cfg.steps)
        done = 0
        try:
            for step in bar:
                for group in self.optimizer.param_groups:
                    group["lr"] = cfg.lr * cfg.schedule(step)
                self.optimizer.zero_grad(set_to_none=True)
                total = 0.0
                for micro in range(cfg.grad_accum):
                    batch = self._batch(step, micro)
                    with amp():
                        loss = self.loss_fn(self.model, batch)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"{self.desc}: loss is {loss.item()} at step {step}")
                    (loss / cfg.grad_accum).backward()
                    total += loss.item() / cfg.grad_accum
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
                self.optimizer.step()
                self.result.losses.append(total)
                bar.set_postfix(loss=f"{total:.4f}", lr=f"{cfg.lr * cfg.schedule(step):.2e}")
                if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
                    self._evaluate(step + 1)
                if self.state_dir is not None and cfg.save_every and (step + 1) % cfg.save_every == 0:
                    self.save_state(step + 1)
                done += 1
                if stop_after is not None and done >= stop_after:
                    break
        finally:
            bar.close()
            self.model.eval()
            if cfg.grad_checkpointing and hasattr(self.model, "gradient_checkpointing_disable"):
                self.model.gradient_checkpointing_disable()
        self.result.steps = start + done
        self.result.seconds += time.perf_counter() - t0
        if self.result.steps >= cfg.steps:
            self._evaluate(cfg.steps)
        return self.result


def training_source(ctx: Any) -> str:
    """The text a training-aware method reads by default: the run's calibration source (C4 without one)."""
    return ctx.calibration.source.name if ctx.calibration is not None else "c4"


@torch.no_grad()
def heldout_loss(model: nn.Module, batch: Batch | torch.Tensor, batch_size: int = 4, loss_fn: Callable = lm_loss) -> float:
    """Mean of loss_fn (next-token cross-entropy by default) over every labelled token of the held-out sequences,
    in micro-batches, model in eval mode."""
    batch = {"input_ids": batch} if isinstance(batch, torch.Tensor) else batch
    was = model.training
    model.eval()
    device = next(p for p in model.parameters() if p.is_floating_point()).device
    total, count = 0.0, 0
    for s in range(0, batch["input_ids"].shape[0], batch_size):
        part = {k: v[s:s + batch_size].to(device) for k, v in batch.items()}
        labels = part.get("labels", part["input_ids"])
        tokens = int((labels[:, 1:] != -100).sum())
        total += float(loss_fn(model, part)) * tokens
        count += tokens
    model.train(was)
    if count == 0:
        raise DataError("the held-out set has no labelled tokens")
    return total / count


def training_data(ctx: Any, model: nn.Module, config: TrainConfig, source: str | None = None) -> torch.Tensor:
    """Training sequences for a training-aware method: the run's calibration source (or `source`), drawn with the
    training sample count and length and a seed of its own, so they never equal the calibration windows."""
    src = source or training_source(ctx)
    cal = get_calibration(src, ctx.tokenizer, nsamples=config.train_samples, seqlen=config.train_seqlen,
                          seed=ctx.seed + 1, data_dir=ctx.data_dir, model=model, fallback=ctx.data_dir is None)
    return cal.input_ids
