"""Zero-shot accuracy with lm-eval-harness on a model held in memory (original, compressed, or loaded from a checkpoint).

The model and tokenizer are wrapped in lm-eval's HFLM as they are, so a compressed model is scored exactly as the
run left it (QuantLinear and friends included), with no re-loading. Tasks:
* offline (shipped in evals/tasks/): piqa, arc_easy, arc_challenge, hellaswag, winogrande, boolq, lambada_openai.
  Each YAML reads the local copy in the data kit (`dataset_path: json` + `data_files`; PIQA through a small loader
  that joins its labels file); the data directory's absolute path is filled in at run time and the resolved YAMLs
  are written to a cache folder. Prompts and metrics are lm-eval's own tasks' (see each YAML's header).
* online: any other lm-eval task by name (and the shipped names when their local data is absent), fetched by lm-eval
  from the Hugging Face hub when it is reachable.
A task whose local data is absent offline is a one-line error naming the missing folder.

Every number comes with its protocol: lm-eval version, task version and definition (offline YAML or lm-eval's),
data file, split, items used of total, limit, few-shot count, backend, dtype, batch size. Two accuracies are
comparable only when their protocol keys match.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from compress.core.errors import ConfigError, DataError
from compress.core.paths import cache_dir
from compress.evals.baselines import cached_baseline, remember_baseline
from compress.sources.data import hub_reachable, resolve_data_dir

log = logging.getLogger("compress")

TASK_DIR = Path(__file__).resolve().parent / "tasks"
PLACEHOLDER = "@DATA_DIR@"
BACKEND = "lm-eval HFLM (in-memory transformers model, loglikelihood)"
METRIC_NAMES = {"perplexity": "ppl", "word_perplexity": "word_ppl"}
BOOTSTRAP_ITERS = 1000  # only for stderr of non-mean metrics (LAMBADA perplexity); never changes a value
# Protocol fields that describe where a number was computed, not how: kept in the record, left out of the key.
_NOT_IN_KEY = ("origin", "device", "seconds")


# ---------------------------------------------------------------------------------------------------------------
# The offline task definitions
# ---------------------------------------------------------------------------------------------------------------
def offline_tasks() -> dict[str, Path]:
    """Shipped task name -> its YAML template."""
    return {p.stem: p for p in sorted(TASK_DIR.glob("*.yaml"))}


def required_files(template: Path) -> list[str]:
    """Data files (relative to the data directory) a task template reads."""
    pattern = re.escape(PLACEHOLDER) + r"/([^\"'\s,}]+)"
    return sorted(set(re.findall(pattern, template.read_text(encoding="utf-8"))))


def missing_data(task: str, data_dir: Path | None) -> str | None:
    """None when the task's local data is present, else a sentence naming what is missing."""
    files = required_files(offline_tasks()[task])
    folders = sorted({f.split("/")[0] for f in files})
    if data_dir is None:
        return (f"no data directory is set (--data-dir or COMPRESS_DATA_DIR); its local data lives in "
                f"<data dir>/{', <data dir>/'.join(folders)}")
    absent = [f for f in files if not (data_dir / f).is_file()]
    if not absent:
        return None
    gone = sorted({(data_dir / f).parent for f in absent})
    return (f"its local data folder {', '.join(str(g) for g in gone)} is missing or incomplete "
            f"(needs {', '.join(Path(f).name for f in absent)})")


