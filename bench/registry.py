"""One generic registry for defenses, attacks, models and datasets (lm-evaluation-harness style)."""

from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

from bench.errors import BenchError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects of one kind.

    `base` is checked on registration: a class must subclass it, anything else must be
    callable. Duplicate names are errors; an unknown name is an error listing the known
    names and the closest one.
    """

    def __init__(self, kind: str, base: type | None = None):
        self.kind = kind
        self.base = base
        self._items: dict[str, T] = {}

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

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise BenchError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        known = sorted(self._items)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return f"unknown {self.kind} {name!r}.{hint} Known {self.kind}s: {', '.join(known)}"

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
