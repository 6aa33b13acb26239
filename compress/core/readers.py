"""Guarded readers: every file the project reads goes through one reader per kind (JSON, YAML, JSON lines,
safetensors, GGUF), which turns a parse or integrity error into one `FileFormatError` line naming the file and the
problem (e.g. a safetensors shard cut short by an interrupted copy), instead of a library's traceback.

The safetensors and GGUF checks read only the headers: they are what the run's validation step uses before any
weight is loaded.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

from compress.core.errors import FileFormatError
from compress.core.paths import read_jsonl

__all__ = ["gguf_info", "load_safetensors", "read_json", "read_jsonl", "read_yaml", "safetensors_header"]


def _exists(path: Path, what: str) -> None:
    if not path.is_file():
        raise FileFormatError(f"{what} {str(path)!r} does not exist or is not a file")


def _read_text(p: Path, what: str) -> str:
    _exists(p, what)
    try:
        return p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise FileFormatError(f"{what} {str(p)!r} cannot be read: {e}") from None


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """The parsed JSON of a file; a missing, unreadable or malformed file is one line naming it."""
    p = Path(path)
    text = _read_text(p, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise FileFormatError(f"{what} {str(p)!r} is not valid JSON: line {e.lineno} column {e.colno}: {e.msg}") from None


def read_json_object(path: str | os.PathLike, what: str = "JSON file") -> dict[str, Any]:
    """read_json for files that must hold one JSON object (config.json, an index, ...)."""
    doc = read_json(path, what)
    if not isinstance(doc, dict):
        raise FileFormatError(f"{what} {str(path)!r} must hold a JSON object, not {type(doc).__name__}")
    return doc


def read_yaml(path: str | os.PathLike, what: str = "YAML file") -> Any:
    """The parsed YAML of a file (safe_load); a syntax error is one line with its position."""
    import yaml

    p = Path(path)
    text = _read_text(p, what)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1} column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise FileFormatError(f"{what} {str(p)!r} is not valid YAML: {where}{problem}") from None


# safetensors layout (https://github.com/huggingface/safetensors#format): u64 little-endian header length N, N bytes
# of JSON {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the data buffer.
_ST_MAX_HEADER = 100 * 1024 * 1024


def safetensors_header(path: str | os.PathLike, what: str = "safetensors file") -> dict[str, dict[str, Any]]:
    """The tensor table of a safetensors file ({name: {dtype, shape, data_offsets}}), after checking that the file
    is as long as its header says (a truncated shard is named here, before anything is loaded)."""
    p = Path(path)
    _exists(p, what)
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FileFormatError(f"{what} {str(p)!r} is truncated: {size} bytes, too short for a header")
        (n,) = struct.unpack("<Q", head)
        if n > _ST_MAX_HEADER or 8 + n > size:
            raise FileFormatError(f"{what} {str(p)!r} is truncated or not safetensors: its header claims {n} bytes, "
                                  f"the file has {size}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise FileFormatError(f"{what} {str(p)!r} is not a safetensors file: its header is not JSON") from None
    if not isinstance(header, dict):
        raise FileFormatError(f"{what} {str(p)!r} is not a safetensors file: its header is not a JSON object")
    header.pop("__metadata__", None)
    end = 0
    for name, info in header.items():
        offs = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs)):
            raise FileFormatError(f"{what} {str(p)!r} has a malformed entry for tensor {name!r}")
        end = max(end, offs[1])
    if 8 + n + end != size:
        state = "truncated" if 8 + n + end > size else "longer than its header describes"
        raise FileFormatError(f"{what} {str(p)!r} is {state}: {size} bytes, its header describes {8 + n + end} "
                              f"(an interrupted copy or download?)")
    return header


def load_safetensors(path: str | os.PathLike, what: str = "safetensors file") -> dict[str, Any]:
    """All tensors of a safetensors file, checked first; any error of the library is one line naming the file."""
    from safetensors.torch import load_file

    safetensors_header(path, what)
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - SafetensorError and friends: one line naming the file
        raise FileFormatError(f"{what} {str(path)!r} cannot be loaded: {type(e).__name__}: {e}") from None


# GGUF layout (ggml docs/gguf.md): magic b"GGUF", u32 version, u64 tensor count, u64 metadata count, ...
def gguf_info(path: str | os.PathLike, *, tensors: bool = True) -> dict[str, Any]:
    """The version, metadata and tensor table of a GGUF file, checked: the magic, the version, and (with `tensors`)
    that every tensor's data lies inside the file. Returns {"version", "metadata": {key: value}, "tensors":
    {name: shape}}."""
    p = Path(path)
    _exists(p, "GGUF file")
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(8)
    if len(head) < 8 or head[:4] != b"GGUF":
        raise FileFormatError(f"GGUF file {str(p)!r} is not GGUF: it starts with {head[:4]!r}, not b'GGUF'")
    (version,) = struct.unpack("<I", head[4:8])
    if version not in (2, 3):
        raise FileFormatError(f"GGUF file {str(p)!r} has version {version}; supported: 2, 3")
    if not tensors:
        return {"version": version, "metadata": {}, "tensors": {}}
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(p))
        meta = {}
        for key, field in reader.fields.items():
            if key.startswith("tokenizer.ggml.") or not field.types:
                continue  # vocabularies: large and not needed here
            try:
                meta[key] = field.contents()
            except Exception:  # noqa: BLE001 - a value this gguf version cannot decode is left out
                pass
        table, end = {}, 0
        for t in reader.tensors:
            table[t.name] = [int(d) for d in t.shape]
            end = max(end, int(t.data_offset) + int(t.n_bytes))
    except FileFormatError:
        raise
    except Exception as e:  # noqa: BLE001 - a parse error of the gguf library: one line naming the file
        raise FileFormatError(f"GGUF file {str(p)!r} cannot be parsed (truncated or corrupt?): "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if end > size:
        raise FileFormatError(f"GGUF file {str(p)!r} is truncated: {size} bytes, its tensors need {end}")
    return {"version": version, "metadata": meta, "tensors": table}


def safetensors_files(folder: str | os.PathLike) -> list[str]:
    """The safetensors files of a transformers folder: those its index lists, else model.safetensors."""
    index = Path(folder) / "model.safetensors.index.json"
    if not index.is_file():
        return ["model.safetensors"]
    weight_map = read_json_object(index, "safetensors index").get("weight_map")
    if not isinstance(weight_map, dict):
        raise FileFormatError(f"safetensors index {str(index)!r} has no 'weight_map' mapping")
    return sorted(set(map(str, weight_map.values())))
