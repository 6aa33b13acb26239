"""Typed, validated method options.

A method's config is a dataclass whose fields are declared with `option(...)`: the type comes from the annotation,
the allowed values from `range`/`choices`/`special`, the help text from `help`. The same declaration validates
input (one clear error naming the value and what is allowed) and becomes the method's CLI flags.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from compress.core.errors import ConfigError


def option(
    default: Any,
    help: str,
    *,
    range: tuple[float | None, float | None] | None = None,
    choices: typing.Sequence[Any] | None = None,
    special: dict[Any, str] | None = None,
    cli: bool = True,
) -> Any:
    """Declare a config field. `special` lists values allowed outside `range`, with their meaning (e.g. -1: per-channel)."""
    meta = {"help": help, "range": range, "choices": tuple(choices) if choices else None, "special": special or {}, "cli": cli}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass
class MethodConfig:
    """Base class of every method's options. Subclasses are dataclasses of `option(...)` fields."""

    def check(self) -> None:
        """Cross-field checks; raise ConfigError. Override in subclasses."""

    # ----------------------------------------------------------------------------------------------------------
    @classmethod
    def field_specs(cls) -> list[tuple[dataclasses.Field, type]]:
        hints = typing.get_type_hints(cls)
        return [(f, hints[f.name]) for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, method: str = "") -> "MethodConfig":
        """Build and validate from user values (CLI or YAML); unknown keys are an error naming the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        norm = {k.replace("-", "_"): v for k, v in values.items() if v is not None}
        unknown = sorted(set(norm) - known)
        if unknown:
            where = f"method {method!r}" if method else cls.__name__
            raise ConfigError(
                f"{where} has no option {', '.join(flag_name(u) for u in unknown)}; "
                f"its options are: {', '.join(flag_name(k) for k in sorted(known)) or '(none)'}"
            )
        coerced = {}
        for f, tp in cls.field_specs():
            if f.name in norm:
                coerced[f.name] = _coerce(norm[f.name], tp, f.name)
        cfg = cls(**coerced)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for f, tp in self.field_specs():
            value = getattr(self, f.name)
            meta = f.metadata
            _check_type(value, tp, f.name)
            if value is None:
                continue
            special = meta.get("special") or {}
            if value in special:
                continue
            choices = meta.get("choices")
            if choices is not None and value not in choices:
                raise ConfigError(f"{flag_name(f.name)} {value!r} is not allowed; choose one of: {', '.join(map(str, choices))}")
            rng = meta.get("range")
            if rng is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
                lo, hi = rng
                if (lo is not None and value < lo) or (hi is not None and value > hi):
                    allowed = _describe_range(lo, hi)
                    if special:
                        allowed += " or " + ", ".join(f"{k} ({v})" for k, v in special.items())
                    raise ConfigError(f"{flag_name(f.name)} {value!r} is out of range; allowed: {allowed}")
        self.check()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _describe_range(lo: float | None, hi: float | None) -> str:
    if lo is not None and hi is not None:
        return f"{lo}..{hi}"
    if lo is not None:
        return f">= {lo}"
    return f"<= {hi}"


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(underlying type, optional?) for annotations like `int`, `int | None`, `Optional[str]`."""
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else tp), True
    return tp, False


def _coerce(value: Any, tp: Any, name: str) -> Any:
    base, optional = _base_type(tp)
    if value is None:
        return None
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{flag_name(name)} {value!r} is not a boolean; use true or false")
    if base in (int, float, str):
        if isinstance(value, bool) and base is not str:
            raise ConfigError(f"{flag_name(name)} {value!r} is not a number")
        try:
            if base is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            if base is int and isinstance(value, str) and value.strip().lower() in ("none", "") and optional:
                return None
            return base(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{flag_name(name)} {value!r} is not a valid {base.__name__}") from None
    if typing.get_origin(base) in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        (inner,) = typing.get_args(base)[:1]
        return [_coerce(v, inner, name) for v in value]
    return value


def _check_type(value: Any, tp: Any, name: str) -> None:
    base, optional = _base_type(tp)
    if value is None:
        if not optional:
            raise ConfigError(f"{flag_name(name)} is required")
        return
    ok = True
    if base is bool:
        ok = isinstance(value, bool)
    elif base is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif base is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif base is str:
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"{flag_name(name)} {value!r} is not a valid {getattr(base, '__name__', base)}")


def parse_nm(pattern: str, name: str = "pattern") -> tuple[int, int]:
    """Parse an N:M sparsity pattern such as '2:4' (keep N of every M consecutive input weights)."""
    try:
        n_str, m_str = pattern.split(":")
        n, m = int(n_str), int(m_str)
    except (ValueError, AttributeError):
        raise ConfigError(f"{flag_name(name)} {pattern!r} is not an N:M pattern such as 2:4 or 4:8") from None
    if not (0 < n < m <= 64):
        raise ConfigError(f"{flag_name(name)} {pattern!r} needs 0 < N < M <= 64")
    return n, m
