"""Experiment grids: models x methods x method options x calibration settings x evaluations, one run per cell.

A grid file (YAML):

    name: smollm2-rtn-gptq
    models: [smollm2]
    methods:                                  # option lists expand (a list-typed option takes a list of lists)
      - {method: rtn,  bits: [2, 3, 4, 8], group_size: 128}
      - {method: gptq, bits: [2, 3, 4, 8], group_size: 128}
      - {stages: [{method: rtn, bits: 8}, {method: gptq, bits: 4}]}   # a recipe, as it is
      - {method: none}                        # the model itself, evaluated only
    calibration:                              # applies to cells whose methods need calibration
      - {calib: wikitext2, nsamples: 32, seqlen: 512, seed: 0}
    evaluation:                               # one mapping, or a list of them (another axis)
      {eval: [wikitext2], eval_seqlen: 512, eval_windows: 8, tasks: [piqa], limit: 200, efficiency: false}
    run: {save: false}                        # any other RunSpec field, for every cell

Each cell is keyed by a hash of its full configuration (model, stages with every option, calibration, evaluation,
run settings); the key is the `tag` of its record in the results store. `compress grid run` skips cells that already
have a successful record, so a re-run after a crash or a kill does only what is missing (a record is appended
atomically when its cell finishes, so no finished cell is ever lost); a failing cell gets a record with
`status: failed` and its error, and the grid goes on (failed cells are retried on the next run). Records are always
written by the driver, into the one store. Executors: in-process (default), or Ray (`--executor ray`): one task per
cell, with a GPU requested per cell when the cluster has GPUs.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import time
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

from compress.core.config import _base_type
from compress.core.errors import CompressError, ConfigError
from compress.core.readers import read_yaml
from compress.pipeline.method import get_method
from compress.pipeline.recipe import Recipe
from compress.runs.console import _setup_logging
from compress.runs.results import append_record, environment, new_run_id, now_iso, read_records
from compress.runs.runner import execute
from compress.runs.spec import RunSpec, coerce

log = logging.getLogger("compress")

GRID_KEYS = ("name", "models", "methods", "calibration", "evaluation", "run", "results_dir", "output_dir")
CALIB_KEYS = ("calib", "nsamples", "seqlen", "seed")
EVAL_KEYS = {"eval": "eval", "eval_seqlen": "eval_seqlen", "eval_windows": "eval_windows",
             "eval_batch_size": "eval_batch_size", "tasks": "tasks", "limit": "task_limit", "task_limit": "task_limit",
             "efficiency": "efficiency"}
# RunSpec fields a grid sets itself; everything else may come from `run:`.
SPEC_FIELDS = {f.name: f for f in fields(RunSpec)}
_OWN_FIELDS = {"kind", "stages", "model", "tag", "output", "results_dir", "progress", *CALIB_KEYS,
               *EVAL_KEYS.values()}
KIND_OF_FAMILY = {"quantization": "quantize", "pruning": "prune", "training-aware": "finetune", "distillation": "distill"}


@dataclass
class Cell:
    key: str
    config: dict[str, Any]  # model, stages, calibration, evaluation, run: what the key hashes
    label: str

    def spec(self, results_dir: str | None, output_dir: str | None):
        """The RunSpec of this cell."""
        c = self.config
        recipe = Recipe.from_specs(c["stages"]) if c["stages"] else None
        kind = "eval" if recipe is None else ("recipe" if len(c["stages"]) > 1 else KIND_OF_FAMILY.get(recipe.family, "recipe"))
        kw: dict[str, Any] = {**c["run"], **(c.get("calibration") or {}), **(c.get("evaluation") or {})}
        spec = RunSpec.build(kw, where="grid", kind=kind, stages=[dict(s) for s in c["stages"]], model=c["model"],
                             tag=self.key, results_dir=results_dir, progress=False)
        if recipe is not None and spec.save:
            slug = "".join(ch if ch.isalnum() or ch in ".-" else "-" for ch in self.label).strip("-").lower()
            spec.output = str(Path(output_dir or "checkpoints") / f"{slug[:60]}-{self.key[:8]}")
            spec.overwrite = True  # the folder belongs to this cell: a killed earlier attempt may have left it
        else:
            spec.save = False
        return spec


@dataclass
class Grid:
    name: str
    path: Path
    cells: list[Cell]
    results_dir: str | None
    output_dir: str | None


# ---------------------------------------------------------------------------------------------------------------
# Reading and expanding
# ---------------------------------------------------------------------------------------------------------------
def cell_key(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _as_list(value: Any, what: str) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def _is_list_option(method: str, option: str) -> bool:
    """Whether a method option itself takes a list (then a list of lists is an axis of the grid)."""
    for f, tp in get_method(method).Config.field_specs():
        if f.name == option.replace("-", "_"):
            base, _ = _base_type(tp)
            return typing.get_origin(base) in (list, tuple) or base in (list, tuple)
    return False


def expand_method(entry: Any, i: int) -> list[list[dict[str, Any]]]:
    """One `methods:` entry -> the stage lists it stands for (option lists expanded as a product)."""
    if not isinstance(entry, dict):
        raise ConfigError(f"grid methods entry {i + 1} must be a mapping such as {{method: rtn, bits: [3, 4]}}, got {entry!r}")
    if "stages" in entry:
        if set(entry) != {"stages"} or not isinstance(entry["stages"], list):
            raise ConfigError(f"grid methods entry {i + 1}: a recipe entry holds only a 'stages:' list")
        return [[dict(s) for s in entry["stages"]]]
    if "method" not in entry:
        raise ConfigError(f"grid methods entry {i + 1} needs a 'method' (or a 'stages' list), got {entry!r}")
    method = str(entry["method"])
    options = dict(entry.get("options") or {}, **{k: v for k, v in entry.items() if k not in ("method", "options")})
    if method.lower() == "none":
        if options:
            raise ConfigError(f"grid methods entry {i + 1}: method none (evaluation only) takes no options")
        return [[]]
    names, axes = [], []
    for opt, value in options.items():
        names.append(opt)
        if isinstance(value, list) and not (_is_list_option(method, opt) and not all(isinstance(v, list) for v in value)):
            axes.append(value)
        else:
            axes.append([value])
    return [[{"method": method, **dict(zip(names, combo))}] for combo in itertools.product(*axes)]


def _check_keys(d: dict[str, Any], allowed: typing.Iterable[str], where: str) -> None:
    bad = sorted(set(d) - set(allowed))
    if bad:
        raise ConfigError(f"{where}: unknown key {', '.join(map(repr, bad))}; allowed: {', '.join(sorted(allowed))}")


def load_grid(path: str | os.PathLike, results_dir: str | None = None) -> Grid:
    """Read, validate and expand a grid file. Every method option is checked before any cell runs."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"grid file {str(path)!r} does not exist")
    doc = read_yaml(p, "grid file") or {}
    if not isinstance(doc, dict):
        raise ConfigError(f"grid file {str(path)!r} must be a mapping with models, methods, ...")
    _check_keys(doc, GRID_KEYS, f"grid file {str(path)!r}")
    models = [str(m) for m in _as_list(doc.get("models"), "models")] or ["smollm2"]
    methods = _as_list(doc.get("methods"), "methods")
    if not methods:
        raise ConfigError(f"grid file {str(path)!r} lists no methods")
    calibs = _as_list(doc.get("calibration"), "calibration") or [{}]
    evals = _as_list(doc.get("evaluation"), "evaluation") or [{}]
    run = doc.get("run") or {}
    for i, c in enumerate(calibs):
        if not isinstance(c, dict):
            raise ConfigError(f"grid calibration entry {i + 1} must be a mapping of {', '.join(CALIB_KEYS)}")
        _check_keys(c, CALIB_KEYS, f"grid calibration entry {i + 1}")
    for i, e in enumerate(evals):
        if not isinstance(e, dict):
            raise ConfigError(f"grid evaluation entry {i + 1} must be a mapping of {', '.join(EVAL_KEYS)}")
        _check_keys(e, EVAL_KEYS, f"grid evaluation entry {i + 1}")
    if not isinstance(run, dict):
        raise ConfigError("grid 'run:' must be a mapping of run settings")
    _check_keys(run, set(SPEC_FIELDS) - _OWN_FIELDS, "grid 'run:'")
    stage_lists = [s for i, m in enumerate(methods) for s in expand_method(m, i)]
    recipes = {}
    for stages in stage_lists:
        if stages:
            recipes[json.dumps(stages, sort_keys=True, default=str)] = Recipe.from_specs(stages)  # validates options
    cells: dict[str, Cell] = {}
    for model, stages, calib, ev in itertools.product(models, stage_lists, calibs, evals):
        recipe = recipes.get(json.dumps(stages, sort_keys=True, default=str))
        ev = {EVAL_KEYS[k]: coerce(SPEC_FIELDS[EVAL_KEYS[k]], v) for k, v in ev.items()}
        config = {"model": model, "stages": stages,
                  "calibration": dict(calib) if recipe is not None and recipe.needs_calibration else None,
                  "evaluation": {k: v for k, v in ev.items()}, "run": dict(run)}
        key = cell_key(config)
        if key in cells:
            continue  # e.g. a calibration axis over a method that needs none: one cell
        label = f"{Path(model).name} {recipe.label() if recipe else 'none (evaluation only)'}"
        if config["calibration"]:
            label += " [" + ", ".join(f"{k} {v}" for k, v in config["calibration"].items()) + "]"
        if len(evals) > 1:
            label += " {" + ", ".join(f"{k} {v}" for k, v in ev.items()) + "}"
        cells[key] = Cell(key, config, label)
    rdir = results_dir or doc.get("results_dir")
    return Grid(str(doc.get("name") or p.stem), p, list(cells.values()), rdir, doc.get("output_dir"))