def split_tasks(tasks: list[str], data_dir: Path | None, *, hub: bool | None = None) -> tuple[list[str], list[str]]:
    """(offline tasks, lm-eval's own tasks). Raises DataError for a task that can run neither way."""
    shipped = offline_tasks()
    local, online, errors = [], [], []
    for name in tasks:
        if name in shipped:
            why = missing_data(name, data_dir)
            if why is None:
                local.append(name)
                continue
            if hub is None:
                hub = hub_reachable()
            if hub:
                log.warning("task %s: %s; using lm-eval's own %s from the hub", name, why, name)
                online.append(name)
            else:
                errors.append(f"task {name!r}: {why}, and the Hugging Face hub is not reachable for lm-eval's own {name}")
        else:
            if hub is None:
                hub = hub_reachable()
            if hub:
                online.append(name)
            else:
                errors.append(f"task {name!r} has no offline definition here (offline tasks: {', '.join(shipped)}) "
                              f"and the Hugging Face hub is not reachable for lm-eval's own")
    if errors:
        raise DataError("; ".join(errors))
    return local, online


def materialize(tasks: list[str], data_dir: Path) -> Path:
    """Write the task YAMLs with the data directory filled in to a cache folder (atomically); return the folder."""
    data_dir = Path(data_dir).resolve()
    sources = [offline_tasks()[t] for t in sorted(tasks)] + [TASK_DIR / "taskfns.py"]
    h = hashlib.sha256(str(data_dir).encode())
    for src in sources:
        h.update(src.name.encode() + b"\0" + src.read_bytes())
    target = cache_dir() / "lm_eval_tasks" / h.hexdigest()[:16]
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        for src in sources:
            text = src.read_text(encoding="utf-8")
            (tmp / src.name).write_text(text.replace(PLACEHOLDER, str(data_dir)), encoding="utf-8")
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not target.is_dir():
            raise
    return target


# ---------------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------------
def accuracy_key(protocol: dict[str, Any]) -> str:
    keep = {k: protocol[k] for k in sorted(protocol) if k not in _NOT_IN_KEY}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _lm_eval_version() -> str:
    import importlib.metadata as md

    return md.version("lm_eval")


def _protocol(task: str, results: dict[str, Any], *, offline: bool, data_dir: Path | None,
              limit: int | None, batch_size: int, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    cfg = (results.get("configs") or {}).get(task, {})
    nsamp = (results.get("n-samples") or {}).get(task, {})
    split = cfg.get("test_split") or cfg.get("validation_split")
    kwargs = cfg.get("dataset_kwargs") or {}
    files = (kwargs.get("data_files") or {}).get(split) if isinstance(kwargs.get("data_files"), dict) else None
    if offline and files and data_dir is not None:
        data = os.path.relpath(os.path.realpath(files), os.path.realpath(data_dir))  # symlinked kits too
        definition = "compress offline YAML (lm-eval's prompt)"
    else:
        data = f"{cfg.get('dataset_path')}:{cfg.get('dataset_name')}"
        definition = "lm-eval built-in"
    return {
        "task": task,
        "task_version": (results.get("versions") or {}).get(task),
        "task_definition": definition,
        "data": data,
        "split": split,
        "items": nsamp.get("effective"),
        "items_total": nsamp.get("original"),
        "limit": limit,
        "num_fewshot": (results.get("n-shot") or {}).get(task, 0),
        "lm_eval": _lm_eval_version(),
        "backend": BACKEND,
        "dtype": str(dtype).replace("torch.", ""),
        "batch_size": batch_size,
        "device": device.type,
        "origin": files or data,
    }


def _records(task: str, task_results: dict[str, Any], higher: dict[str, bool], base: dict[str, Any],
             seconds: float) -> dict[str, Any]:
    out = {}
    for key, value in task_results.items():
        metric, _, flt = key.partition(",")
        if metric not in higher or not isinstance(value, (int, float)):  # the task's metric_list only
            continue
        stderr = task_results.get(f"{metric}_stderr,{flt}")
        protocol = {"metric": metric, **base}
        out[f"{task}_{METRIC_NAMES.get(metric, metric)}"] = {
            "value": float(value),
            "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
            "higher_is_better": bool(higher.get(metric, True)),
            "protocol": protocol,
            "protocol_key": accuracy_key(protocol),
            "seconds": round(seconds, 3),
        }
    return out


def _run_lm_eval(lm, tasks: list[str], task_manager, *, limit: int | None, num_fewshot: int | None) -> dict[str, Any]:
    import lm_eval

    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=task_manager, limit=limit,
                                   num_fewshot=num_fewshot, log_samples=False, bootstrap_iters=BOOTSTRAP_ITERS,
                                   cache_requests=False)


