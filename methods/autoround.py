"""AutoRound / SignRound (Cheng et al. 2023, arXiv 2309.05516): learn each weight's rounding and each group's
clipping by signed gradient descent on the decoder block's output error, then store ordinary integer codes.

Per decoder block, as the paper's Algorithm 1 and the reference `auto-round`:
    targets Y = the float block's outputs on the float model's inputs of this block (a second, float stream of
        activations kept beside the engine's quantized one, the reference's default `enable_quanted_input`)
    learnable V in [-0.5, 0.5] per weight, alpha, beta in [0.5, 1] per group (init 0, 1, 1), every target linear
    for t in 1..T (T = 200):
        a mini-batch of `minibatch` (8) calibration sequences, drawn as the reference's sampler does: one shuffle
            of the samples per pass, consecutive slices of it, a fresh shuffle when fewer than a batch remain
        loss = MSE(block~(X_q), Y)        block~: fake-quantized weights W~ (eq. 1-2), X_q its quantized-stream input
        theta <- clip(theta - lr_t sign(d loss / d theta))       SignSGD (eq. 4), lr_t = lr (1 - t/T), lr = 1/T
        keep the parameters of the lowest loss seen (the reference's best-iteration choice)
    codes = clamp(round(W / s + V) + zp) on RTN's grid (compress.kernels.signround) -> QuantLinear
With --iters 0 nothing is learned and the codes are RTN's (min/max) exactly. Linear learning-rate decay and the
best-loss choice are the reference code's (auto-round 0.x `LinearLR`, `best_params`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from compress.core.config import option
from compress.core.errors import ConfigError
from compress.kernels.quant_grid import QuantSpec, WeightQuantConfig
from compress.kernels.signround import group_view, signround_fake_quant, signround_quantize, ungroup
from compress.layers.quant_linear import QuantLinear
from compress.layers.weights import linear_weight
from compress.pipeline.method import Method, Needs, register

log = logging.getLogger("compress")


@dataclass
class AutoRoundConfig(WeightQuantConfig):
    iters: int = option(200, "SignSGD steps per block (the paper's 200; 0: RTN's codes)", range=(0, None))
    lr: float | None = option(None, "SignSGD step size, decayed linearly to 0 (default 1/iters, the paper's)",
                              range=(0.0, 1.0))
    minibatch: int = option(8, "calibration sequences per step (the paper's batch 8)", range=(1, None))

    def check(self) -> None:
        if self.signed_scale:
            raise ConfigError("--signed-scale: autoround learns its clipping on the min/max grid (SignRound eq. 1); "
                              "use --sym alone")
        if self.observer != "minmax":
            raise ConfigError(f"autoround learns its own clipping (alpha, beta) from min/max; --observer {self.observer!r} "
                              "is not allowed (use minmax)")


class _SignRoundLinear(nn.Module):
    """A float linear during training: W~ from the frozen W and the learnable V, alpha, beta."""

    def __init__(self, linear: nn.Module, spec: QuantSpec):
        super().__init__()
        w = linear_weight(linear).detach().float()
        self.spec, self.in_features, self.out_features = spec, w.shape[1], w.shape[0]
        self.register_buffer("wg", group_view(w, spec.group_size))
        self.bias = getattr(linear, "bias", None)
        self.dtype = linear_weight(linear).dtype
        self.v = nn.Parameter(torch.zeros_like(self.wg))
        self.alpha = nn.Parameter(torch.ones(self.wg.shape[:2], device=w.device))
        self.beta = nn.Parameter(torch.ones(self.wg.shape[:2], device=w.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = ungroup(signround_fake_quant(self.wg, self.v, self.alpha, self.beta, self.spec), self.in_features)
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def clamp_(self) -> None:
        self.v.clamp_(-0.5, 0.5)
        self.alpha.clamp_(0.5, 1.0)
        self.beta.clamp_(0.5, 1.0)

    def to_quant_linear(self) -> QuantLinear:
        w = ungroup(self.wg, self.in_features)
        qw = signround_quantize(w, self.v, self.alpha, self.beta, self.spec)
        return QuantLinear.from_quantized(qw, self.bias, dtype=self.dtype)


def _batches(n: int, size: int, gen: torch.Generator):
    """Mini-batch indices without replacement within a pass: every sample is seen equally often (auto-round's
    IndexSampler); a new permutation when fewer than `size` remain."""
    size = min(size, n)
    perm, pos = torch.randperm(n, generator=gen), 0
    while True:
        if pos + size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        yield perm[pos:pos + size]
        pos += size


def _out(o):
    return o[0] if isinstance(o, (tuple, list)) else o


@register("autoround", family="quantization", summary="AutoRound: rounding and clipping learned by SignSGD on each block's "
                                                      "output error",
          paper="Cheng et al. 2023, arXiv 2309.05516")
class AutoRound(Method):
    Config = AutoRoundConfig
    needs = Needs(calibration=True)
    layerwise = True

    def __init__(self, config=None):
        super().__init__(config)
        self._float_inputs: torch.Tensor | None = None

    def describe(self) -> str:
        return f"{self.config.spec().label()} iters {self.config.iters}"

    def prepare(self, model, ctx) -> None:
        self._float_inputs = None
        self._seed = ctx.seed

    def _forward(self, block, x, kwargs_of):
        return _out(block(x, **kwargs_of(x.shape[0])))

    def compress_block(self, block) -> None:
        c = self.config
        eng = block.engine
        spec = c.spec()
        dev = eng.device

        def kw(bs: int) -> dict:  # the model's block kwargs for a mini-batch of bs sequences, on the device
            return {k: v.to(dev) if isinstance(v, torch.Tensor) else
                    tuple(t.to(dev) for t in v) if isinstance(v, tuple) and v and isinstance(v[0], torch.Tensor) else v
                    for k, v in eng.block_kwargs(bs).items()}

        xq = eng.inputs.data
        if block.index == 0 or self._float_inputs is None:
            self._float_inputs = xq.clone()
        n = xq.shape[0]
        # the float block's outputs on the float stream: this block's targets, and the next block's float inputs
        y = torch.empty_like(self._float_inputs)
        with torch.no_grad():
            for s in range(0, n, eng.batch_size):
                y[s:s + eng.batch_size] = self._forward(block.block, self._float_inputs[s:s + eng.batch_size].to(dev), kw).to("cpu", y.dtype)
        targets = block.targets()
        wrappers = {name: _SignRoundLinear(block.get(name), spec) for name in targets}
        for name, w in wrappers.items():
            block.replace(name, w)
        params = [p for w in wrappers.values() for p in (w.v, w.alpha, w.beta)]
        frozen = [(p, p.requires_grad) for p in block.block.parameters() if all(p is not q for q in params)]
        for p, _ in frozen:
            p.requires_grad_(False)
        lr = c.lr if c.lr is not None else (1.0 / c.iters if c.iters else 0.0)
        gen = torch.Generator().manual_seed(self._seed + block.index)
        best_loss, first_loss, best = float("inf"), None, None
        batches = _batches(n, c.minibatch, gen)
        try:
            for it in range(c.iters):
                idx = next(batches)
                out = self._forward(block.block, xq[idx].to(dev), kw)
                loss = F.mse_loss(out.float(), y[idx].to(dev).float())
                value = loss.item()
                first_loss = value if first_loss is None else first_loss
                if value < best_loss:
                    best_loss, best = value, [p.detach().clone() for p in params]
                grads = torch.autograd.grad(loss, params)
                step = lr * (1.0 - it / c.iters)
                with torch.no_grad():
                    for p, g in zip(params, grads):
                        p.add_(torch.sign(g), alpha=-step)
                for w in wrappers.values():
                    w.clamp_()
            if best is not None:
                with torch.no_grad():
                    for p, b in zip(params, best):
                        p.copy_(b)
        finally:
            for p, req in frozen:
                p.requires_grad_(req)
        for name, w in wrappers.items():
            block.replace(name, w.to_quant_linear())
        self._float_inputs = y
        if c.iters:
            self.report.setdefault("block_loss", {})[block.qualified("")[:-1]] = {
                "first": round(first_loss, 8), "best": round(best_loss, 8)}

    def finalize(self, model, ctx):
        self._float_inputs = None
        losses = self.report.get("block_loss", {})
        if losses:
            gain = sum(v["best"] / max(v["first"], 1e-30) for v in losses.values()) / len(losses)
            log.info("AutoRound: %d blocks, %d SignSGD steps each; best/first block loss %.3f on average", len(losses),
                     self.config.iters, gain)
        return model
