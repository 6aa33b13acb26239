"""Extra checkpoint formats written beside the native one (`--export FORMAT`): each takes the compressed model in
memory and writes `<output>-<format>/`. The formats are the exporting entries of compress.formats.base.FORMATS."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.nn as nn

from compress.core.errors import ConfigError
from compress.formats.base import all_formats


def known_formats() -> list[str]:
    return sorted(f.name for f in all_formats() if f.exports)


def check_format(fmt: str) -> None:
    known = known_formats()
    if fmt not in known:
        raise ConfigError(f"--export {fmt!r} is not a known format; known: {', '.join(known)}")


def export(fmt: str, model: nn.Module, tokenizer: Any, output: str | Path, *, overwrite: bool = False) -> Path:
    check_format(fmt)
    target = Path(f"{output}-{fmt}")
    writer = next(f for f in all_formats() if f.name == fmt)
    if not writer.handles(model):
        raise ConfigError(f"--export {fmt!r} has no layout for this model's compressed layers")
    return writer.export(model, tokenizer, target, overwrite)
