"""The `compress` command line (click). Verbs only: the work happens in compress.runs and the methods.

Each verb is built when it is called, so that `compress --help` imports neither torch nor any method. The options
shared by every run are generated from the RunSpec fields (compress.runs.spec); each compression verb adds the
options of the methods of its family, read from the methods' typed configs; an option the chosen method does not
have is an error that lists the ones it has.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import click

from compress.core.config import _base_type, flag_name
from compress.core.errors import CompressError, Interrupted
from compress.runs.console import _console, _fail, _setup_logging
from compress.runs.spec import FIT, RUN, RunSpec, coerce, run_fields

log = logging.getLogger("compress")

# verb -> (builder, one line of help): the help is written here so that listing the verbs builds none of them
VERBS: dict[str, tuple[str, str]] = {
    "methods": ("_methods_cmd", "List the registered methods: family, summary, what they need."),
    "quantize": ("_quantize_cmd", "Post-training quantization (--method rtn, gptq, owq, ...)."),
    "prune": ("_prune_cmd", "Pruning (--method magnitude, wanda, sparsegpt, owl, llm-pruner)."),
    "finetune": ("_finetune_cmd", "Training-aware compression (--method qat, peqa, llm-qat, qlora, lora)."),
    "distill": ("_distill_cmd", "Knowledge distillation into a smaller student."),
    "fit": ("_fit_cmd", "The most accurate mixed-precision model under a size budget, chosen per layer across methods."),
    "recipe": ("_recipe_cmd", "Run a recipe file: methods composed in order."),
    "eval": ("_eval_cmd", "Evaluate a model or checkpoint: perplexity, zero-shot tasks, size."),
    "generate": ("_generate_cmd", "Try a model or checkpoint: stream a completion, print its speed and memory."),
    "report": ("_report_cmd", "Accuracy vs size from the results store: table, Pareto front, plot."),
    "grid": ("_grid_cmd", "Experiment grids, resumable: models x methods x calibration x evaluations."),
}


class LazyGroup(click.Group):
    """A group whose verbs are built on first use; their one-line help comes from VERBS."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(VERBS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in VERBS:
            return None
        cmd = globals()[VERBS[name][0]]()
        cmd.name = name
        return cmd

    def invoke(self, ctx: click.Context) -> Any:
        """Every failure of a verb is one line on stderr (the traceback after it with --verbose): bad input exits 2,
        Ctrl-C 130 (saying what was kept), anything unforeseen 1."""
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except click.ClickException as e:  # a bad flag or value, found by click while parsing the verb's options
            sub = ctx.invoked_subcommand or ""
            _fail(f"{e.format_message()} (see `compress {sub} --help`)".replace("compress  ", "compress "), e.exit_code)
        except Interrupted as e:
            _fail(e, 130)
        except KeyboardInterrupt:
            _fail("interrupted (Ctrl-C)", 130)
        except CompressError as e:
            _fail(e)
        except Exception as e:  # noqa: BLE001 - a bug or an unforeseen failure: still one line, the traceback on -v
            _fail(f"internal error: {type(e).__name__}: {e} (`compress --verbose ...` shows the traceback)", 1)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, help_) for name, (_, help_) in VERBS.items()])


# ---------------------------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------------------------
def _click_option(f: dataclasses.Field) -> Callable:
    """A click option for one RunSpec field (its metadata says how; compress.runs.spec)."""
    meta = f.metadata
    flag = meta.get("flag") or flag_name(f.name)
    names = [flag] + ([meta["short"]] if meta.get("short") else [])
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if f.type in (bool, "bool"):
        return click.option(f"{flag}/--no-{flag[2:]}", f.name, default=default, show_default=True, help=meta["help"])
    if meta.get("multiple"):
        return click.option(*names, f.name, multiple=True, help=meta["help"])
    if meta.get("sep"):
        return click.option(*names, f.name, default=meta["sep"].join(default) or None, show_default=bool(default),
                            help=meta["help"])
    kind = meta.get("cli_type") or {"int": int, "int | None": int, "float": float}.get(str(f.type), str)
    if meta.get("choices"):
        kind = click.Choice(list(meta["choices"]))
    return click.option(*names, f.name, default=default, show_default=default is not None, type=kind,
                        help=meta["help"])


