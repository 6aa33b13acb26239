"""Fake quantization for training-aware methods (QAT, PEQA, LLM-QAT): weights quantized in the forward pass, trained
through the straight-through estimator, exported to the same packed-integer QuantLinear as RTN/GPTQ.

The grid is the project's (compress.kernels.quant_grid): per output channel or per group of input columns, asymmetric or
symmetric, w_hat = s * (q - z) with q = clamp(round(w / s) + z, 0, 2^b - 1), the codes RTN and GPTQ produce.
* Straight-through estimator (Bengio et al. 2013, arXiv 1308.3432): rounding passes the gradient of the clipped
  value v = clamp(w/s + z, 0, 2^b - 1) unchanged, so d w_hat / d w = 1 inside the clipping range and 0 outside.
* LSQ (Esser et al. 2020, arXiv 1902.08153): the step size s is a parameter; through the STE its gradient is eq. 3,
  (q - z) - w/s inside, Q_P = 2^b-1-z above, -Q_N = -z below, times the gradient scale
  g = 1 / sqrt(N_W * Q_P) of Sec. 2.2 (N_W: weights sharing that step size).
* Scales are used in the forward pass as the float16 value every checkpoint stores (a straight-through rounding),
  so the exported QuantLinear computes exactly what training saw.

A FakeQuantLinear holds either trainable float weights (QAT, LLM-QAT: `weight`) or frozen integer codes (PEQA:
`weight_codes`), and a scale per output channel and group (`weight_scale`) that is trained (PEQA, LSQ), fixed at
its initial grid, or recomputed from the weights' min/max at every step (LLM-QAT's MinMax). `run_quant_training`
is the pipeline the three methods share: initial grid (RTN or GPTQ, run through the registry and the engine),
trainable tensors, the shared Trainer, export to QuantLinear, report.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn as nn

from compress.core.config import option
from compress.core.errors import ConfigError
from compress.kernels.losses import lm_loss
from compress.kernels.quant_grid import (
    QuantSpec,
    WeightQuantConfig,
)
from compress.layers.fake_quant_linear import FakeQuantLinear
from compress.layers.quant_linear import QuantLinear
from compress.layers.weights import linear_weight
from compress.model.arch import find_blocks
from compress.model.surgery import is_linear_like, set_module
from compress.pipeline.recipe import Recipe
from compress.sources.data import Calibration, TextSource
from compress.train.trainer import TrainConfig, Trainer, heldout_loss, training_data, training_source

if TYPE_CHECKING:  # pragma: no cover
    from compress.pipeline.method import Method
    from compress.pipeline.recipe import RunContext

log = logging.getLogger("compress")

INITS = ("rtn", "gptq")


# ---------------------------------------------------------------------------------------------------------------
# Model-level conversion
# ---------------------------------------------------------------------------------------------------------------
def _block_linears(model: nn.Module, ctx: "RunContext") -> dict[str, nn.Module]:
    prefix, _ = find_blocks(model)
    return {n: m for n, m in model.named_modules() if n.startswith(prefix + ".") and is_linear_like(m) and ctx.include(n)}


def fake_quantize_model(model: nn.Module, ctx: "RunContext", spec: QuantSpec, *, init: str = "rtn",
                        train_weights: bool = True, scale_mode: str = "fixed", learn_scale: bool = False) -> dict[str, FakeQuantLinear]:
    """Quantize the decoder blocks' linears with `init` (a registered layer-wise quantizer run through the engine:
    rtn, or gptq on ctx.calibration), then replace each by a FakeQuantLinear on that grid. Trainable weights start
    from the original weights for RTN (they round to RTN's codes) and from GPTQ's dequantized weights for GPTQ (so
    the first forward pass is GPTQ's model); frozen codes (train_weights=False) are the initial quantizer's."""
    if init not in INITS:
        raise ConfigError(f"--quant-init {init!r} is not allowed; choose one of: {', '.join(INITS)}")
    originals = {}
    if train_weights and init == "rtn":
        originals = {n: linear_weight(m).detach().float().clone() for n, m in _block_linears(model, ctx).items()}
    Recipe.from_specs([{"method": init, "bits": spec.bits, "group_size": spec.group_size, "sym": spec.sym}]).run(model, ctx)
    converted: dict[str, FakeQuantLinear] = {}
    for name, mod in _block_linears(model, ctx).items():
        if not isinstance(mod, QuantLinear):
            continue
        qw = mod.quantized_weight()
        latent = None
        if train_weights:
            latent = originals[name] if name in originals else mod.dequantize_weight(torch.float32)
        fq = FakeQuantLinear(qw, latent=latent, scale_mode=scale_mode, learn_scale=learn_scale, bias=mod.bias,
                             dtype=mod.compute_dtype)
        set_module(model, name, fq)
        converted[name] = fq
    if not converted:
        raise ConfigError("no linear layer to quantize (every one excluded by --ignore?)")
    return converted


def export_quantized(model: nn.Module) -> int:
    """Replace every FakeQuantLinear by the QuantLinear holding its integer codes. Returns how many."""
    names = [n for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)]
    for n in names:
        set_module(model, n, model.get_submodule(n).to_quant_linear())
    return len(names)


# ---------------------------------------------------------------------------------------------------------------
# Options and the shared pipeline
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class QuantTrainConfig(WeightQuantConfig, TrainConfig):
    """Options shared by the training-aware quantizers: the grid (--bits, --group-size, --sym), the shared trainer's
    options, and the initial quantizer."""

    quant_init: str = option("rtn", "initial grid and codes: rtn, or gptq (calibrated on the run's calibration data)",
                             choices=INITS)

    def check(self) -> None:
        super().check()
        if self.observer != "minmax":
            raise ConfigError(f"observer {self.observer!r}: the training-aware quantizers learn their scales from a "
                              f"min/max start; allowed: minmax")

    def describe(self, extra: str = "") -> str:
        return f"{self.spec().label()} {self.quant_init}-init{(' ' + extra) if extra else ''} {self.steps} steps"


def heldout_split(data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(training, held-out) sequences: the last N//8 (at most 16) are held out to measure the loss before/after."""
    n_held = min(16, data.shape[0] // 8)
    if n_held == 0:
        return data, data[:0]
    return data[:-n_held], data[-n_held:]


def run_quant_training(method: "Method", model: nn.Module, ctx: "RunContext", data: torch.Tensor, *,
                       train_weights: bool, scale_mode: str, learn_scale: bool = False,
                       loss_fn: Callable = lm_loss, data_record: dict[str, Any] | None = None) -> nn.Module:
    """Initial grid -> FakeQuantLinear -> the shared Trainer on `data` [N, L] -> QuantLinear. Fills method.report."""
    cfg: QuantTrainConfig = method.config  # type: ignore[assignment]
    device = ctx.device
    modules = fake_quantize_model(model, ctx, cfg.spec(), init=cfg.quant_init, train_weights=train_weights,
                                  scale_mode=scale_mode, learn_scale=learn_scale)
    for p in model.parameters():
        p.requires_grad_(False)
    params, kinds = [], set()
    for fq in modules.values():
        for kind, p in fq.trainable().items():
            p.requires_grad_(True)
            params.append(p)
            kinds.add(kind)
    n_scales = sum(fq.weight_scale.numel() for fq in modules.values())
    model.to(device)
    train, held = heldout_split(data)
    eval_fn = None
    if held.shape[0]:
        eval_fn = lambda m: {"heldout_loss": heldout_loss(m, held, cfg.train_batch_size, loss_fn)}  # noqa: E731
    log.info("%s: %d linears fake-quantized (%s, %s-init), training %s: %d parameters; %d training / %d held-out "
             "sequences of %d tokens", method.name, len(modules), cfg.spec().label(), cfg.quant_init,
             " + ".join(sorted(kinds)), sum(p.numel() for p in params), train.shape[0], held.shape[0], data.shape[1])
    trainer = Trainer(model, train, cfg, params=params, loss_fn=loss_fn, eval_fn=eval_fn, device=device,
                      seed=ctx.seed, desc=method.name, progress=ctx.progress)
    before = eval_fn(model)["heldout_loss"] if eval_fn else None
    result = trainer.train()
    del trainer  # AdamW moments
    export_quantized(model)
    for p in model.parameters():
        p.requires_grad_(False)
    after = result.evals[-1]["heldout_loss"] if result.evals else None
    method.report.update({
        "init": cfg.quant_init, "grid": cfg.spec().label(), "scale_mode": scale_mode if train_weights else "trained",
        "trained_tensors": sorted(kinds), "scales": n_scales, "linears": len(modules),
        "heldout_loss_init": None if before is None else round(before, 5),
        "heldout_loss_final": None if after is None else round(after, 5),
        "training": result.summary(), "loss_curve": [round(x, 5) for x in result.losses], "train_data": data_record or {},
    })
    if before is not None and after is not None:
        log.info("%s: held-out loss %.4f at the initial grid -> %.4f after %d steps", method.name, before, after, result.steps)
    return model


def training_sequences(ctx: "RunContext", model: nn.Module, cfg: TrainConfig, source: str | None = None):
    """(ids [N, L], record) drawn by the trainer's training_data, with what they are for the report."""
    src = source or training_source(ctx)
    ids = training_data(ctx, model, cfg, source=src)
    return ids, {"source": src, "nsamples": int(ids.shape[0]), "seqlen": int(ids.shape[1]), "seed": ctx.seed + 1}


def with_calibration(ctx: "RunContext", ids: torch.Tensor, source_name: str = "generated") -> "RunContext":
    """A copy of ctx whose calibration is `ids` (e.g. data-free GPTQ calibrated on generated sequences)."""
    src = TextSource(source_name, "training sequences", "train", "model" if source_name == "generated" else source_name)
    return replace(ctx, calibration=Calibration(ids, src, ctx.seed + 1))


def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen deep copy (a teacher)."""
    teacher = copy.deepcopy(model)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
