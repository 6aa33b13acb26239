"""One generic, lazy registry (as lm-eval's `api/registry.py`): entries are objects or "module:attribute" strings,
imported on first use, so that listing names imports nothing heavy.

    METHODS = Registry("method", {"rtn": "compress.methods.rtn:RTN"})
    METHODS.get("rtn")        # imports compress.methods.rtn, returns RTN
    METHODS.names()           # ["rtn"], imports nothing
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Generic, Iterator, TypeVar

from compress.core.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, entries: dict[str, T | str] | None = None, *, normalize: Callable[[str], str] = str):
        self.kind = kind
        self._normalize = normalize
        self._entries: dict[str, T | str] = {}
        for name, target in (entries or {}).items():
            self.add(name, target)

    def add(self, name: str, target: T | str, *, replace: bool = False) -> None:
        """Register `target` (an object, or a lazy "module:attribute" string) under `name`."""
        key = self._normalize(name)
        old = self._entries.get(key)
        if old is not None and not replace and old is not target and not (isinstance(old, str) and old == target):
            raise ValueError(f"{self.kind} {key!r} is registered twice ({old!r} and {target!r})")
        if isinstance(target, str) and ":" not in target:
            raise ValueError(f"{self.kind} {key!r}: a lazy entry is 'module:attribute', got {target!r}")
        self._entries[key] = target

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of `add`."""
        def deco(obj: T) -> T:
            self.add(name, obj, replace=isinstance(self._entries.get(self._normalize(name)), str))
            return obj

        return deco

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._normalize(name) in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, name: str) -> T:
        """The entry, imported on first use; a one-line ConfigError naming the known entries when there is none."""
        key = self._normalize(name)
        if key not in self._entries:
            raise ConfigError(f"unknown {self.kind} {name!r}; known {self.kind}s: {', '.join(self._entries) or 'none'}")
        target = self._entries[key]
        if isinstance(target, str):
            module, _, attr = target.partition(":")
            obj: Any = importlib.import_module(module)
            for part in attr.split("."):
                obj = getattr(obj, part)
            self._entries[key] = target = obj
        return target  # type: ignore[return-value]

    def items(self) -> list[tuple[str, T]]:
        """Every entry, all imported."""
        return [(name, self.get(name)) for name in list(self._entries)]
