"""Structurally pruned checkpoints whose blocks differ in size (some blocks kept whole, or OPT's heads, whose count
its config ties to the hidden size): config.json keeps the dense family config and adds `structured_pruning`, the
per-layer head counts and MLP widths. Only this project's loader (compress.formats.load_checkpoint, `compress eval`,
`--model <folder>`) reads that entry; plain transformers refuses such a folder with a size-mismatch error rather than
loading wrong shapes. Uniformly pruned models need none of this: their config is a standard one.
"""
from __future__ import annotations

from typing import Any

import torch.nn as nn

from compress.formats.base import Format
from compress.model.shapes import CONFIG_KEY, apply_layer_shapes


class StructuredShapesFormat(Format):
    name = "structured"
    summary = "per-layer head counts and MLP widths of a structurally pruned model (config.json entry)"
    config_keys = (CONFIG_KEY,)

    def prepares(self, config: dict[str, Any]) -> bool:
        return CONFIG_KEY in config

    def prepare(self, model: nn.Module, config: dict[str, Any]) -> None:
        apply_layer_shapes(model, config)


FORMAT = StructuredShapesFormat()