def run_options(verb: str = RUN) -> Callable[[Callable], Callable]:
    """The RunSpec options a verb offers ("run": the compression verbs, "eval": compress eval)."""
    def deco(fn: Callable) -> Callable:
        for f in reversed(run_fields(verb)):
            fn = _click_option(f)(fn)
        return fn

    return deco


def method_options(family: str) -> Callable[[Callable], Callable]:
    """Add the union of the options of every method of `family` (each defaulting to 'not given')."""
    from compress.pipeline.method import all_methods

    run_keys = {f.name for f in run_fields()}

    def deco(fn: Callable) -> Callable:
        seen: dict[str, list[str]] = {}
        specs: dict[str, tuple[Any, Any]] = {}
        for name, cls in all_methods().items():
            if cls.family != family:
                continue
            for f, tp in cls.Config.field_specs():
                if not f.metadata.get("cli", True) or f.name in run_keys or f.name == "method":
                    continue
                seen.setdefault(f.name, []).append(name)
                specs.setdefault(f.name, (f, tp))
        for fname in sorted(specs, reverse=True):
            f, tp = specs[fname]
            base, _ = _base_type(tp)
            users = seen[fname]
            default = f.default if f.default is not dataclasses.MISSING else None
            help_text = f"[{', '.join(users)}] {f.metadata.get('help', '')}"
            if len(users) == 1 and default is not None:
                help_text += f" (default: {default})"
            if base is bool:
                opt = click.option(f"{flag_name(fname)}/--no-{fname.replace('_', '-')}", fname, default=None, help=help_text)
            else:
                kind = {int: int, float: float, str: str}.get(base, str)
                opt = click.option(flag_name(fname), fname, default=None, type=kind, help=help_text)
            fn = opt(fn)
        return fn

    return deco


def _spec(kind: str, stages: list[dict[str, Any]], kw: dict[str, Any], **extra) -> RunSpec:
    """The run's spec from the verb's keyword arguments (RunSpec fields; anything else is a method option)."""
    return RunSpec.build({f.name: kw.pop(f.name) for f in run_fields() if f.name in kw}, kind=kind, stages=stages,
                         **extra)


def _run_method_verb(kind: str, family: str, method: str, kw: dict[str, Any], **extra) -> None:
    from compress.pipeline.method import all_methods, get_method
    from compress.runs.runner import execute

    try:
        cls = get_method(method)
        if cls.family != family:
            same = [n for n, c in all_methods().items() if c.family == family]
            raise CompressError(f"method {method!r} is a {cls.family} method; `compress {kind}` takes: {', '.join(same)}")
        spec = _spec(kind, [], kw, **extra)
        spec.stages = [{"method": cls.name, **{k: v for k, v in kw.items() if v is not None}}]
        execute(spec, console=_console())
    except CompressError as e:
        _fail(e)


# ---------------------------------------------------------------------------------------------------------------
# Verbs
# ---------------------------------------------------------------------------------------------------------------
@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})
@click.option("-v", "--verbose", count=True, help="more log output, and a failure's traceback after its one line")
@click.option("-q", "--quiet", is_flag=True, help="warnings and results only")
@click.version_option(package_name="compress")
def main(verbose: int, quiet: bool) -> None:
    """compress: make a language model smaller and know exactly what it cost."""
    _setup_logging(verbose, quiet)


def _methods_cmd() -> click.Command:
    @click.command(help=VERBS["methods"][1])
    @click.option("--family", default=None, help="only this family")
    def methods_cmd(family: str | None) -> None:
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

    return methods_cmd


def _family_verb(kind: str, family: str, example: str, *, default_method: str | None = None) -> click.Command:
    @click.command(help=f"{VERBS[kind][1].split(' (')[0].rstrip('.')}, e.g. `compress {kind} {example}`.")
    @click.option("--method", required=default_method is None, default=default_method,
                  show_default=default_method is not None, help=f"a {family} method (see `compress methods`)")
    @run_options()
    @method_options(family)
    def verb(method: str, **kw) -> None:
        extra = {"teacher": kw.pop("teacher") or kw["model"]} if kind == "distill" else {}
        _run_method_verb(kind, family, method, kw, **extra)

    if kind == "distill":
        verb = click.option("--teacher", default=None, help="teacher model (default: the --model itself)")(verb)
    return verb


def _quantize_cmd() -> click.Command:
    return _family_verb("quantize", "quantization", "--method gptq --bits 4 --group-size 128")