# ---------------------------------------------------------------------------------------------------------------
# State: read from the results store
# ---------------------------------------------------------------------------------------------------------------
def cell_states(grid: Grid) -> dict[str, tuple[str, dict[str, Any] | None]]:
    """key -> (done | failed | pending, the deciding record)."""
    keys = {c.key for c in grid.cells}
    latest_ok: dict[str, dict] = {}
    latest_fail: dict[str, dict] = {}
    for rec in read_records(grid.results_dir, strict=True):
        tag = rec.get("tag")
        if tag not in keys:
            continue
        (latest_ok if rec.get("status") == "ok" else latest_fail)[tag] = rec
    out = {}
    for c in grid.cells:
        if c.key in latest_ok:
            out[c.key] = ("done", latest_ok[c.key])
        elif c.key in latest_fail:
            out[c.key] = ("failed", latest_fail[c.key])
        else:
            out[c.key] = ("pending", None)
    return out


def failure_record(cell: Cell, spec, error: BaseException | str, seconds: float, executor: str) -> dict[str, Any]:
    msg = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return {"run_id": new_run_id(), "time": now_iso(), "kind": spec.kind, "status": "failed", "tag": cell.key,
            "error": msg.strip().splitlines()[0][:2000] if msg.strip() else type(error).__name__,
            "model": {"spec": cell.config["model"]}, "method": "+".join(s["method"] for s in cell.config["stages"]) or "none",
            "setting": cell.label, "grid": {"cell": cell.config}, "run": {k: v for k, v in spec.to_dict().items() if k != "stages"},
            "wall_seconds": round(seconds, 2), "env": environment(), "executor": executor}


