"""One compression run, end to end: validate everything, load the model, measure it, run the recipe, measure
again, write the checkpoint, append the results record. The CLI verbs and the experiment grid all call `execute`.
"""
from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any

import torch

from compress.core.errors import CompressError, ConfigError, DataError, Interrupted
from compress.evals.baselines import cached_baseline, remember_baseline
from compress.evals.coverage import block_coverage, coverage_summary, refuse_fused_experts
from compress.evals.perplexity import perplexity, prepare, protocol_key
from compress.evals.size import size_report
from compress.formats import check_output_dir, save_checkpoint
from compress.layers.kernels import select_kernels
from compress.layers.quant_embedding import quantize_embeddings
from compress.pipeline.recipe import Recipe, RunContext, experts_refusers
from compress.runs.results import append_record, environment, new_run_id, now_iso, peak_memory, read_records
from compress.runs.spec import RunSpec, apply_paper_protocol
from compress.sources.data import (check_calibration_supply, eval_text, get_calibration, resolve_data_dir,
                                   with_pydoc_fallback)
from compress.sources.models import (ModelFacts, check_context, float_folder, inspect_model, load_model, load_tokenizer,
                                     resolve_device, resolve_dtype)

log = logging.getLogger("compress")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()


def default_output(spec: RunSpec, recipe) -> str:
    model = _slug(Path(spec.model).name if spec.model else "model") or "model"
    emb = f"-emb{spec.quantize_embeddings}" if spec.quantize_embeddings != "none" else ""
    return str(Path("checkpoints") / (f"{model}-{_slug(recipe.method_name)}-{_slug(recipe.label().split('(', 1)[-1])}"
                                      .rstrip("-") + emb))


def validate(spec: RunSpec):
    """Check every input before anything is loaded or written. Returns (recipe, output folder or None)."""
    if spec.paper_protocol:
        apply_paper_protocol(spec)
    recipe = Recipe.from_specs(spec.stages) if spec.stages else None
    if spec.kind != "eval" and recipe is None:
        raise ConfigError("no method given")
    if recipe is not None and recipe.needs_calibration:
        if spec.nsamples < 1:
            raise ConfigError(f"--nsamples {spec.nsamples!r} is out of range; allowed: >= 1")
        if spec.seqlen < 2:
            raise ConfigError(f"--seqlen {spec.seqlen!r} is out of range; allowed: >= 2")
    if spec.quantize_embeddings not in ("none", "8", "4"):
        raise ConfigError(f"--quantize-embeddings {spec.quantize_embeddings!r} is not allowed; use none, 8 or 4")
    if spec.eval_windows is not None and spec.eval_windows < 1:
        raise ConfigError(f"--eval-windows {spec.eval_windows!r} is out of range; allowed: >= 1")
    if spec.eval_seqlen < 2:
        raise ConfigError(f"--eval-seqlen {spec.eval_seqlen!r} is out of range; allowed: >= 2")
    if spec.batch_size < 1:
        raise ConfigError(f"--batch-size {spec.batch_size!r} is out of range; allowed: >= 1")
    for pat in spec.ignore:
        try:
            re.compile(pat)
        except re.error as e:
            raise ConfigError(f"--ignore {pat!r} is not a regular expression: {e}") from None
    if spec.exports:
        from compress.formats.exporters import check_format, check_plan

        for fmt in spec.exports:
            check_format(fmt)
            if recipe is not None:
                check_plan(fmt, [(s.name, s.config.to_dict()) for s in recipe.stages], spec.to_dict())
        if recipe is not None and not spec.save:
            raise ConfigError(f"--export {', '.join(spec.exports)} needs a checkpoint; drop --no-save")
    resolve_device(spec.device)
    resolve_dtype(spec.dtype)
    if spec.stream == "on":
        _check_streamable(spec, recipe)
    output = None
    if recipe is not None and spec.save:
        output = spec.output or default_output(spec, recipe)
        check_output_dir(output, spec.overwrite)
    read_records(spec.results_dir, strict=True)  # a torn store is named now, not after the run
    resolve_data_dir(spec.data_dir)
    facts = inspect_model(spec.model)  # config and every weight file's header checked; no weight loaded
    if spec.teacher:
        inspect_model(spec.teacher)
    calibrates = recipe is not None and recipe.needs_calibration
    check_context(facts, seqlen=spec.seqlen if calibrates else None, eval_seqlen=spec.eval_seqlen if spec.eval else None)
    if recipe is not None:
        _check_against_model(recipe, spec, facts)
    fallback = spec.data_dir is None
    for ds in spec.eval:  # the evaluation texts exist and are readable (read now, not after the compression)
        with_pydoc_fallback(lambda n: eval_text(n, spec.data_dir), ds) if fallback else eval_text(ds, spec.data_dir)
    if calibrates:
        tok = load_tokenizer(facts)
        if tok is not None:
            try:
                check_calibration_supply(spec.calib, tok, nsamples=spec.nsamples, seqlen=spec.seqlen,
                                         data_dir=spec.data_dir, fallback=fallback and not spec.paper_protocol)
            except DataError as e:
                if not spec.paper_protocol:
                    raise
                raise DataError(f"--paper-protocol (C4, 128 x 2048 tokens) cannot be met: {e}") from None
    return recipe, output