def _prune_cmd() -> click.Command:
    return _family_verb("prune", "pruning", "--method wanda --sparsity 0.5")


def _finetune_cmd() -> click.Command:
    return _family_verb("finetune", "training-aware", "--method qlora --steps 200")


def _distill_cmd() -> click.Command:
    return _family_verb("distill", "distillation", "--student-layers 15", default_method="distill")


def _fit_cmd() -> click.Command:
    @click.command()
    @run_options()
    @run_options(FIT)
    def fit_cmd(**kw) -> None:
        """The most accurate mixed-precision model under a budget: each linear's sensitivity to every candidate
        (method x bits x group size) on the calibration set, an exact knapsack allocation, then the plan applied,
        evaluated and recorded, e.g. `compress fit --max-bits 3.5` or `compress fit --max-size 80MB --frontier 4`."""
        from compress.runs.fit import fit

        try:
            fit(_spec("fit", [], kw), console=_console())
        except CompressError as e:
            _fail(e)

    return fit_cmd


def _recipe_cmd() -> click.Command:
    @click.command()
    @click.argument("recipe_file", type=click.Path())
    @run_options()
    def recipe_cmd(recipe_file: str, **kw) -> None:
        """Run a recipe file: methods composed in order (e.g. SmoothQuant then GPTQ). Settings in the file (model,
        calib, nsamples, ...) apply unless given on the command line."""
        from compress.pipeline.recipe import Recipe
        from compress.runs.runner import execute

        try:
            _, doc = Recipe.from_yaml(recipe_file)  # validates the stages
            settings = {k: v for k, v in doc.items() if k != "stages"}
            ctx = click.get_current_context()
            spec = RunSpec.build(settings, where=f"recipe file {recipe_file!r}")  # checked and coerced
            for f in run_fields(RUN):
                if f.name in settings and ctx.get_parameter_source(f.name) == click.core.ParameterSource.DEFAULT:
                    kw[f.name] = getattr(spec, f.name)
                else:
                    kw[f.name] = coerce(f, kw[f.name])
            execute(_spec("recipe", doc["stages"], kw), console=_console())
        except CompressError as e:
            _fail(e)

    return recipe_cmd


def _eval_cmd() -> click.Command:
    @click.command(help=VERBS["eval"][1])
    @run_options("eval")
    def eval_cmd(**kw) -> None:
        from compress.runs.runner import execute

        try:
            execute(_spec("eval", [], kw, save=False), console=_console())
        except CompressError as e:
            _fail(e)

    return eval_cmd


def _generate_cmd() -> click.Command:
    @click.command(help=VERBS["generate"][1])
    @click.option("--model", "-m", default="smollm2", show_default=True,
                  help="checkpoint folder, model folder, .gguf file, hub id, or 'smollm2'")
    @click.option("--prompt", "-p", required=True, help="the text to complete (with --chat: the user's message)")
    @click.option("--max-new-tokens", "-n", default=128, show_default=True, type=int, help="tokens to generate at most")
    @click.option("--chat/--no-chat", default=False, show_default=True,
                  help="wrap the prompt in the tokenizer's chat template (instruct models)")
    @click.option("--dtype", default="auto", show_default=True, help="auto (a checkpoint's own), float32, bfloat16, float16")
    @click.option("--device", default="auto", show_default=True, help="auto (CUDA when present), cpu, cuda[:N]")
    @click.option("--threads", default=None, type=int, help="CPU threads (default: torch's)")
    @click.option("--compile/--no-compile", "compile_", default=False, show_default=True,
                  help="decode with a static KV cache and a torch.compile'd one-token step (compiles first; eager "
                       "prefill)")
    def generate_cmd(model: str, prompt: str, max_new_tokens: int, chat: bool, dtype: str, device: str,
                     threads: int | None, compile_: bool) -> None:
        import sys

        from compress.runs.generate import generate

        try:
            def write(text: str) -> None:
                sys.stdout.write(text)
                sys.stdout.flush()

            r = generate(model, prompt, max_new_tokens=max_new_tokens, chat=chat, dtype=dtype, device=device,
                         threads=threads, compile=compile_, write=write)
        except CompressError as e:
            _fail(e)
        sys.stdout.write("\n")
        decode = f"{r['decode_tokens_per_second']:.1f} tok/s" if r["decode_tokens_per_second"] else "-"
        click.echo(f"prefill {r['prefill_tokens_per_second']:.1f} tok/s ({r['prompt_tokens']} tokens, "
                   f"{r['prefill_seconds']:.2f} s) · decode {decode} ({r['new_tokens']} tokens, "
                   f"{r['decode_seconds']:.2f} s) · peak memory {r['peak_memory_bytes'] / 2**20:.0f} MiB "
                   f"({r['peak_memory_measure']}) · {r['device']}, {r['threads']} threads, {r['dtype']}, batch 1, "
                   f"greedy, one run without warm-up", err=True)
        if r["compile_seconds"] is not None:
            click.echo(f"compile {r['compile_seconds']:.1f} s (the first compiled decode step, left out of the decode "
                       f"speed; static KV cache, torch.compile)", err=True)
        if r.get("dequant_compile_seconds") is not None:
            click.echo(f"compile {r['dequant_compile_seconds']:.1f} s (the prefill's de-quantization, per layer shape, "
                       "before the prompt)", err=True)
        for kernel, n in r["kernels"].items():
            click.echo(f"  {n} layer{'s' if n != 1 else ''}: {kernel}", err=True)

    return generate_cmd


