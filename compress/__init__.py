"""compress: an LLM compression workbench (quantization, pruning, distillation, evaluation).

The Python API (compress.api) is imported on first use, so that `import compress` (and `compress --help`) stays
light:

    import compress
    m = compress.load("smollm2")
    calib = compress.calibration(m.tokenizer, "wikitext2", nsamples=128, seqlen=512)
    model = compress.apply(m.model, "gptq", calibration=calib, tokenizer=m.tokenizer, bits=4, group_size=128)
    print(compress.evaluate(model, m.tokenizer, "wikitext2", windows=8)["value"])
    compress.save(model, m.tokenizer, "checkpoints/smollm2-gptq-w4", exports=["gptq"])
"""
from __future__ import annotations

import os as _os

from compress.core.errors import CompressError, ConfigError, DataError, ModelError

__version__ = "0.1.0"
_API = ("apply", "calibration", "evaluate", "export", "list_methods", "load", "load_checkpoint", "run", "save", "size")
__all__ = [*_API, "CompressError", "ConfigError", "DataError", "ModelError", "RunSpec"]


def __getattr__(name: str):
    if name in _API:
        from compress import api

        return getattr(api, name)
    if name == "RunSpec":
        from compress.runs.spec import RunSpec

        return RunSpec
    raise AttributeError(f"module 'compress' has no attribute {name!r}")

# Installed, `methods/` and `evals/` live inside this package (see pyproject's package-dir). Run straight from a
# source checkout (no install), they sit beside it: let `compress.methods` / `compress.evals` resolve there too.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "methods")) and _os.path.isfile(
    _os.path.join(_root, "methods", "__init__.py")
):
    __path__.append(_root)  # type: ignore[name-defined]  # noqa: F821
