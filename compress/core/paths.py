"""Paths and atomic writes: the project's cache folder, files replaced only when complete, and JSON-lines stores
appended under a lock (the results store, the baseline cache)."""
from __future__ import annotations

import fcntl
import json
import logging
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from compress.core.errors import DataError

log = logging.getLogger("compress")


def cache_dir() -> Path:
    """The project's cache folder: $COMPRESS_CACHE_DIR, else ~/.cache/compress."""
    root = os.environ.get("COMPRESS_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "compress")
    return Path(root)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file atomically: temp file in the same folder, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def _locked(store: Path) -> Iterator[None]:
    store.parent.mkdir(parents=True, exist_ok=True)
    with open(store.with_name(store.name + ".lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _json_default(o: Any) -> Any:
    import torch

    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (torch.dtype, torch.device, Path)):
        return str(o)
    if hasattr(o, "to_dict"):
        return o.to_dict()
    return str(o)


def append_jsonl(store: Path, record: dict[str, Any]) -> None:
    """Append one JSON record to a JSON-lines file: under a lock, the whole file rewritten atomically, so a reader
    never sees a torn line."""
    line = json.dumps(record, sort_keys=True, default=_json_default) + "\n"
    with _locked(store):
        old = store.read_bytes() if store.exists() else b""
        if old and not old.endswith(b"\n"):
            old += b"\n"
        atomic_write_bytes(store, old + line.encode("utf-8"))


def read_jsonl(store: Path, *, strict: str | None = None, numbered: bool = False) -> list[Any]:
    """The records of a JSON-lines file ([] when it does not exist), or (line number, record) pairs. A line that is
    not JSON is skipped with a warning, or, with `strict` (how to name the file in the message), refused with one
    DataError."""
    if not store.exists():
        return []
    out = []
    try:
        text = store.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{strict or str(store)!r} is not UTF-8 text (byte {e.start}); is it a JSON-lines file?") from None
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            out.append((i + 1, json.loads(line)) if numbered else json.loads(line))
        except json.JSONDecodeError as e:
            if strict is not None:
                raise DataError(f"{strict}: line {i + 1} is not JSON ({e.msg}, column {e.colno}; a torn write or "
                                f"a hand edit?)") from None
            log.warning("%s line %d is not a JSON record; skipped", store, i + 1)
    return out