def _store(record: dict[str, Any], grid: Grid, cell: Cell, executor: str) -> None:
    record.pop("_store", None)
    record.setdefault("grid", {})
    record["grid"].update({"name": grid.name, "file": str(grid.path), "cell": cell.config})
    record["executor"] = executor
    append_record(record, grid.results_dir)


def _summary(record: dict[str, Any]) -> str:
    if record.get("status") != "ok":
        return f"FAILED: {record.get('error')}"
    after = (record.get("metrics") or {}).get("after") or {}
    parts = [f"{k} {v['value']:.4g}" for k, v in after.items() if isinstance(v, dict) and "value" in v][:4]
    bpw = (record.get("size") or {}).get("bits_per_weight")
    if bpw:
        parts.append(f"{bpw} bits/weight")
    return ", ".join(parts) + f" ({record.get('wall_seconds', 0):.0f} s)"


# ---------------------------------------------------------------------------------------------------------------
# Executors
# ---------------------------------------------------------------------------------------------------------------
def _absolute_spec(spec):
    """Paths made absolute, so that a worker in another folder (Ray) reads and writes the same places."""
    for attr in ("data_dir", "output", "results_dir"):
        v = getattr(spec, attr)
        if v:
            setattr(spec, attr, str(Path(v).expanduser().resolve()))
    if spec.model and os.path.exists(os.path.expanduser(spec.model)):
        spec.model = str(Path(spec.model).expanduser().resolve())
    return spec


def run_in_process(grid: Grid, cells: list[Cell], report: Callable[[Cell, dict], None]) -> None:
    from tqdm.auto import tqdm

    for cell in tqdm(cells, desc=f"grid {grid.name}", unit="cell", disable=len(cells) < 2, leave=False):
        spec = _absolute_spec(cell.spec(grid.results_dir, grid.output_dir))
        t0 = time.perf_counter()
        log.info("cell %s: %s", cell.key, cell.label)
        try:
            record = execute(spec, store=False)
        except Exception as e:  # noqa: BLE001 - any failure of one cell is recorded and the grid goes on
            log.warning("cell %s failed: %s: %s", cell.key, type(e).__name__, e)
            record = failure_record(cell, spec, e, time.perf_counter() - t0, "in-process")
        _store(record, grid, cell, "in-process")
        report(cell, record)


def _ray_cell(spec_dict: dict[str, Any]) -> dict[str, Any]:
    """A Ray task: run one cell and hand the record back to the driver (the worker never writes the store)."""
    import socket

    _setup_logging(0, True)
    record = execute(RunSpec(**spec_dict), store=False)
    record["node"] = socket.gethostname()
    return record


