"""Structurally pruned checkpoints whose blocks differ in size (some blocks kept whole, or OPT's heads, whose count
its config ties to the hidden size): config.json keeps the dense family config and adds `structured_pruning`, the
per-layer head counts and MLP widths. Only this project's loader (compress.formats.load_checkpoint, `compress eval`,
`--model <folder>`) reads that entry; plain transformers refuses such a folder with a size-mismatch error rather than
loading wrong shapes. Uniformly pruned models need none of this: their config is a standard one.
"""
from __future__ import annotations

from ..structured import CONFIG_KEY, apply_layer_shapes
from . import LOAD_TRANSFORMS

LOAD_TRANSFORMS[CONFIG_KEY] = apply_layer_shapes
