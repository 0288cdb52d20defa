"""Hyper-parameter dataclasses built from user input (CLI, suites) with clear errors.

One validation style for every config (defenses, attacks, checks, training, suites): a frozen
dataclass whose `__post_init__` calls `require` / `require_choice`, which raise a `BenchError`
naming the field, the value and what is accepted (with a did-you-mean for names); `build_config`
builds it from user input, type-checks each value and prefixes the owner ("attack 'pgd'")."""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import types
import typing
from typing import Any

from bench.core.errors import BenchError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as the tomli package (a dependency there)
    import tomli as tomllib


def build_config(cls: type, params: dict[str, Any], owner: str):
    """Instantiate dataclass `cls` from `params`; unknown keys and wrong types are BenchErrors.

    `owner` names what the parameters belong to, e.g. "defense 'trades'".
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in params.items():
        if key not in fields:
            raise BenchError(f"unknown parameter {key!r} for {owner}.{suggest(key, fields)} "
                             f"Accepted: {', '.join(fields) or 'none'}")
        values[key] = _coerce(value, hints[key], f"{owner} parameter {key!r}")
    try:
        return cls(**values)
    except (BenchError, TypeError, ValueError) as exc:
        raise BenchError(f"bad parameters for {owner}: {exc}") from None


def suggest(name: str, known) -> str:
    """" Did you mean 'x'?" for the known name closest to `name`, or "" when none is close."""
    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def require_choice(value, accepted, what: str):
    """`value` when it is one of `accepted`, else a BenchError listing them (with a did-you-mean)."""
    if value not in accepted:
        raise BenchError(f"unknown {what} {value!r}.{suggest(value, accepted)} Accepted: "
                         f"{', '.join(map(str, accepted))}")
    return value


def require(config, *, at_least_one: tuple[str, ...] = (), positive: tuple[str, ...] = (),
            non_negative: tuple[str, ...] = (), fraction: tuple[str, ...] = ()) -> None:
    """BenchError naming every field of the dataclass `config` that is not >= 1 (`at_least_one`),
    > 0 (`positive`), >= 0 (`non_negative`) or in [0, 1] (`fraction`); None values are skipped
    (optional fields), and so is a tuple's check applied to each of its items."""
    rules = [(at_least_one, lambda v: v >= 1, ">= 1"), (positive, lambda v: v > 0, "> 0"),
             (non_negative, lambda v: v >= 0, ">= 0"), (fraction, lambda v: 0 <= v <= 1, "in [0, 1]")]
    bad = []
    for names, ok, text in rules:
        for name in names:
            value = getattr(config, name)
            items = value if isinstance(value, (tuple, list)) else (value,)
            if any(v is not None and not ok(v) for v in items):
                bad.append(f"{name} must be {text}, got {value!r}")
    if bad:
        raise BenchError("; ".join(bad))


def _coerce(value: Any, hint: Any, what: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], what) if len(inner) == 1 else value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise BenchError(f"{what} must be a list, got {value!r}")
        inner = args[0] if args else Any
        return origin(_coerce(v, inner, what) for v in value)
    if hint is float:
        return parse_number(value, what)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise BenchError(f"{what} must be an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise BenchError(f"{what} must be true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise BenchError(f"{what} must be a string, got {value!r}")
        return value
    return value


def resolve_params(func, params: dict[str, Any], skip: tuple[str, ...], owner: str) -> dict[str, Any]:
    """The keyword arguments `func` would get, defaults filled in and tuples as lists, so that
    spelling out a default does not change a config's identity. Unknown names, and values of the
    wrong type for an annotated parameter, are BenchErrors."""
    if not isinstance(params, dict):
        raise BenchError(f"parameters of {owner} must be a table of name = value, got {params!r}")
    signature = inspect.signature(func).parameters
    accepted = [name for name, p in signature.items()
                if name not in skip and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise BenchError(f"unknown parameter(s) {', '.join(map(repr, unknown))} for {owner}."
                         f"{suggest(unknown[0], accepted)} Accepted: {', '.join(accepted) or 'none'}")
    hints = typing.get_type_hints(func)
    out = {name: signature[name].default for name in accepted if signature[name].default is not inspect.Parameter.empty}
    out.update({key: _coerce(value, hints.get(key, Any), f"{owner} parameter {key!r}") for key, value in params.items()})
    return {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(out.items())}


def parse_number(value: Any, what: str) -> float:
    """A finite number, or a fraction string such as "8/255"."""
    number = None
    if isinstance(value, str):
        num, sep, den = value.partition("/")
        try:
            number = float(num) / float(den) if sep else float(num)
        except (ValueError, ZeroDivisionError):
            pass
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    if number is not None and math.isfinite(number):
        return number
    raise BenchError(f"{what} must be a number or a fraction like \"8/255\", got {value!r}")


def parse_assignments(items: list[str] | None) -> dict[str, Any]:
    """Parse CLI `key=value` pairs; values are read as TOML scalars (numbers, booleans, strings)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise BenchError(f"expected key=value, got {item!r}")
        try:
            out[key.strip()] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = raw
    return out
