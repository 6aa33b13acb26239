"""Compiled elementwise kernels of the quantized layers, for long (prefill) calls.

Inside `compiled_kernels()`, a kernel function asked for through `compiled_form(fn)` runs as its torch.compile'd form:
inductor fuses the chain of elementwise passes (QuantLinear's byte unpack, zero point and scale; W8A8Linear's
per-token abs-max, divide, round, clamp and int8 cast, and its output rescale) into one loop each, with the same bits
as the eager form. Each function compiles once per process (and per shape where it is static); `StaticDecoder` uses
the context for the prefill of `--compile` runs.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable

import torch

_STATE = {"depth": 0}
_FORMS: dict[Callable, Callable] = {}


@contextlib.contextmanager
def compiled_kernels():
    _STATE["depth"] += 1
    # one compiled graph per (shape, bits, group, dtype) for the static kernels: models and benchmarks exceed dynamo's
    # default of 8 per function, after which it would run the graph eagerly, slower than the in-place eager path
    limit = max(torch._dynamo.config.recompile_limit, 256)
    try:
        with torch._dynamo.config.patch(recompile_limit=limit):
            yield
    finally:
        _STATE["depth"] -= 1


def compiling() -> bool:
    return _STATE["depth"] > 0


def compiled_form(fn: Callable, *, dynamic: bool = False) -> Callable:
    """torch.compile(fn), made once per function; `dynamic`: sizes symbolic (one graph for every row count)."""
    form = _FORMS.get(fn)
    if form is None:
        form = _FORMS[fn] = torch.compile(fn, dynamic=dynamic)
    return form


def warm_compiled_kernels(model: torch.nn.Module) -> tuple[int, float]:
    """Compile the kernels of every quantized layer in `model` now, not in a timed call (each layer's
    `warm_compiled()`: one call of its compiled kernels). Returns (layers, seconds)."""
    n, t0 = 0, time.perf_counter()
    with compiled_kernels(), torch.no_grad():
        for m in model.modules():
            if callable(getattr(m, "warm_compiled", None)):
                m.warm_compiled()
                n += 1
    return n, time.perf_counter() - t0
