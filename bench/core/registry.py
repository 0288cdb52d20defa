"""One generic registry for defenses, attacks, checks, models and datasets (lm-evaluation-harness
style). A registry may name the packages whose modules register into it (`plugins`): they are
imported on the first lookup, so the core refers to its plugins by name only and never imports
them itself."""

from __future__ import annotations

import importlib
from contextlib import contextmanager
from typing import Callable, Generic, Iterator, TypeVar

from bench.core.config import suggest
from bench.core.errors import BenchError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects of one kind.

    `base` is checked on registration: a class must subclass it, anything else must be
    callable. Duplicate names are errors; an unknown name is an error listing the known
    names and the closest one. `plugins`: modules (or packages, whose `__init__` imports
    their modules) imported before the first lookup.
    """

    def __init__(self, kind: str, base: type | None = None, plugins: tuple[str, ...] = ()):
        self.kind = kind
        self.base = base
        self.plugins = plugins
        self._items: dict[str, T] = {}
        self._loaded = not plugins

    def register(self, name: str | None = None) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            key = name or getattr(obj, "__name__")
            if self.base is not None and not (isinstance(obj, type) and issubclass(obj, self.base)):
                raise TypeError(f"{self.kind} {key!r} must be a subclass of {self.base.__name__}")
            if self.base is None and not callable(obj):
                raise TypeError(f"{self.kind} {key!r} must be callable")
            if key in self._items:
                raise ValueError(f"duplicate {self.kind} name {key!r}: already registered by {self._items[key]!r}")
            self._items[key] = obj
            if isinstance(obj, type):
                obj.name = key  # type: ignore[attr-defined]
            return obj

        return decorator

    def load(self) -> "Registry[T]":
        """Import the plugin modules (once) so that every entry is registered; returns self."""
        if not self._loaded:
            self._loaded = True
            for module in self.plugins:
                importlib.import_module(module)
        return self

    def get(self, name: str) -> T:
        self.load()
        try:
            return self._items[name]
        except KeyError:
            raise BenchError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        known = self.names()
        return f"unknown {self.kind} {name!r}.{suggest(name, known)} Known {self.kind}s: {', '.join(known)}"

    def names(self) -> list[str]:
        self.load()
        return sorted(self._items)

    @contextmanager
    def temporary(self) -> Iterator["Registry[T]"]:
        """Entries registered inside the block are removed when it ends (for tests and experiments)."""
        self.load()
        before = dict(self._items)
        try:
            yield self
        finally:
            self._items.clear()
            self._items.update(before)

    def __contains__(self, name: object) -> bool:
        self.load()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self.load()
        return len(self._items)
