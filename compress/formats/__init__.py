"""Checkpoint formats, kept apart from the algorithms that produce the weights.

An algorithm leaves compressed modules in the model (QuantLinear and friends, compress.layers); a format writes and
reads them. The native format (compress.formats.native) reloads every layer type to the identical model; the others
(dense, GPTQ, compressed-tensors, bitsandbytes, sparse bitmask, structured shapes, peft adapters) are one `Format`
object each, listed lazily in compress.formats.base.FORMATS. This package's front re-exports what callers use.
"""
from compress.formats.base import FORMATS, AtomicFolder, Format, check_output_dir
from compress.formats.native import is_project_checkpoint, load_checkpoint, save_checkpoint
from compress.layers.types import compressed_modules

__all__ = ["FORMATS", "AtomicFolder", "Format", "check_output_dir", "compressed_modules", "is_project_checkpoint",
           "load_checkpoint", "save_checkpoint"]
