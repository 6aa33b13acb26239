"""compress: an LLM compression workbench (quantization, pruning, distillation, evaluation)."""
from __future__ import annotations

import os as _os

__version__ = "0.1.0"

# Installed, `methods/` and `evals/` live inside this package (see pyproject's package-dir). Run straight from a
# source checkout (no install), they sit beside it: let `compress.methods` / `compress.evals` resolve there too.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "methods")) and _os.path.isfile(
    _os.path.join(_root, "methods", "__init__.py")
):
    __path__.append(_root)  # type: ignore[name-defined]  # noqa: F821
