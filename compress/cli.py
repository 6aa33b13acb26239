"""The `compress` command line (click). Verbs only: the work happens in compress.run.runner and the methods.

Each compression verb gets the options shared by every run plus the options of the methods of its family, read from
the methods' typed configs; an option the chosen method does not have is an error that lists the ones it has.
"""
from __future__ import annotations

import logging
import os
import sys
import typing
from typing import Any, Callable

import click

from compress.core.config import _base_type, flag_name
from compress.core.errors import CompressError
from compress.run.console import _console, _fail, _setup_logging

log = logging.getLogger("compress")
_RUN_OPTION_NAMES: set[str] = set()


# ---------------------------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------------------------
def run_options(fn: Callable) -> Callable:
    """Options shared by every compression verb."""
    opts = [
        click.option("--model", "-m", default="smollm2", show_default=True, help="hub id, local folder, .gguf file, or 'smollm2' (the offline default)"),
        click.option("--dtype", default="auto", show_default=True, help="compute dtype: auto (bfloat16), float32, bfloat16, float16"),
        click.option("--device", default="auto", show_default=True, help="auto (CUDA when present), cpu, cuda[:N]"),
        click.option("--calib", default="wikitext2", show_default=True, help="calibration source: wikitext2, wikitext2-v1, ptb, c4, pydoc, generated, file:PATH"),
        click.option("--nsamples", default=128, show_default=True, type=int, help="calibration sequences"),
        click.option("--seqlen", default=512, show_default=True, type=int, help="tokens per calibration sequence"),
        click.option("--seed", default=0, show_default=True, type=int, help="seed for calibration sampling and training"),
        click.option("--data-dir", default=None, help="local data kit folder (else $COMPRESS_DATA_DIR, else ~/.cache/compress/data, else the hub)"),
        click.option("--eval", "eval_sets", default="wikitext2", show_default=True, help="perplexity datasets, comma-separated (wikitext2, wikitext2-v1, ptb, c4, pydoc, file:PATH); 'none' to skip"),
        click.option("--eval-seqlen", default=2048, show_default=True, type=int, help="perplexity window length"),
        click.option("--eval-windows", default="32", show_default=True, help="perplexity windows to use (a cap for quick runs); 'all' for the whole split"),
        click.option("--tasks", default=None, help="lm-eval zero-shot tasks, comma-separated (e.g. piqa,arc_easy)"),
        click.option("--limit", "task_limit", default=None, type=int, help="items per lm-eval task (a cap for quick runs)"),
        click.option("--no-baseline", is_flag=True, help="skip measuring the uncompressed model"),
        click.option("--output", "-o", default=None, help="checkpoint folder (default: checkpoints/<model>-<method>-<setting>)"),
        click.option("--no-save", is_flag=True, help="do not write a checkpoint"),
        click.option("--overwrite", is_flag=True, help="replace an existing checkpoint folder"),
        click.option("--export", "exports", multiple=True, help="also write this checkpoint format (dense, gptq, compressed-tensors, ...); repeatable"),
        click.option("--results-dir", default=None, help="results store folder (default: $COMPRESS_RESULTS_DIR or ./results)"),
        click.option("--batch-size", default=8, show_default=True, type=int, help="calibration sequences per forward pass in the engine"),
        click.option("--spill", default="auto", show_default=True, type=click.Choice(["auto", "always", "never"]), help="keep the activation cache in a memory-mapped file on disk"),
        click.option("--ignore", multiple=True, help="regex of linear layer names to leave uncompressed; repeatable"),
        click.option("--no-progress", is_flag=True, help="no progress bars"),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


_RUN_KEYS = ("model", "dtype", "device", "calib", "nsamples", "seqlen", "seed", "data_dir", "eval_sets", "eval_seqlen",
             "eval_windows", "tasks", "task_limit", "no_baseline", "output", "no_save", "overwrite", "exports",
             "results_dir", "batch_size", "spill", "ignore", "no_progress")


def _click_type(tp: Any):
    base, _ = _base_type(tp)
    return {int: int, float: float, str: str}.get(base, str)


def method_options(family: str | tuple[str, ...]) -> Callable[[Callable], Callable]:
    """Add the union of the options of every method of `family` (each defaulting to 'not given')."""
    from compress.pipeline.method import all_methods

    families = (family,) if isinstance(family, str) else family

    def deco(fn: Callable) -> Callable:
        seen: dict[str, list[str]] = {}
        specs: dict[str, tuple[Any, Any]] = {}
        for name, cls in all_methods().items():
            if cls.family not in families:
                continue
            for f, tp in cls.Config.field_specs():
                if not f.metadata.get("cli", True) or f.name in _RUN_KEYS or f.name == "method":
                    continue
                seen.setdefault(f.name, []).append(name)
                specs.setdefault(f.name, (f, tp))
        for fname in sorted(specs, reverse=True):
            f, tp = specs[fname]
            base, _ = _base_type(tp)
            users = seen[fname]
            default = f.default if f.default is not dataclasses_missing() else None
            help_text = f"[{', '.join(users)}] {f.metadata.get('help', '')}"
            if len(users) == 1 and default is not None:
                help_text += f" (default: {default})"
            if base is bool:
                opt = click.option(f"{flag_name(fname)}/--no-{fname.replace('_', '-')}", fname, default=None, help=help_text)
            else:
                opt = click.option(flag_name(fname), fname, default=None, type=_click_type(tp), help=help_text)
            fn = opt(fn)
        return fn

    return deco


def dataclasses_missing():
    import dataclasses

    return dataclasses.MISSING


def _split(value: str | None) -> list[str]:
    if not value or value.strip().lower() == "none":
        return []
    return [v.strip() for v in value.split(",") if v.strip()]


def _windows(value: str | None) -> int | None:
    if value is None or str(value).lower() == "all":
        return None
    try:
        return int(value)
    except ValueError:
        raise CompressError(f"--eval-windows {value!r} is not a number or 'all'") from None


def spec_from_cli(kind: str, stages: list[dict[str, Any]], kw: dict[str, Any], **extra):
    from compress.run.runner import RunSpec

    return RunSpec(
        kind=kind, stages=stages, model=kw["model"], dtype=kw["dtype"], device=kw["device"], calib=kw["calib"],
        nsamples=kw["nsamples"], seqlen=kw["seqlen"], seed=kw["seed"], data_dir=kw["data_dir"],
        eval=_split(kw["eval_sets"]), eval_seqlen=kw["eval_seqlen"], eval_windows=_windows(kw["eval_windows"]),
        tasks=_split(kw["tasks"]), task_limit=kw["task_limit"], baseline=not kw["no_baseline"], output=kw["output"],
        save=not kw["no_save"], overwrite=kw["overwrite"], exports=list(kw["exports"]), results_dir=kw["results_dir"],
        batch_size=kw["batch_size"], spill=kw["spill"], ignore=list(kw["ignore"]), progress=not kw["no_progress"], **extra,
    )


def _run_method_verb(kind: str, family: str | tuple[str, ...], method: str, kw: dict[str, Any], **extra) -> None:
    from compress.pipeline.method import get_method
    from compress.run.runner import execute

    try:
        cls = get_method(method)
        fams = (family,) if isinstance(family, str) else family
        if cls.family not in fams:
            from compress.pipeline.method import all_methods

            same = [n for n, c in all_methods().items() if c.family in fams]
            raise CompressError(f"method {method!r} is a {cls.family} method; `compress {kind}` takes: {', '.join(same)}")
        run_kw = {k: kw.pop(k) for k in _RUN_KEYS}
        options = {k: v for k, v in kw.items() if v is not None}
        spec = spec_from_cli(kind, [{"method": cls.name, **options}], run_kw, **extra)
        execute(spec, console=_console())
    except CompressError as e:
        _fail(e)


# ---------------------------------------------------------------------------------------------------------------
# Verbs
# ---------------------------------------------------------------------------------------------------------------
@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})
@click.option("-v", "--verbose", count=True, help="more log output")
@click.option("-q", "--quiet", is_flag=True, help="warnings and results only")
@click.version_option(package_name="compress")
def main(verbose: int, quiet: bool) -> None:
    """compress: make a language model smaller and know exactly what it cost."""
    _setup_logging(verbose, quiet)


