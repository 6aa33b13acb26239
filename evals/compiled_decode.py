"""Greedy decoding with a static KV cache and a compiled one-token step (the gpt-fast recipe), batch 1.

The eager decode loop (compress.evals.efficiency.greedy_decode) pays, for every new token, the Python of the model's
forward, one dispatch per op and the growth of a dynamic KV cache. Here the cache is a transformers `StaticCache`
(preallocated to `max_len` positions, updated in place, its position counter a tensor), so the one-token step has
fixed shapes and `torch.compile(step, dynamic=False)` turns it into one graph, compiled once. The prompt's forward
pass (prefill) stays eager: its length varies, and it runs once per generation; only the elementwise kernels of its
quantized layers run compiled (compress.kernels.compiled: QuantLinear's de-quantization in calls of more rows than
the integer kernels pay for, W8A8Linear's activation quantization and rescale), compiled when the decoder is built
(`dequant_compile_seconds`).

On the CPU the step is compiled with inductor's `freezing` (parameters folded in as constants, float linears
pre-packed for oneDNN; the model must not be changed afterwards). Compilation happens on the first call of the step (`compile_seconds` times that call, which also computes one
token); inductor keeps what it generated on disk (its FX graph cache, by default under
/tmp/torchinductor_<user>), so a second process compiles the same step faster (Dynamo's tracing is redone).
The integer weight-only matmuls stay `aten._weight_int4pack_mm_for_cpu` / `aten._weight_int8pack_mm` calls in the
compiled graph (tests/test_compiled_decode.py reads the generated code).

The one-token steps attend through compress.model.attention.decode_attention (grouped matmuls instead of the CPU
flash-attention kernel, which took a third of a 4-bit decode step), the eager static-cache loop as well.

One decoder serves repeated generations: `generate` resets the cache (zeroes, position 0) and reuses the compiled
step, whose guards hold as long as the cache tensors are the same.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn as nn

from compress.core.errors import ConfigError
from compress.model.attention import decode_attention_for


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compiler_missing() -> str | None:
    """Why torch.compile's CPU backend (inductor, which needs a C++ compiler) cannot run here; None when it can."""
    import shutil

    try:
        import torch._inductor  # noqa: F401
    except Exception as e:  # pragma: no cover - torch without inductor
        return f"torch._inductor does not import: {type(e).__name__}: {e}"
    from torch._inductor import config as ind_config

    cxx = ind_config.cpp.cxx
    names = [c for c in (cxx if isinstance(cxx, tuple) else (cxx,)) if c] or ["g++"]
    if not any(shutil.which(c) for c in names):
        return f"no C++ compiler for inductor (looked for {', '.join(names)})"
    return None


class StaticDecoder:
    """Greedy decoding of `model` (a transformers causal LM, batch 1) for prompts + new tokens of at most `max_len`
    positions, with a static KV cache; the one-token step compiled by torch.compile when `compile` is True (else
    the same static-cache loop runs eagerly: the reference the compiled step must match)."""

    def __init__(self, model: nn.Module, max_len: int, *, compile: bool = True, freeze: bool | None = None):
        from transformers import StaticCache

        if max_len < 2:
            raise ConfigError(f"static decode: max_len {max_len} must be >= 2 (a prompt token and a new one)")
        max_pos = getattr(model.config, "max_position_embeddings", None)
        if max_pos and max_len > max_pos:
            raise ConfigError(f"static decode: max_len {max_len} exceeds the model's {max_pos} positions")
        if compile:
            why = compiler_missing()
            if why:
                raise ConfigError(f"--compile: {why}")
        self.model, self.max_len, self.compiled = model, max_len, compile
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.compile_seconds: float | None = None  # the first compiled step's time (compile + one token)
        device = next(model.parameters()).device
        # inductor's freezing (weights as constants) lets it pre-pack the float linears for oneDNN on the CPU: the
        # bf16 decode step of SmolLM2 went from 81 to 50 ms with it after a 64-token prompt; after 512 tokens no gain
        # was seen (docs/benchmarks.md, "Compiled decode")
        self.freeze = device.type == "cpu" if freeze is None else freeze
        self._step = (torch.compile(self._eager_step, dynamic=False, options={"freezing": self.freeze})
                      if compile else self._eager_step)
        self._stepped = False
        self.timed_steps = 0  # decode steps inside the last generation's decode time
        self.dequant_compile_seconds: float | None = None
        if compile:
            from compress.kernels.compiled import warm_compiled_kernels

            n, secs = warm_compiled_kernels(model)
            self.dequant_compile_seconds = round(secs, 2) if n else None

    def _prefill_context(self):
        import contextlib

        from compress.kernels.compiled import compiled_kernels

        return compiled_kernels() if self.compiled else contextlib.nullcontext()

    def _eager_step(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, position_ids=pos, cache=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1:].argmax(-1)

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, new_tokens: int, *, eos_token_id: int | None = None,
                 on_token: Callable[[int], None] | None = None) -> tuple[list[int], float, float]:
        """(new token ids, prefill seconds, decode seconds), as greedy_decode. The decode time leaves out the compile
        of a first call (`compile_seconds`): the step that compiled is timed apart, and its token still counts."""
        if prompt.ndim != 2 or prompt.shape[0] != 1:
            raise ConfigError(f"static decode: batch 1 only (prompt of shape {tuple(prompt.shape)})")
        n_prompt = prompt.shape[1]
        if n_prompt + new_tokens - 1 > self.max_len:  # the last new token is not fed back
            raise ConfigError(f"static decode: prompt ({n_prompt} tokens) + {new_tokens - 1} fed-back tokens exceed "
                              f"the cache's {self.max_len} positions")
        with decode_attention_for(self.model):
            return self._generate(prompt, new_tokens, eos_token_id, on_token)

    def _generate(self, prompt, new_tokens, eos_token_id, on_token):
        n_prompt = prompt.shape[1]
        device = prompt.device
        self.cache.reset()
        _sync(device)
        t0 = time.perf_counter()
        pos = torch.arange(n_prompt, device=device).unsqueeze(0)
        with self._prefill_context():
            out = self.model(input_ids=prompt, position_ids=pos, cache=self.cache, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1:].argmax(-1)
        _sync(device)
        t1 = time.perf_counter()
        tokens = [int(nxt)]
        if on_token:
            on_token(tokens[-1])
        excluded = 0.0
        while len(tokens) < new_tokens and (eos_token_id is None or tokens[-1] != eos_token_id):
            pos = torch.full((1, 1), n_prompt + len(tokens) - 1, dtype=torch.long, device=device)
            first = not self._stepped
            ts = time.perf_counter()
            nxt = self._step(nxt, pos).clone()  # clone: the compiled graph may reuse its output buffer
            tokens.append(int(nxt))
            if first:
                self._stepped = True
                excluded = time.perf_counter() - ts
                if self.compiled:
                    self.compile_seconds = excluded
                else:
                    excluded = 0.0
            if on_token:
                on_token(tokens[-1])
        _sync(device)
        t2 = time.perf_counter()
        self.timed_steps = len(tokens) - 1 - (1 if excluded else 0)
        return tokens, t1 - t0, t2 - t1 - excluded
