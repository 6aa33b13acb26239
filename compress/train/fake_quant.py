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
import torch.nn.functional as F

from compress.core.config import option
from compress.core.errors import ConfigError
from compress.layers.quant_linear import QuantLinear
from compress.model.surgery import is_linear_like
from compress.layers.weights import linear_weight
from compress.kernels.quant_grid import (SCALE_DTYPE, QuantizedWeight, QuantSpec, WeightQuantConfig,
    params_from_range, quantize, round_scale)
from compress.train.trainer import TrainConfig, Trainer
from compress.kernels.losses import lm_loss

if TYPE_CHECKING:  # pragma: no cover
    from compress.pipeline.recipe import RunContext
    from compress.pipeline.method import Method

log = logging.getLogger("compress")

SCALE_MODES = ("fixed", "lsq", "minmax")
INITS = ("rtn", "gptq")


# ---------------------------------------------------------------------------------------------------------------
# Differentiable pieces
# ---------------------------------------------------------------------------------------------------------------
def grad_scale(x: torch.Tensor, g: torch.Tensor | float) -> torch.Tensor:
    """Value x, gradient g * dL/dx (LSQ, arXiv 1902.08153, Sec. 2.2 / its gradscale function)."""
    return (x - x * g).detach() + x * g


def stored_scale_ste(scale: torch.Tensor) -> torch.Tensor:
    """The float16 value the checkpoint will store, with an identity gradient."""
    return scale + (round_scale(scale) - scale).detach()


def ste_fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """w_hat = s * (q - z) with the grid's codes q = clamp(round(w/s) + z, 0, maxq) (compress.kernels.quant_grid.quantize, so
    the initial codes are exactly RTN's/GPTQ's), and the straight-through gradient of LSQ's clipped value
    v = clamp(w/s + z, 0, maxq): dw_hat/dw = 1 inside the range, 0 outside; dw_hat/ds = (q - z) - w/s inside,
    maxq - z above, -z below (LSQ eq. 3 with a zero point). The composed-ops reference of _FakeQuant."""
    v = torch.clamp(w / scale + zero, 0, maxq)
    q = quantize(w.detach(), scale.detach(), zero, maxq)
    return scale * (v + (q - v).detach() - zero)


