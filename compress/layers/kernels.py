"""Which kernel each compressed layer runs, chosen when a model is loaded or a method finishes, never silently.

`select_kernels(model)` asks every layer that can choose (`select_kernel()`: QuantLinear and its kin) to prepare
its integer kernel for the device it is on, or to fall back to de-quantization with the reason; it logs one line per
kind of kernel with its layer count and returns the per-layer table (evals.efficiency stores it with the speeds).
"""
from __future__ import annotations

import logging
import os
from collections import Counter

import torch.nn as nn

log = logging.getLogger("compress")

KERNELS_ENV = "COMPRESS_KERNELS"  # "0" / "off": every layer de-quantizes (to compare the kernels with the fallback)


def kernels_enabled() -> bool:
    return os.environ.get(KERNELS_ENV, "1").strip().lower() not in ("0", "off", "false", "no")


def select_kernels(model: nn.Module, *, enable: bool | None = None, quiet: bool = False) -> dict[str, str]:
    """Choose the kernel of every layer that has a choice; returns {layer name: kernel description}."""
    enable = kernels_enabled() if enable is None else enable
    chosen = {name: mod.select_kernel(enable) for name, mod in model.named_modules()
              if callable(getattr(mod, "select_kernel", None))}
    if chosen and not quiet:
        for kernel, n in Counter(chosen.values()).most_common():
            log.info("kernels: %d layer%s %s", n, "" if n == 1 else "s", kernel)
    return chosen


def kernel_table(model: nn.Module) -> dict[str, str]:
    """{layer name: kernel description} of the layers that say how they compute."""
    return {name: mod.kernel for name, mod in model.named_modules() if isinstance(getattr(mod, "kernel", None), str)}
