"""Module surgery: replace a submodule by its dotted name, and recognise linear-like modules."""
from __future__ import annotations

import torch.nn as nn


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` where the dotted `name` is in `model` (the one module-replacement helper)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear or one of the project's linear replacements (quantized, fake-quantized, int8...)."""
    return isinstance(module, nn.Linear) or getattr(module, "is_compress_linear", False)