def _check_streamable(spec: RunSpec, recipe: Recipe | None) -> None:
    """--stream: what a block-by-block run cannot do, refused before any work."""
    from compress.pipeline.stream import check_streamable

    if recipe is None:
        raise ConfigError("--stream compresses a model file to file; use it with a method")
    check_streamable(recipe.stages)
    if not spec.save:
        raise ConfigError("--stream writes the checkpoint block by block; drop --no-save")
    for flag, given in (("--export", spec.exports), ("--tasks", spec.tasks), ("--efficiency", spec.efficiency),
                        ("--quantize-embeddings", spec.quantize_embeddings != "none"), ("--calib generated", spec.calib == "generated")):
        if given:
            raise ConfigError(f"--stream: {flag} needs the whole model in memory; run it on the checkpoint afterwards "
                              "or drop --stream")


def _stream_reason(spec: RunSpec, recipe: Recipe | None) -> str | None:
    """Why this run streams (None: it runs in memory). Auto: a layer-wise run on a float folder whose weights would
    take more than 80% of the available RAM in the compute dtype."""
    if spec.stream == "on":
        return "--stream on"
    if spec.stream == "off" or recipe is None:
        return None
    import psutil

    from compress.pipeline.stream import folder_weight_bytes

    try:
        _, folder = float_folder(spec.model)
        _check_streamable(spec, recipe)
    except CompressError:
        return None
    need = folder_weight_bytes(folder) * torch.empty(0, dtype=resolve_dtype(spec.dtype)).element_size() / 2
    avail = psutil.virtual_memory().available
    if need > 0.8 * avail:
        return f"the model needs about {need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB of RAM are available"
    return None


def _check_against_model(recipe: Recipe, spec: RunSpec, facts: ModelFacts) -> None:
    """Options the model's layers cannot honour: an --ignore that matches nothing (a warning), a group or an N:M
    block wider than the narrowest layer it applies to."""
    widths = facts.linear_widths()
    if not widths:
        return
    for pat in spec.ignore:
        if not any(re.search(pat, name) for name in widths):
            log.warning("--ignore %r matches no linear layer of model %r (e.g. %s)", pat, spec.model,
                        ", ".join(list(widths)[:2]))
    kept = {n: w for n, w in widths.items() if not any(re.search(p, n) for p in spec.ignore)}
    if not kept:
        return
    name, narrowest = min(kept.items(), key=lambda kv: kv[1])
    for stage, given in zip(recipe.stages, spec.stages):
        gs = getattr(stage.config, "group_size", None)
        if isinstance(gs, int) and gs > narrowest and "group_size" not in given:  # the default, not the user's
            log.warning("the default --group-size %d of %s is wider than layer %r (%d inputs): such layers get one "
                        "group per row", gs, stage.name, name, narrowest)
        elif isinstance(gs, int) and gs > narrowest:
            raise ConfigError(f"--group-size {gs} of {stage.name} is larger than the width of layer {name!r} "
                              f"({narrowest} inputs); allowed: -1 (per channel) or 1..{narrowest}")
        nm = stage.config.nm() if callable(getattr(stage.config, "nm", None)) else None
        if nm is not None and nm[1] > narrowest:
            raise ConfigError(f"--pattern {nm[0]}:{nm[1]} of {stage.name} has blocks of {nm[1]} inputs, wider than "
                              f"layer {name!r} ({narrowest} inputs)")