def run_on_ray(grid: Grid, cells: list[Cell], report: Callable[[Cell, dict], None], *, address: str | None = None,
               num_cpus: int | None = None, cpus_per_cell: float = 1.0, gpus_per_cell: float | None = None) -> None:
    try:
        import ray
    except ImportError:
        raise CompressError("--executor ray needs the ray package: pip install ray") from None
    env = {k: v for k, v in os.environ.items()
           if k.startswith(("COMPRESS_", "HF_", "TRANSFORMERS_", "TOKENIZERS_")) or k in ("PYTHONPATH",)}
    started = False
    if not ray.is_initialized():
        init: dict[str, Any] = dict(runtime_env={"env_vars": env}, include_dashboard=False, log_to_driver=False,
                                    configure_logging=False)
        if address:
            init["address"] = address
        else:
            init.update(num_cpus=num_cpus or os.cpu_count(), object_store_memory=256 * 2**20)
        log.info("starting Ray %s", f"client of {address}" if address else "locally")
        ray.init(**init)
        started = True
    try:
        gpus = gpus_per_cell
        if gpus is None:
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
        task = ray.remote(_ray_cell).options(num_cpus=cpus_per_cell, num_gpus=gpus, max_retries=0)
        log.info("submitting %d cells to Ray (%s CPU, %s GPU per cell)", len(cells), cpus_per_cell, gpus)
        pending: dict[Any, tuple[Cell, Any, float]] = {}
        for cell in cells:
            spec = _absolute_spec(cell.spec(grid.results_dir, grid.output_dir))
            if gpus == 0 and spec.device == "auto":
                spec.device = "cpu"  # no GPU was reserved for this task: do not take one a sibling holds
            pending[task.remote(spec.to_dict())] = (cell, spec, time.perf_counter())
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                cell, spec, t0 = pending.pop(ref)
                try:
                    record = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - the task's own error, recorded
                    cause = getattr(e, "cause", None) or e
                    log.warning("cell %s failed: %s: %s", cell.key, type(cause).__name__, cause)
                    record = failure_record(cell, spec, cause, time.perf_counter() - t0, "ray")
                _store(record, grid, cell, "ray")
                report(cell, record)
    finally:
        if started:
            ray.shutdown()


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------
def run_grid(path: str, *, results_dir: str | None = None, executor: str = "in-process", address: str | None = None,
             num_cpus: int | None = None, cpus_per_cell: float = 1.0, gpus_per_cell: float | None = None,
             retry_failed: bool = True, console=None) -> dict[str, int]:
    grid = load_grid(path, results_dir)
    states = cell_states(grid)
    todo = [c for c in grid.cells if states[c.key][0] == "pending" or (retry_failed and states[c.key][0] == "failed")]
    n_done = sum(s == "done" for s, _ in states.values())
    log.info("grid %s: %d cells, %d done already, %d to run", grid.name, len(grid.cells), n_done, len(todo))
    counter = {"ok": 0, "failed": 0}

    def report(cell: Cell, record: dict[str, Any]) -> None:
        counter["ok" if record.get("status") == "ok" else "failed"] += 1
        line = f"[{counter['ok'] + counter['failed']}/{len(todo)}] {cell.key} {cell.label}: {_summary(record)}"
        (console.print(line, markup=False, highlight=False) if console else log.info(line))

    if todo:
        if executor == "in-process":
            run_in_process(grid, todo, report)
        elif executor == "ray":
            run_on_ray(grid, todo, report, address=address, num_cpus=num_cpus, cpus_per_cell=cpus_per_cell,
                       gpus_per_cell=gpus_per_cell)
        else:
            raise ConfigError(f"--executor {executor!r} is not one of: in-process, ray")
    return {"cells": len(grid.cells), "skipped": n_done, "ran": len(todo), **counter}


def print_status(grid: Grid, console) -> dict[str, int]:
    from rich.table import Table

    states = cell_states(grid)
    t = Table(title=f"grid {grid.name} ({grid.path})", title_justify="left")
    for col in ("cell", "status", "configuration", "result"):
        t.add_column(col)
    colors = {"done": "green", "failed": "red", "pending": "yellow"}
    for c in grid.cells:
        state, rec = states[c.key]
        t.add_row(c.key, f"[{colors[state]}]{state}[/]", c.label, _summary(rec) if rec else "")
    console.print(t)
    counts = {s: sum(v[0] == s for v in states.values()) for s in ("done", "failed", "pending")}
    console.print(f"{len(grid.cells)} cells: {counts['done']} done, {counts['failed']} failed, {counts['pending']} pending")
    return counts