def _quiet_lm_eval() -> None:
    for name in ("lm-eval", "lm_eval", "lm_eval.evaluator", "lm_eval.models.huggingface", "lm_eval.api.task"):
        logging.getLogger(name).setLevel(logging.ERROR)


@torch.no_grad()
def evaluate_tasks(model: torch.nn.Module, tokenizer, tasks: list[str], *, limit: int | None = None,
                   data_dir: str | os.PathLike | None = None, model_fp: str | None = None, num_fewshot: int = 0,
                   batch_size: int = 8) -> dict[str, Any]:
    """Score `model` on lm-eval tasks. Returns {"piqa_acc": {"value", "stderr", "protocol", ...}, ...}.

    With `model_fp` (the uncompressed model's fingerprint) results are cached per protocol, as perplexities are.
    """
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks = [t.strip() for t in tasks if t and t.strip()]
    if not tasks:
        return {}
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit {limit!r} is out of range; allowed: >= 1 items per task")
    if batch_size < 1:
        raise ConfigError(f"task batch size {batch_size!r} is out of range; allowed: >= 1")
    ddir = resolve_data_dir(data_dir)
    local, online = split_tasks(tasks, ddir)
    _quiet_lm_eval()
    param = next(model.parameters())
    dtype, device = param.dtype, param.device
    was_training = model.training
    model.eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    metrics: dict[str, Any] = {}
    groups = []
    if local:
        groups.append((local, lambda: TaskManager(include_path=str(materialize(local, ddir)), include_defaults=False), True))
    if online:
        groups.append((online, lambda: TaskManager(), False))
    try:
        for names, make_manager, offline in groups:
            manager = None
            for task in names:
                definition = offline_tasks()[task].read_bytes() if offline else b"hub"
                cache_id = "|".join([task, hashlib.sha256(definition).hexdigest()[:12], _lm_eval_version(), str(limit),
                                     str(num_fewshot), str(batch_size), str(dtype)])
                if model_fp:
                    hit = cached_baseline(model_fp, "lm-eval:" + cache_id)
                    if hit is not None:
                        log.info("%s of the uncompressed model: cached", task)
                        metrics.update({k: {**v, "cached": True} for k, v in hit.items()})
                        continue
                manager = manager or make_manager()
                if not offline and task not in manager.all_tasks:
                    raise ConfigError(f"task {task!r} is not an lm-eval task (lm-eval {_lm_eval_version()}); "
                                      f"offline tasks here: {', '.join(offline_tasks())}")
                t0 = time.perf_counter()
                res = _run_lm_eval(lm, [task], manager, limit=limit, num_fewshot=num_fewshot)
                seconds = time.perf_counter() - t0
                if res is None or task not in res.get("results", {}):
                    raise DataError(f"lm-eval returned no result for task {task!r}")
                base = _protocol(task, res, offline=offline, data_dir=ddir, limit=limit,
                                 batch_size=batch_size, dtype=dtype, device=device)
                recs = _records(task, res["results"][task], (res.get("higher_is_better") or {}).get(task, {}), base, seconds)
                summary = ", ".join(f"{k} {v['value']:.4f}" for k, v in recs.items())
                log.info("%s: %s (%s of %s items, %d-shot, %.0f s)", task, summary, base["items"], base["items_total"],
                         base["num_fewshot"], seconds)
                metrics.update(recs)
                if model_fp:
                    remember_baseline(model_fp, "lm-eval:" + cache_id, recs)
    finally:
        if was_training:
            model.train()
    return metrics