def _report_cmd() -> click.Command:
    from compress.runs.report import SIZE_AXES

    @click.command()
    @click.option("--metric", default="wikitext2_ppl", show_default=True,
                  help="metric key: wikitext2_ppl (or ppl_wikitext2), c4_ppl, piqa_acc, hellaswag_acc_norm, ...")
    @click.option("--model", "-m", default=None, help="only records of this model (name, spec or fingerprint)")
    @click.option("--results-dir", default=None, help="results store folder (default: $COMPRESS_RESULTS_DIR or ./results)")
    @click.option("--size", "axis", default="bits", show_default=True, type=click.Choice(SIZE_AXES),
                  help="size axis: bits per weight, or bytes of the model in memory")
    @click.option("--protocol", default=None, help="protocol key (or prefix) to report (default: the most common)")
    @click.option("--out", default=None, help="output path without extension (default: <results-dir>/report-<metric>)")
    def report_cmd(**kw) -> None:
        """Accuracy (or perplexity) vs size from the results store: table, Pareto front, PNG and Markdown."""
        from compress.runs.report import report

        try:
            report(console=_console(), **kw)
        except CompressError as e:
            _fail(e)

    return report_cmd


def _grid_cmd() -> click.Command:
    @click.group()
    def grid_group() -> None:
        """Experiment grids: models x methods x options x calibration x evaluations, resumable."""

    @grid_group.command("run")
    @click.argument("grid_file", type=click.Path())
    @click.option("--results-dir", default=None, help="results store folder (default: the grid's results_dir, "
                                                      "$COMPRESS_RESULTS_DIR or ./results)")
    @click.option("--executor", default="in-process", show_default=True, type=click.Choice(["in-process", "ray"]))
    @click.option("--address", default=None, help="Ray cluster address (default: start a local Ray instance)")
    @click.option("--num-cpus", default=None, type=int, help="CPUs of a local Ray instance (default: all)")
    @click.option("--cpus-per-cell", default=1.0, show_default=True, type=float, help="Ray CPUs requested per cell")
    @click.option("--gpus-per-cell", default=None, type=float, help="Ray GPUs per cell (default: 1 when the cluster has GPUs, else 0)")
    @click.option("--retry-failed/--skip-failed", default=True, show_default=True, help="run failed cells again")
    def grid_run(grid_file: str, **kw) -> None:
        """Run every cell that has no successful record yet."""
        from compress.runs.grid import run_grid

        try:
            console = _console()
            out = run_grid(grid_file, console=console, **kw)
            console.print(f"grid: {out['cells']} cells, {out['skipped']} already done, ran {out['ran']}: "
                          f"{out['ok']} ok, {out['failed']} failed")
            if out["failed"]:
                raise SystemExit(1)
        except CompressError as e:
            _fail(e)

    @grid_group.command("status")
    @click.argument("grid_file", type=click.Path())
    @click.option("--results-dir", default=None)
    def grid_status(grid_file: str, results_dir: str | None) -> None:
        """Show each cell as done, failed or pending."""
        from compress.runs.grid import load_grid, print_status

        try:
            print_status(load_grid(grid_file, results_dir), _console())
        except CompressError as e:
            _fail(e)

    return grid_group


if __name__ == "__main__":  # pragma: no cover
    main()