@main.command("methods")
@click.option("--family", default=None, help="only this family")
def methods_cmd(family: str | None) -> None:
    """List the registered methods with family, summary and what they need."""
    from rich.table import Table

    from compress.pipeline.method import FAMILIES, all_methods

    if family and family not in FAMILIES:
        _fail(CompressError(f"--family {family!r} is not one of: {', '.join(FAMILIES)}"))
    t = Table(title="compression methods")
    for col in ("method", "family", "summary", "needs", "paper"):
        t.add_column(col)
    for name, cls in all_methods().items():
        if family and cls.family != family:
            continue
        t.add_row(name, cls.family, cls.summary, cls.needs.describe(), cls.paper)
    _console().print(t)


@main.command("quantize")
@click.option("--method", required=True, help="a quantization method (see `compress methods`)")
@run_options
@method_options("quantization")
def quantize_cmd(method: str, **kw) -> None:
    """Post-training quantization, e.g. `compress quantize --method gptq --bits 4 --group-size 128`."""
    _run_method_verb("quantize", "quantization", method, kw)


@main.command("prune")
@click.option("--method", required=True, help="a pruning method (see `compress methods`)")
@run_options
@method_options("pruning")
def prune_cmd(method: str, **kw) -> None:
    """Pruning, e.g. `compress prune --method wanda --sparsity 0.5`."""
    _run_method_verb("prune", "pruning", method, kw)


