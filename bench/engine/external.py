"""Models defined outside the project (`bench eval --model pkg.module:factory --weights FILE`,
`atbench.evaluate`, RobustBench's zoo): the factory found by name, weights read without running
code and matched to the model's keys, and a declared input normalization.

Weights: a file written by `torch.save`, read with `weights_only=True` (tensors, numbers, strings
and containers: nothing in it runs). The state dict is the file's dict itself, or the dict under
"state_dict", "model_state_dict" or "model" (common training scripts' layouts). A prefix that every
key carries and the model's keys lack, "module." (torch.nn.DataParallel) or "model." (a wrapper),
is removed; then the names must match exactly, and a mismatch names the first missing and
unexpected keys.

Normalization: atbench feeds pixels in [0, 1] and measures eps there. A model trained on
normalized inputs declares its mean and std and is evaluated as Normalize(mean, std) followed by
the model (`normalized`), so eps stays in pixel units.
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from bench.core.errors import BenchError
from bench.core.models import Normalize
from bench.engine.checkpoint import torch_file

WRAPPERS = ("state_dict", "model_state_dict", "model")
PREFIXES = ("module.", "model.")


def build_factory(spec: str, kwargs: dict | None = None) -> nn.Module:
    """`pkg.module:factory` imported and called with `kwargs`; it must return an nn.Module."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise BenchError(f"--model must name a factory as pkg.module:function (or :Class), got {spec!r}")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise BenchError(f"cannot import {module_name!r} for --model {spec!r}: {exc}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise BenchError(f"{module_name!r} has no {attr!r} (--model {spec!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise BenchError(f"--model {spec!r} is not callable")
    try:
        model = obj(**(kwargs or {}))
    except TypeError as exc:
        raise BenchError(f"--model {spec!r} does not accept the arguments {kwargs or {}}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise BenchError(f"--model {spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def state_dict(obj, path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in what a weights file holds: the dict itself or one of its `WRAPPERS`."""
    def is_state(d) -> bool:
        return isinstance(d, dict) and bool(d) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                       for k, v in d.items())

    if is_state(obj):
        return dict(obj)
    for key in WRAPPERS:
        if isinstance(obj, dict) and is_state(obj.get(key)):
            return dict(obj[key])
    keys = f" (its keys: {', '.join(map(str, list(obj)[:6]))})" if isinstance(obj, dict) else ""
    raise BenchError(f"{str(path)!r} holds no state dict: expected a dict of tensors, or one under "
                     f"{', '.join(map(repr, WRAPPERS))}{keys}")


def match_keys(state: dict[str, torch.Tensor], expected: Sequence[str]) -> dict[str, torch.Tensor]:
    """`state` with a prefix of `PREFIXES` removed where every key has it and the model's keys do not."""
    for prefix in PREFIXES:
        if set(state) != set(expected) and all(k.startswith(prefix) for k in state) and \
                not all(k.startswith(prefix) for k in expected):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load the weights file `path` into `model` (see the module docstring); returns the model."""
    state = match_keys(state_dict(torch_file(path, "weights file"), path), list(model.state_dict()))
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise BenchError(f"the weights in {str(path)!r} do not fit the model: missing {_few(missing)}, "
                         f"unexpected {_few(unexpected)}")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        detail = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc)[:200])
        raise BenchError(f"the weights in {str(path)!r} do not fit the model: {detail}") from None
    return model


def _few(keys: list[str]) -> str:
    return "none" if not keys else ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def normalized(model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> nn.Module:
    """Normalize(mean, std) then `model`: the model evaluated on [0, 1] pixels."""
    if any(s <= 0 for s in std):
        raise BenchError(f"normalization std must be > 0, got {list(std)}")
    return nn.Sequential(OrderedDict(normalize=Normalize(mean, std), model=model))


def parse_normalize(text: str, channels: int) -> tuple[list[float], list[float]]:
    """`--normalize MEAN,STD`: two numbers (every channel), or `channels` means then `channels` stds."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) == 2:
        return [values[0]] * channels, [values[1]] * channels
    if len(values) == 2 * channels and channels > 1:
        return values[:channels], values[channels:]
    raise BenchError(f"--normalize takes MEAN,STD (two numbers) or {channels} means then {channels} stds, "
                     f"comma-separated, got {text!r}")
