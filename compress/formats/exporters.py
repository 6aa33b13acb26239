"""Extra checkpoint formats written beside the native one (`--export FORMAT`): each takes the compressed model in
memory and writes `<output>-<format>/`. The formats are the exporting entries of compress.formats.base.FORMATS."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch.nn as nn

from compress.core.errors import ConfigError
from compress.core.readers import read_json_object
from compress.formats.base import Format, all_formats
from compress.layers.online_hadamard import online_hadamards


def known_formats() -> list[str]:
    return sorted(f.name for f in all_formats() if f.exports)


def check_format(fmt: str) -> None:
    known = known_formats()
    if fmt not in known:
        raise ConfigError(f"--export {fmt!r} is not a known format; known: {', '.join(known)}")


def format_named(fmt: str) -> Format:
    check_format(fmt)
    return next(f for f in all_formats() if f.name == fmt)


def export_options(fmt: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """The run options (by RunSpec field name) that format `fmt`'s export takes."""
    wanted = format_named(fmt).options
    return {k: v for k, v in (options or {}).items() if k in wanted}


def per_layer_stages(stages: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    """A stage with a per-layer plan file (the `mixed` method's `plan`) as one stage per distinct layer setting."""
    out: list[tuple[str, dict[str, Any]]] = []
    for name, cfg in stages:
        if not cfg.get("plan"):
            out.append((name, cfg))
            continue
        layers = read_json_object(cfg["plan"], "plan file").get("layers") or {}
        seen: set[str] = set()
        for setting in layers.values():
            key = json.dumps(setting, sort_keys=True)
            if isinstance(setting, dict) and key not in seen:
                seen.add(key)
                out.append((str(setting.get("method")), {k: v for k, v in setting.items() if k != "method"}))
    return out


def check_plan(fmt: str, stages: list[tuple[str, dict[str, Any]]], options: dict[str, Any] | None = None) -> None:
    """Before any work: refuse a recipe whose result `fmt` cannot hold (a format's own check, e.g. GGUF's grids; a
    per-layer plan is checked layer setting by layer setting, and refused where the format holds one grid only)."""
    writer = format_named(fmt)
    if not writer.online_rotation and any(name == "rotate" and cfg.get("online", True) for name, cfg in stages):
        raise ConfigError(_online_refusal(fmt))
    stages = per_layer_stages(stages)
    if writer.one_grid:
        grids = sorted({(c.get("bits"), c.get("group_size"), bool(c.get("sym"))) for _, c in stages
                        if c.get("bits") is not None and c.get("group_size") is not None})
        if len(grids) > 1:
            raise ConfigError(f"--export {fmt}: the plan mixes {len(grids)} grids "
                              f"({', '.join(f'w{b} g{g}' + (' sym' if s else '') for b, g, s in grids)}) and the {fmt} "
                              "export writes one grid per checkpoint; use the native checkpoint, or --export gguf "
                              "(a type per tensor)")
    writer.check_plan(stages, export_options(fmt, options))


def _online_refusal(fmt: str) -> str:
    return (f"--export {fmt} cannot carry rotate's online Hadamard before down_proj (the {fmt} loaders do not apply "
            "it); rotate with --no-online (online: false) for an R1-only model, or use the native or dense format")


def export(fmt: str, model: nn.Module, tokenizer: Any, output: str | Path, *, overwrite: bool = False,
           options: dict[str, Any] | None = None) -> Path:
    writer = format_named(fmt)
    target = Path(f"{output}-{fmt}")
    if not writer.online_rotation and online_hadamards(model):
        raise ConfigError(_online_refusal(fmt))
    if not writer.handles(model):
        raise ConfigError(f"--export {fmt!r} has no layout for this model's compressed layers")
    return writer.export(model, tokenizer, target, overwrite, **export_options(fmt, options))


def export_note(fmt: str, options: dict[str, Any] | None = None) -> str | None:
    return format_named(fmt).note(export_options(fmt, options))