def evaluate(model, tokenizer, spec: RunSpec, *, model_fp: str | None = None, label: str = "") -> dict[str, Any]:
    """Perplexity on each dataset of spec.eval (and lm-eval tasks if asked). With model_fp, results are cached."""
    metrics: dict[str, Any] = {}
    dtype = next(model.parameters()).dtype
    seqlen = spec.eval_seqlen
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and seqlen > max_pos:  # validate has warned already
        log.debug("eval seqlen %d exceeds the model's %d positions; using %d", seqlen, max_pos, max_pos)
        seqlen = max_pos
    fallback = spec.data_dir is None
    for ds in spec.eval:
        protocol, _ = prepare(tokenizer, ds, seqlen=seqlen, max_windows=spec.eval_windows, data_dir=spec.data_dir,
                              fallback=fallback, dtype=dtype)
        key = protocol_key(protocol)
        cached = cached_baseline(model_fp, key) if model_fp else None
        if cached is not None:
            log.info("%s perplexity of the %s model: %.4f (cached)", protocol["dataset"], label, cached["value"])
            metrics[f"ppl_{protocol['dataset']}"] = {**cached, "cached": True}
            continue
        res = perplexity(model, tokenizer, ds, seqlen=seqlen, max_windows=spec.eval_windows, batch_size=spec.eval_batch_size,
                         data_dir=spec.data_dir, fallback=fallback, progress=spec.progress)
        log.info("%s perplexity of the %s model: %.4f (%d windows of %d tokens, %.0f s)", protocol["dataset"], label,
                 res["value"], protocol["windows"], seqlen, res["seconds"])
        metrics[f"ppl_{protocol['dataset']}"] = res
        if model_fp:
            remember_baseline(model_fp, key, res)
    if spec.tasks:
        from compress.evals.lm_eval_tasks import evaluate_tasks  # issue: lm-eval harness integration

        metrics.update(evaluate_tasks(model, tokenizer, spec.tasks, limit=spec.task_limit, data_dir=spec.data_dir,
                                      model_fp=model_fp))
    if spec.efficiency:
        from compress.evals.efficiency import efficiency_metrics

        metrics.update(efficiency_metrics(model))
    return metrics


def execute(spec: RunSpec, console=None, *, store: bool = True) -> dict[str, Any]:
    """Run one compression (or evaluation) and append its record (unless store=False: a grid driver appends it).
    Returns the record."""
    recipe, output = validate(spec)
    kept: list[str] = []
    try:
        return _execute(spec, recipe, output, console, store, kept)
    except KeyboardInterrupt as e:
        if isinstance(e, Interrupted):
            raise
        stored = any(k.startswith("the results record") for k in kept)
        what = (f"kept {', '.join(kept)} (complete)" if kept else "no checkpoint was written") + \
            ("" if stored else "; no results record was appended")
        raise Interrupted(f"interrupted (Ctrl-C): {what}") from None