@main.command("finetune")
@click.option("--method", required=True, help="a training-aware method (see `compress methods`)")
@run_options
@method_options("training-aware")
def finetune_cmd(method: str, **kw) -> None:
    """Training-aware compression, e.g. `compress finetune --method qlora --steps 200`."""
    _run_method_verb("finetune", "training-aware", method, kw)


@main.command("distill")
@click.option("--method", default="distill", show_default=True, help="a distillation method (see `compress methods`)")
@click.option("--teacher", default=None, help="teacher model (default: the --model itself)")
@run_options
@method_options("distillation")
def distill_cmd(method: str, teacher: str | None, **kw) -> None:
    """Knowledge distillation into a smaller student, e.g. `compress distill --student-layers 15`."""
    _run_method_verb("distill", "distillation", method, kw, teacher=teacher or kw["model"])


@main.command("recipe")
@click.argument("recipe_file", type=click.Path())
@run_options
def recipe_cmd(recipe_file: str, **kw) -> None:
    """Run a recipe file: methods composed in order (e.g. SmoothQuant then GPTQ). Settings in the file (model,
    calib, nsamples, ...) apply unless given on the command line."""
    import yaml

    from compress.pipeline.recipe import Recipe
    from compress.run.runner import execute

    try:
        Recipe.from_yaml(recipe_file)  # validates stages
        doc = yaml.safe_load(open(recipe_file)) or {}
        ctx = click.get_current_context()
        for key, value in doc.items():
            if key == "stages":
                continue
            pkey = {"eval": "eval_sets"}.get(key, key)
            if pkey not in kw:
                raise CompressError(f"recipe file setting {key!r} is not a run option; known: {', '.join(sorted(_RUN_KEYS))}")
            if ctx.get_parameter_source(pkey) == click.core.ParameterSource.DEFAULT:
                if isinstance(value, list) and pkey in ("eval_sets", "tasks"):
                    value = ",".join(value)
                elif isinstance(value, str) and pkey in ("ignore", "exports"):
                    value = [value]  # a single pattern or format, not a list of its characters
                kw[pkey] = value
        spec = spec_from_cli("recipe", doc["stages"], kw)
        execute(spec, console=_console())
    except CompressError as e:
        _fail(e)


@main.command("eval")
@click.option("--model", "-m", default="smollm2", show_default=True, help="hub id, folder, checkpoint folder, .gguf, or 'smollm2'")
@click.option("--dtype", default="auto", show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--data-dir", default=None)
@click.option("--eval", "eval_sets", default="wikitext2", show_default=True, help="perplexity datasets, comma-separated; 'none' to skip")
@click.option("--eval-seqlen", default=2048, show_default=True, type=int)
@click.option("--eval-windows", default="32", show_default=True, help="windows to use, or 'all'")
@click.option("--tasks", default=None, help="lm-eval zero-shot tasks, comma-separated")
@click.option("--limit", "task_limit", default=None, type=int, help="items per lm-eval task")
@click.option("--efficiency", is_flag=True, help="also measure prefill/decode tokens per second, peak memory, kernel kind")
@click.option("--results-dir", default=None)
@click.option("--no-progress", is_flag=True)
def eval_cmd(**kw) -> None:
    """Evaluate a model or a checkpoint folder: perplexity, zero-shot tasks, size."""
    from compress.run.runner import RunSpec, execute

    try:
        spec = RunSpec(kind="eval", model=kw["model"], dtype=kw["dtype"], device=kw["device"], data_dir=kw["data_dir"],
                       eval=_split(kw["eval_sets"]), eval_seqlen=kw["eval_seqlen"], eval_windows=_windows(kw["eval_windows"]),
                       tasks=_split(kw["tasks"]), task_limit=kw["task_limit"], results_dir=kw["results_dir"],
                       save=False, progress=not kw["no_progress"], efficiency=kw["efficiency"])
        execute(spec, console=_console())
    except CompressError as e:
        _fail(e)


def _register_extra_commands() -> None:
    """Verbs contributed by other modules (report, grid), if present."""
    import importlib

    for mod in ("compress.run.report", "compress.run.grid"):
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
            continue
        if hasattr(m, "register_cli"):
            m.register_cli(main)


_register_extra_commands()

if __name__ == "__main__":  # pragma: no cover
    main()
