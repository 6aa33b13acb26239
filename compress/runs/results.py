"""The results store: one JSON record per run, in results/runs.jsonl.

Why JSON lines: a record is a nested document (protocols, per-layer details) that must stay readable by people
and diffable in git; nothing here needs queries that a list of dicts cannot answer, and there is no schema to
migrate. Why it is safe: every append takes an exclusive lock, writes the old contents plus the new line to a
temporary file in the same folder, fsyncs it and renames it over the store, so a crash at any moment leaves
either the old store or the new one, never a torn line. Readers skip (and report) any line that is not JSON,
e.g. one written by hand.
"""
from __future__ import annotations

import datetime as _dt
import logging
import os
import platform
import subprocess
import uuid
from pathlib import Path
from typing import Any

from compress.core.paths import append_jsonl, read_jsonl

log = logging.getLogger("compress")
STORE_NAME = "runs.jsonl"


def results_dir(path: str | os.PathLike | None = None) -> Path:
    """--results-dir, else $COMPRESS_RESULTS_DIR, else ./results."""
    return Path(path or os.environ.get("COMPRESS_RESULTS_DIR") or "results").expanduser()


def store_path(path: str | os.PathLike | None = None) -> Path:
    p = Path(path) if path and str(path).endswith(".jsonl") else results_dir(path) / STORE_NAME
    return p


def append_record(record: dict[str, Any], path: str | os.PathLike | None = None) -> Path:
    store = store_path(path)
    append_jsonl(store, record)
    return store


def read_records(path: str | os.PathLike | None = None, *, strict: bool = False) -> list[dict[str, Any]]:
    """The store's records. A line that is not JSON is skipped with a warning, or, with `strict` (the CLI's verbs),
    refused with one error naming the store and the line."""
    store = store_path(path)
    return read_jsonl(store, strict=f"results store {str(store)!r}" if strict else None)


def new_run_id() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict[str, Any]:
    import importlib.metadata as md

    import torch

    versions = {}
    for pkg in ("compress", "torch", "transformers", "safetensors", "bitsandbytes", "peft", "lm_eval", "compressed-tensors", "gguf"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    env = {"python": platform.python_version(), "platform": platform.platform(), "versions": versions,
           "git_commit": git_commit(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def peak_memory() -> dict[str, int]:
    """Peak resident memory of this process so far (and peak CUDA allocation if a GPU is used), in bytes."""
    import resource

    import torch

    out = {"host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
    return out


