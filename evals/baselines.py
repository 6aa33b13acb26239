"""A cache of the uncompressed model's metrics, keyed by model fingerprint and protocol, so that a run need not
measure the baseline again."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from compress.core.paths import append_jsonl, cache_dir, read_jsonl


# ---------------------------------------------------------------------------------------------------------------
# Baseline cache: full-precision metrics keyed by (model fingerprint, protocol), so a model is not re-evaluated
# for every run that compares against it.
# ---------------------------------------------------------------------------------------------------------------
def _baseline_store() -> Path:
    return cache_dir() / "baselines.jsonl"


def cached_baseline(model_fp: str, protocol_key: str) -> dict[str, Any] | None:
    store = _baseline_store()
    if not store.exists():
        return None
    for rec in reversed(read_jsonl(store)):
        if rec.get("model") == model_fp and rec.get("protocol_key") == protocol_key:
            return rec.get("metric")
    return None


def remember_baseline(model_fp: str, protocol_key: str, metric: dict[str, Any]) -> None:
    append_jsonl(_baseline_store(), {"model": model_fp, "protocol_key": protocol_key, "metric": metric})
