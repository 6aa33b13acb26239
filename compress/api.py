"""The Python API: the steps of a run as functions, for scripts and notebooks (the CLI does the same through
`compress.runs`).

    import compress
    m = compress.load("smollm2")                                   # model, tokenizer, source, fingerprint
    calib = compress.calibration(m.tokenizer, "c4", nsamples=128, seqlen=512)
    model = compress.apply(m.model, "gptq", calibration=calib, tokenizer=m.tokenizer, bits=4, group_size=128)
    ppl = compress.evaluate(model, m.tokenizer, "wikitext2", seqlen=2048, windows=32)   # value + protocol
    compress.save(model, m.tokenizer, "checkpoints/smollm2-gptq-w4", exports=["gptq"])
    record = compress.run({"kind": "quantize", "stages": [{"method": "rtn", "bits": 4}]})  # a whole run

Every function checks its inputs first and raises compress.CompressError with one line naming a bad value.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from compress.core.errors import ConfigError
from compress.evals.perplexity import perplexity
from compress.evals.size import size_report
from compress.formats.exporters import check_format, export
from compress.formats.native import load_checkpoint, save_checkpoint
from compress.pipeline.method import Method, all_methods
from compress.pipeline.recipe import Recipe, RunContext
from compress.runs.runner import execute
from compress.runs.spec import RunSpec
from compress.sources.data import Calibration, get_calibration
from compress.sources.models import LoadedModel, load_model, resolve_device

__all__ = ["apply", "calibration", "evaluate", "export", "list_methods", "load", "load_checkpoint", "run", "save", "size"]


def load(model: str = "smollm2", *, dtype: str | torch.dtype = "auto") -> LoadedModel:
    """A model and its tokenizer: a hub id, a local folder, a .gguf file, a checkpoint folder of this project, or
    'smollm2' (the offline default). `.model`, `.tokenizer`, `.fingerprint`."""
    return load_model(model, dtype=dtype, device="cpu")


def calibration(tokenizer: Any, source: str = "c4", *, nsamples: int = 128, seqlen: int = 512, seed: int = 0,
                data_dir: str | None = None, model: nn.Module | None = None) -> Calibration:
    """`nsamples` calibration sequences of `seqlen` tokens from `source` (wikitext2, ptb, c4, pydoc, file:PATH, or
    generated with `model`), deterministic for `seed`. `.input_ids` [N, L] and `.record()` (its protocol)."""
    return get_calibration(source, tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed, data_dir=data_dir,
                           model=model, fallback=data_dir is None)


def list_methods() -> dict[str, type[Method]]:
    """Every registered method by name."""
    return all_methods()


def apply(model: nn.Module, method: str | list[dict[str, Any]] | Recipe, *, calibration: Calibration | None = None,
          tokenizer: Any = None, device: str = "auto", seed: int = 0, ignore: list[str] | tuple[str, ...] = (),
          teacher: nn.Module | None = None, data_dir: str | None = None, batch_size: int = 8, progress: bool = True,
          report: dict[str, Any] | None = None, **options: Any) -> nn.Module:
    """Compress `model` with one method (`apply(model, "gptq", bits=4, ...)`, options as the CLI's without dashes),
    a list of stages (`[{"method": "smoothquant"}, {"method": "gptq", "bits": 4}]`) or a Recipe. Methods that need
    data take `calibration` (see `calibration()`); training-aware ones also need the `tokenizer`. Returns the
    compressed model (the same object for layer-wise methods); `report`, if given, receives each stage's details."""
    if isinstance(method, Recipe):
        if options:
            raise TypeError(f"options {sorted(options)} go into the recipe's stages, not apply()")
        recipe = method
    elif isinstance(method, str):
        recipe = Recipe.from_specs([{"method": method, **options}])
    else:
        if options:
            raise TypeError(f"options {sorted(options)} go into the stages, not apply()")
        recipe = Recipe.from_specs(list(method))
    if recipe.needs_calibration and calibration is None:
        raise ConfigError(f"{recipe.method_name} needs calibration data: pass calibration=compress.calibration(...)")
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    ctx = RunContext(tokenizer=tokenizer, device=resolve_device(device), calibration=calibration, data_dir=data_dir,
                     seed=seed, batch_size=batch_size, ignore=list(ignore), progress=progress, model_dtype=dtype,
                     teacher=teacher)
    torch.manual_seed(seed)
    out = recipe.run(model, ctx)
    if report is not None:
        report.update(recipe.report())
    return out


def evaluate(model: nn.Module, tokenizer: Any, dataset: str = "wikitext2", *, seqlen: int = 2048,
             windows: int | None = 32, data_dir: str | None = None, batch_size: int = 1,
             progress: bool = True) -> dict[str, Any]:
    """Perplexity on `dataset`'s test split (the GPTQ/Wanda protocol: joined text, non-overlapping windows of
    `seqlen` tokens, the first `windows` of them, None for all): {"value", "protocol", "seconds", ...}."""
    return perplexity(model, tokenizer, dataset, seqlen=seqlen, max_windows=windows, batch_size=batch_size,
                      data_dir=data_dir, fallback=data_dir is None, progress=progress)


def size(model: nn.Module, checkpoint: str | Path | None = None) -> dict[str, Any]:
    """Parameters, bits per weight (codes, scales, zero points, indices), bytes in memory (and on disk)."""
    return size_report(model, checkpoint)


def save(model: nn.Module, tokenizer: Any, output: str | Path, *, exports: list[str] | tuple[str, ...] = (),
         overwrite: bool = False, options: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write the native checkpoint folder (atomically) and each export (`<output>-<format>`). Returns their paths.
    `options`: export options by run-option name, e.g. {"gguf_requant": "q4_0", "gguf_embed": "f16"}."""
    for fmt in exports:
        check_format(fmt)
    paths = {"native": save_checkpoint(model, tokenizer, output, overwrite=overwrite)}
    for fmt in exports:
        paths[fmt] = export(fmt, model, tokenizer, output, overwrite=overwrite, options=options)
    return paths


def run(spec: RunSpec | dict[str, Any], *, store: bool = True) -> dict[str, Any]:
    """A whole run as the CLI does it (validate, load, measure, compress, measure, save, record): a RunSpec or a
    mapping of its fields (`{"kind": "quantize", "stages": [{"method": "rtn", "bits": 4}], "eval_windows": 8}`).
    Returns the results record (appended to the results store unless store=False)."""
    if isinstance(spec, dict):
        spec = RunSpec.build(spec)
    return execute(spec, store=store)