def group_range(w: torch.Tensor, g_idx: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (row, group) min and max of w [out, in], with groups given by g_idx [in]; the range always holds 0."""
    idx = g_idx.long().unsqueeze(0).expand_as(w)
    zeros = torch.zeros(w.shape[0], n_groups, dtype=w.dtype, device=w.device)
    wmin = zeros.scatter_reduce(1, idx, w, "amin", include_self=True)
    wmax = zeros.scatter_reduce(1, idx, w, "amax", include_self=True)
    return wmin, wmax


class GroupLayout:
    """Moves per-group tensors [out, G] to per-column [out, in] and back (sums), for natural-order groups of
    `group_size` columns (the last possibly shorter) by reshapes, else through g_idx."""

    def __init__(self, g_idx: torch.Tensor, n_groups: int, group_size: int, natural: bool):
        self.g_idx, self.n_groups, self.natural = g_idx.long(), n_groups, natural
        in_f = g_idx.numel()
        self.gs = in_f if n_groups == 1 else group_size
        self.full = in_f // self.gs  # whole groups; a shorter last one holds in_f - full * gs columns
        self.in_f = in_f

    def expand(self, t: torch.Tensor) -> torch.Tensor:
        if not self.natural:
            return t[:, self.g_idx]
        out = t.shape[0]
        head = t[:, :self.full].unsqueeze(-1).expand(out, self.full, self.gs).reshape(out, self.full * self.gs)
        tail = self.in_f - self.full * self.gs
        if not tail:
            return head
        return torch.cat([head, t[:, self.full:].expand(out, tail)], dim=1)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if not self.natural:
            return torch.zeros(t.shape[0], self.n_groups, dtype=t.dtype, device=t.device).index_add_(1, self.g_idx, t)
        out = t.shape[0]
        head = t[:, :self.full * self.gs].reshape(out, self.full, self.gs).sum(-1)
        if self.full * self.gs == self.in_f:
            return head
        return torch.cat([head, t[:, self.full * self.gs:].sum(-1, keepdim=True)], dim=1)


class _FakeQuant(torch.autograd.Function):
    """ste_fake_quantize with the group expansion fused in: the same values and gradients, a fraction of the
    memory traffic (autograd of the composed expression saves and revisits several [out, in] tensors).
    Gradients: dw = g * 1[0 <= w/s + z <= maxq]; ds (per group) = sum of g * (q - v) inside, g * (q - z) outside,
    where v = w/s + z (LSQ eq. 3 with a zero point) and q = clamp(round(w/s) + z, 0, maxq)."""

    @staticmethod
    def forward(ctx, w, scale, zero, layout: GroupLayout, maxq: int):
        s, z = layout.expand(scale), layout.expand(zero)
        u = w / s
        v = u + z
        inside = (v >= 0) & (v <= maxq)
        q = torch.clamp(torch.round(u) + z, 0, maxq)  # compress.kernels.quant_grid.quantize
        w_hat = s * (q - z)
        ds = None
        if ctx.needs_input_grad[1]:
            ds = q - torch.where(inside, v, z)
        ctx.save_for_backward(inside if ctx.needs_input_grad[0] else None, ds)
        ctx.layout = layout
        return w_hat

    @staticmethod
    def backward(ctx, grad):
        inside, ds = ctx.saved_tensors
        gw = grad * inside if inside is not None else None
        gs = ctx.layout.sum(grad * ds) if ds is not None else None
        return gw, gs, None, None, None


class _ScaledCodes(torch.autograd.Function):
    """w_hat = s * (codes - z) with frozen integer codes: ds (per group) = sum of g * (codes - z) (PEQA)."""

    @staticmethod
    def forward(ctx, scale, codes, zero, layout: GroupLayout):
        ctx.save_for_backward(codes, zero)
        ctx.layout = layout
        return layout.expand(scale) * (codes.float() - layout.expand(zero))

    @staticmethod
    def backward(ctx, grad):
        codes, zero = ctx.saved_tensors
        return ctx.layout.sum(grad * (codes.float() - ctx.layout.expand(zero))), None, None, None


# ---------------------------------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------------------------------
class FakeQuantLinear(nn.Module):
    """A linear whose weight is fake-quantized on the forward pass. Build it with `from_quantized`."""

    is_compress_linear = True

    def __init__(self, qw: QuantizedWeight, *, latent: torch.Tensor | None, scale_mode: str = "fixed",
                 learn_scale: bool = False, bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        if scale_mode not in SCALE_MODES:
            raise ConfigError(f"--scale-mode {scale_mode!r} is not allowed; choose one of: {', '.join(SCALE_MODES)}")
        if latent is None and scale_mode == "minmax":
            raise ConfigError("--scale-mode minmax recomputes scales from trainable weights; frozen codes have none")
        spec = qw.spec
        self.spec, self.maxq, self.scale_mode, self.compute_dtype = spec, spec.maxq, scale_mode, dtype
        self.out_features, self.in_features = qw.codes.shape
        self.n_groups = qw.scales.shape[1]
        self.learn_scale = bool(learn_scale) or scale_mode == "lsq"
        self.lsq_gradient_scale = scale_mode == "lsq"  # PEQA trains scales with their plain gradient
        dev = qw.codes.device
        self.register_buffer("g_idx", qw.g_idx.to(torch.int32).clone())
        self.register_buffer("weight_zero", qw.zeros.float().clone())  # [out, G] integer zero points
        scale = qw.scales.float().clone()  # [out, G], float16 values held in float32 (the master copy when trained)
        if self.learn_scale:
            self.weight_scale = nn.Parameter(scale)
        else:
            self.register_buffer("weight_scale", scale)
        if latent is not None:
            self.weight = nn.Parameter(latent.detach().float().clone().to(dev))
            self.register_buffer("weight_codes", None)
        else:
            self.register_parameter("weight", None)
            self.register_buffer("weight_codes", qw.codes.to(torch.uint8).clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype).clone(), requires_grad=False)
        counts = torch.bincount(self.g_idx.long(), minlength=self.n_groups).float().clamp(min=1)  # N_W per group
        self.register_buffer("group_counts", counts)
        self.natural_order = qw.natural_order

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, **kw) -> "FakeQuantLinear":
        return cls(qw, **kw)

    # ---- grid ---------------------------------------------------------------------------------------------------
    def _grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) [out, G] as used in the forward pass: float16-valued scales, integer zeros."""
        if self.scale_mode == "minmax":  # LLM-QAT: MinMax of the current weights, a constant for the gradient
            with torch.no_grad():
                wmin, wmax = group_range(self.weight.detach().float(), self.g_idx, self.n_groups)
                return params_from_range(wmin, wmax, self.spec)
        s = self.weight_scale
        if self.lsq_gradient_scale:
            q_p = (self.maxq - self.weight_zero).clamp(min=1)  # positive levels of each group's grid
            s = grad_scale(s, torch.rsqrt(self.group_counts.unsqueeze(0) * q_p))
        return stored_scale_ste(s), self.weight_zero

    @property
    def layout(self) -> GroupLayout:
        return GroupLayout(self.g_idx, self.n_groups, self.spec.group_size, self.natural_order)

    def fake_weight(self) -> torch.Tensor:
        """W_hat [out, in] float32, differentiable with respect to whatever is trained."""
        s, z = self._grid()
        if self.weight is not None:
            return _FakeQuant.apply(self.weight.float(), s, z, self.layout, self.maxq)
        return _ScaledCodes.apply(s, self.weight_codes, z, self.layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.fake_weight().to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        with torch.no_grad():
            return self.fake_weight().to(dtype or self.compute_dtype)

    # ---- export -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def to_quantized(self) -> QuantizedWeight:
        """The integer codes, float16 scales and zero points the forward pass uses (bit-exact)."""
        s, z = self._grid()
        s, z = s.detach().float(), z.detach().float()
        if self.weight is not None:
            codes = quantize(self.weight.detach().float(), self.layout.expand(s), self.layout.expand(z), self.maxq)
        else:
            codes = self.weight_codes
        return QuantizedWeight(codes.to(torch.uint8), s.to(SCALE_DTYPE), z.to(torch.uint8), self.g_idx.clone(), self.spec)

    def to_quant_linear(self) -> QuantLinear:
        return QuantLinear.from_quantized(self.to_quantized(), self.bias, dtype=self.compute_dtype)

    def trainable(self) -> dict[str, nn.Parameter]:
        out = {}
        if self.weight is not None:
            out["weight"] = self.weight
        if self.learn_scale:
            out["weight_scale"] = self.weight_scale
        return out

    def extra_repr(self) -> str:
        what = "weights" if self.weight is not None else "frozen codes"
        return f"in={self.in_features}, out={self.out_features}, {self.spec.label()}, {what}, scales {self.scale_mode}" + \
            (" (trained)" if self.learn_scale else "")


# ---------------------------------------------------------------------------------------------------------------
# Model-level conversion
# ---------------------------------------------------------------------------------------------------------------
def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _block_linears(model: nn.Module, ctx: "RunContext") -> dict[str, nn.Module]:
    from compress.model.arch import find_blocks

    prefix, _ = find_blocks(model)
    return {n: m for n, m in model.named_modules() if n.startswith(prefix + ".") and is_linear_like(m) and ctx.include(n)}


def fake_quantize_model(model: nn.Module, ctx: "RunContext", spec: QuantSpec, *, init: str = "rtn",
                        train_weights: bool = True, scale_mode: str = "fixed", learn_scale: bool = False) -> dict[str, FakeQuantLinear]:
    """Quantize the decoder blocks' linears with `init` (a registered layer-wise quantizer run through the engine:
    rtn, or gptq on ctx.calibration), then replace each by a FakeQuantLinear on that grid. Trainable weights start
    from the original weights for RTN (they round to RTN's codes) and from GPTQ's dequantized weights for GPTQ (so
    the first forward pass is GPTQ's model); frozen codes (train_weights=False) are the initial quantizer's."""
    from compress.pipeline.recipe import Recipe

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
        _set_module(model, name, fq)
        converted[name] = fq
    if not converted:
        raise ConfigError("no linear layer to quantize (every one excluded by --ignore?)")
    return converted


def export_quantized(model: nn.Module) -> int:
    """Replace every FakeQuantLinear by the QuantLinear holding its integer codes. Returns how many."""
    names = [n for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)]
    for n in names:
        _set_module(model, n, model.get_submodule(n).to_quant_linear())
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

    def describe(self, extra: str = "") -> str:
        return f"{self.spec().label()} {self.quant_init}-init{(' ' + extra) if extra else ''} {self.steps} steps"


def heldout_split(data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(training, held-out) sequences: the last N//8 (at most 16) are held out to measure the loss before/after."""
    n_held = min(16, data.shape[0] // 8)
    if n_held == 0:
        return data, data[:0]
    return data[:-n_held], data[-n_held:]


def mean_loss(model: nn.Module, data: torch.Tensor, loss_fn: Callable, batch_size: int, device: torch.device) -> float:
    """Mean of loss_fn over `data` in micro-batches, without gradients."""
    total, n = 0.0, 0
    was = model.training
    model.eval()
    with torch.no_grad():
        for s in range(0, data.shape[0], batch_size):
            b = data[s:s + batch_size].to(device)
            total += float(loss_fn(model, {"input_ids": b})) * b.shape[0]
            n += b.shape[0]
    model.train(was)
    return total / max(n, 1)


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
        eval_fn = lambda m: {"heldout_loss": mean_loss(m, held, loss_fn, cfg.train_batch_size, device)}  # noqa: E731
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
    from compress.train.trainer import training_data

    src = source or (ctx.calibration.source.name if ctx.calibration is not None else "wikitext2")
    ids = training_data(ctx, model, cfg, source=src)
    return ids, {"source": src, "nsamples": int(ids.shape[0]), "seqlen": int(ids.shape[1]), "seed": ctx.seed + 1}


def with_calibration(ctx: "RunContext", ids: torch.Tensor, source_name: str = "generated") -> "RunContext":
    """A copy of ctx whose calibration is `ids` (e.g. data-free GPTQ calibrated on generated sequences)."""
    from compress.sources.data import Calibration, TextSource

    src = TextSource(source_name, "training sequences", "train", "model" if source_name == "generated" else source_name)
    return replace(ctx, calibration=Calibration(ids, src, ctx.seed + 1))


def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen deep copy (a teacher)."""
    teacher = copy.deepcopy(model)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
