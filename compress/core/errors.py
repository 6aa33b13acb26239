"""User-facing errors: one clear line that names the bad value and what is allowed."""
from __future__ import annotations


class CompressError(Exception):
    """An error caused by the user's input or environment; the CLI prints it as one line and exits 2."""


class ConfigError(CompressError):
    """A method or run option outside its allowed values."""


class DataError(CompressError):
    """A dataset or data directory that cannot be found or read."""


class ModelError(CompressError):
    """A model that cannot be found or loaded."""


class FileFormatError(CompressError):
    """A file that exists but cannot be parsed, or is incomplete (a truncated shard, JSON that is not JSON)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run, with what was kept (a KeyboardInterrupt, so that no `except Exception` swallows it)."""