def _execute(spec: RunSpec, recipe: Recipe | None, output: str | None, console, store: bool,
             kept: list[str]) -> dict[str, Any]:
    t_start = time.perf_counter()
    device = resolve_device(spec.device)
    why = _stream_reason(spec, recipe)
    if why is not None:
        log.warning("streaming the model block by block (%s)", why)
        return _execute_streamed(spec, recipe, output, console, store, kept, t_start, why)
    log.info("loading %s", spec.model)
    loaded = load_model(spec.model, dtype=spec.dtype, device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    if tok is None:
        raise CompressError(f"model {spec.model!r} has no tokenizer files; cannot calibrate or evaluate it")
    record: dict[str, Any] = {
        "run_id": new_run_id(), "time": now_iso(), "kind": spec.kind, "status": "ok", "tag": spec.tag,
        "model": {"name": loaded.name, "spec": spec.model, "source": loaded.source.kind, "fingerprint": loaded.fingerprint,
                  "dtype": str(next(model.parameters()).dtype).replace("torch.", "")},
        "method": recipe.method_name if recipe else "none",
        "family": recipe.family if recipe else "none",
        "setting": recipe.label() if recipe else "",
        "recipe": recipe.specs() if recipe else [],
        "run": {k: v for k, v in spec.to_dict().items() if k not in ("stages", "progress")},
    }
    if recipe is None:  # plain evaluation
        model.to(device)
        record["metrics"] = {"after": evaluate(model, tok, spec, label="given")}
        record["size"] = size_report(model, loaded.source.path if loaded.source.kind in ("folder", "checkpoint") else None)
        record["model"]["params"] = record["size"]["params"]
        record["checkpoint"] = loaded.source.path if loaded.source.kind in ("folder", "checkpoint") else None
        record["checkpoint_info"] = loaded.info
        return _finish(record, spec, t_start, console, store, kept)

    before = {}
    measures = bool(spec.eval or spec.tasks or spec.efficiency)
    if spec.baseline and measures:
        model.to(device)
        before = evaluate(model, tok, spec, model_fp=loaded.fingerprint, label="uncompressed")
        model.to("cpu")
    size_before = size_report(model)
    calib = None
    if recipe.needs_calibration:
        calib = get_calibration(spec.calib, tok, nsamples=spec.nsamples, seqlen=spec.seqlen, seed=spec.seed,
                                data_dir=spec.data_dir, model=model,
                                fallback=spec.data_dir is None and not spec.paper_protocol)
        if calib.source.fallback_from:
            log.warning("calibrating on pydoc text instead of %s", calib.source.fallback_from)
    ctx = RunContext(tokenizer=tok, device=device, calibration=calib, data_dir=spec.data_dir, seed=spec.seed,
                     batch_size=spec.batch_size, spill=spec.spill, ignore=list(spec.ignore), progress=spec.progress,
                     model_spec=spec.model, model_dtype=next(model.parameters()).dtype)
    if spec.teacher:
        ctx.teacher = load_model(spec.teacher, dtype=spec.dtype, device="cpu")
    if experts_refusers(recipe.stages):  # weight methods that cannot compress MoE experts: stop before any work
        refuse_fused_experts(model, ", ".join(experts_refusers(recipe.stages)))
    torch.manual_seed(spec.seed)
    t0 = time.perf_counter()
    model = recipe.run(model, ctx)
    embeddings = None
    if spec.quantize_embeddings != "none":
        embeddings = quantize_embeddings(model, int(spec.quantize_embeddings))
        log.info("embeddings quantized: %s %s%s", embeddings["embedding"], embeddings["grid"],
                 " (the tied head reads the same codes)" if embeddings["tied_head"] else "")
        select_kernels(model)
        record["setting"] = f"{record['setting']} + embeddings {embeddings['grid']}"
    coverage = block_coverage(model)
    log.info("coverage of the decoder blocks: %s", coverage_summary(coverage))
    compress_seconds = time.perf_counter() - t0
    log.info("%s finished in %.1f s", recipe.label(), compress_seconds)
    model.to(device)
    after = evaluate(model, tok, spec, label="compressed") if measures else {}
    model.to("cpu")
    record.update({
        "calibration": calib.record() if calib else None,
        "metrics": {"before": before, "after": after},
        "compress_seconds": round(compress_seconds, 2),
        "details": {**recipe.report(), **({"quantize_embeddings": embeddings} if embeddings else {})},
        "coverage": {"compressed_modules": coverage["compressed_modules"],
                     "compressed_params": coverage["compressed_params"],
                     "kept": {k: len(v) for k, v in coverage["kept"].items()},
                     "summary": coverage_summary(coverage)},
    })
    if output:
        provenance = {k: record[k] for k in ("run_id", "time", "model", "method", "setting", "recipe", "calibration")}
        provenance["metrics"] = {"after": after}
        save_checkpoint(model, tok, output, overwrite=spec.overwrite, provenance=provenance,
                        quant_info={"method": recipe.method_name, "setting": record["setting"]})
        log.info("checkpoint written to %s", output)
        kept.append(f"checkpoint {output}")
        record["checkpoint"] = str(output)
        for fmt in spec.exports:
            from compress.formats.exporters import export, export_note

            path = export(fmt, model, tok, output, overwrite=spec.overwrite, options=spec.to_dict())
            kept.append(f"{fmt} export {path}")
            record.setdefault("exports", {})[fmt] = str(path)
            note = export_note(fmt, spec.to_dict())
            if note:
                record.setdefault("export_notes", {})[fmt] = note
    else:
        record["checkpoint"] = None
    record["size_before"] = size_before
    record["size"] = size_report(model, output)
    record["model"]["params"] = size_before["params"]
    return _finish(record, spec, t_start, console, store, kept)


def _execute_streamed(spec: RunSpec, recipe: Recipe, output: str, console, store: bool, kept: list[str],
                      t_start: float, why: str) -> dict[str, Any]:
    """The run with one decoder block in memory at a time (compress.pipeline.stream): file to file, then the
    checkpoint's perplexity block by block."""
    from transformers import AutoTokenizer

    from compress.evals.perplexity import streamed_perplexity
    from compress.pipeline.stream import StreamedModel, stream_compress

    _check_streamable(spec, recipe)
    src, folder = float_folder(spec.model)
    dtype = resolve_dtype(spec.dtype)
    tok = AutoTokenizer.from_pretrained(folder)
    fallback = spec.data_dir is None

    def ppl_all(path: Path, label: str) -> dict[str, Any]:
        out = {}
        for ds in spec.eval:
            res = streamed_perplexity(path, tok, ds, seqlen=spec.eval_seqlen, max_windows=spec.eval_windows,
                                      data_dir=spec.data_dir, fallback=fallback, dtype=dtype, progress=spec.progress)
            log.info("%s perplexity of the %s model (streamed): %.4f (%d windows of %d tokens, %.0f s)",
                     res["protocol"]["dataset"], label, res["value"], res["protocol"]["windows"], spec.eval_seqlen,
                     res["seconds"])
            out[f"ppl_{res['protocol']['dataset']}"] = res
        return out

    before = ppl_all(folder, "uncompressed") if spec.baseline and spec.eval else {}
    calib = None
    if recipe.needs_calibration:
        calib = get_calibration(spec.calib, tok, nsamples=spec.nsamples, seqlen=spec.seqlen, seed=spec.seed,
                                data_dir=spec.data_dir, fallback=fallback and not spec.paper_protocol)
    ctx = RunContext(tokenizer=tok, device=resolve_device(spec.device), calibration=calib, data_dir=spec.data_dir,
                     seed=spec.seed, batch_size=spec.batch_size, spill=spec.spill, ignore=list(spec.ignore),
                     progress=spec.progress, model_spec=spec.model, model_dtype=dtype)
    torch.manual_seed(spec.seed)
    t0 = time.perf_counter()
    size_before = size_report(StreamedModel(folder, dtype).model)
    facts = stream_compress(folder, recipe.stages, ctx, output, tok, overwrite=spec.overwrite, dtype=dtype,
                            quant_info={"method": recipe.method_name, "setting": recipe.label()},
                            stage_specs=recipe.specs())
    compress_seconds = time.perf_counter() - t0
    kept.append(f"checkpoint {output}")
    model = facts["model"]
    coverage = block_coverage(model)
    log.info("coverage of the decoder blocks: %s", coverage_summary(coverage))
    after = ppl_all(Path(output), "compressed") if spec.eval else {}
    record: dict[str, Any] = {
        "run_id": new_run_id(), "time": now_iso(), "kind": spec.kind, "status": "ok", "tag": spec.tag,
        "model": {"name": src.display_name, "spec": spec.model, "source": src.kind, "fingerprint": None,
                  "dtype": str(dtype).replace("torch.", ""), "params": size_before["params"]},
        "method": recipe.method_name, "family": recipe.family, "setting": recipe.label(), "recipe": recipe.specs(),
        "run": {k: v for k, v in spec.to_dict().items() if k not in ("stages", "progress")},
        "streamed": {"reason": why, "blocks": facts["blocks"], "source_folder": str(folder)},
        "calibration": calib.record() if calib else None,
        "metrics": {"before": before, "after": after},
        "compress_seconds": round(compress_seconds, 2),
        "details": recipe.report(),
        "coverage": {"compressed_modules": coverage["compressed_modules"],
                     "compressed_params": coverage["compressed_params"],
                     "kept": {k: len(v) for k, v in coverage["kept"].items()},
                     "summary": coverage_summary(coverage)},
        "checkpoint": str(output), "size_before": size_before, "size": size_report(model, output),
    }
    return _finish(record, spec, t_start, console, store, kept)


def _finish(record: dict[str, Any], spec: RunSpec, t_start: float, console, store: bool = True,
            kept: list[str] | None = None) -> dict[str, Any]:
    record["wall_seconds"] = round(time.perf_counter() - t_start, 2)
    record["peak_memory"] = peak_memory()
    record["env"] = environment()
    record["_store"] = str(append_record(record, spec.results_dir)) if store else None
    if kept is not None and store:
        kept.append(f"the results record in {record['_store']}")
    if console is not None:
        print_summary(record, console)
    return record


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def print_summary(record: dict[str, Any], console) -> None:
    from rich.table import Table

    t = Table(title=f"{record['model']['name']}: {record['setting'] or record['method']}", show_lines=False)
    t.add_column("metric")
    t.add_column("before", justify="right")
    t.add_column("after", justify="right")
    t.add_column("protocol")
    before = record.get("metrics", {}).get("before", {})
    after = record.get("metrics", {}).get("after", {})
    for key in sorted(set(before) | set(after)):
        b, a = before.get(key), after.get(key)
        proto = (a or b or {}).get("protocol", {})
        desc = ", ".join(str(proto[k]) for k in ("variant", "split") if k in proto)
        if "seqlen" in proto:
            desc += f", seqlen {proto['seqlen']}, {proto['windows']}/{proto['windows_total']} windows"
        if proto.get("fallback_from"):
            desc += f" (fallback from {proto['fallback_from']})"
        t.add_row(key, f"{b['value']:.4f}" if b else "-", f"{a['value']:.4f}" if a else "-", desc)
    size = record.get("size", {})
    sb = record.get("size_before", {})
    t.add_row("bits per weight (block linears)", str(sb.get("bits_per_weight", "-")), str(size.get("bits_per_weight", "-")), "codes+scales+zeros+indices")
    if "bits_per_weight_with_adapters" in size:  # LoRA adapters kept beside a (quantized) base
        t.add_row("bits per weight incl. adapters", "", str(size["bits_per_weight_with_adapters"]),
                  f"{size['adapter_params']:,} adapter parameters")
    t.add_row("parameters", f"{sb.get('params', '-'):,}" if sb else "-", f"{size.get('params', 0):,}", "")
    t.add_row("bytes in memory", _fmt_bytes(sb.get("memory_bytes")), _fmt_bytes(size.get("memory_bytes")), "")
    if "checkpoint_bytes" in size:
        t.add_row("checkpoint on disk", "", _fmt_bytes(size["checkpoint_bytes"]), f"{size.get('bits_per_param')} bits/param")
    if record.get("coverage"):
        t.add_row("decoder-block coverage", "", "", record["coverage"]["summary"])
    console.print(t)
    extra = []
    if record.get("compress_seconds") is not None:
        extra.append(f"compression {record['compress_seconds']:.1f} s")
    extra.append(f"wall {record['wall_seconds']:.1f} s")
    extra.append(f"peak RSS {_fmt_bytes(record['peak_memory'].get('host_peak_rss_bytes'))}")
    if record.get("checkpoint"):
        extra.append(f"checkpoint {record['checkpoint']}")
    if record.get("_store"):
        extra.append(f"record appended to {record['_store']}")
    console.print(" · ".join(extra))
