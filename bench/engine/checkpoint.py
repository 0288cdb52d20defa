"""Checkpoint files: atomic writes, sha256, and safe loading (`torch.load(weights_only=True)`,
so a checkpoint can never run code).

Two formats, both plain dicts of tensors, numbers and strings:
- model checkpoint (`best.pt`, `last.pt`): what evaluation reads; rebuilds the model from its spec;
- train state (`state.pt`): model, optimizer and defense state, log and counters for resume.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import torch
import torch.nn as nn

from bench.core.errors import BenchError
from bench.core.models import build_model_from_spec
from bench.core.planted import PLANTS

MODEL_FORMAT = "atbench-model"
STATE_FORMAT = "atbench-train-state"
FORMAT_VERSION = 1


def atomic_save(obj: dict, path: str | Path) -> None:
    """Write via a temporary file and rename, so an interruption never leaves a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_copy(src: str | Path, dst: str | Path) -> None:
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def torch_file(path: str | Path, what: str = "checkpoint"):
    """The object in a file written by `torch.save`, loaded without executing code
    (`weights_only=True`); any problem is a one-line BenchError naming the file as `what`."""
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"{what} {str(path)!r} does not exist")
    if not zipfile.is_zipfile(path):
        raise BenchError(f"{what} {str(path)!r} is corrupted or not a PyTorch file (torch.save writes a zip archive)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if "Unsupported" in line or "WeightsUnpickler" in line]
        reason = lines[0] if lines else exc.__class__.__name__
        raise BenchError(f"refusing to load {str(path)!r}: it holds Python objects that safe loading "
                         f"(weights_only=True) will not run ({reason[:200]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise BenchError(f"{what} {str(path)!r} is corrupted or not a PyTorch file "
                         f"({exc.__class__.__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})") from None


def safe_load(path: str | Path, expected_format: str) -> dict:
    """Load an atbench checkpoint without executing code; any problem is a one-line BenchError."""
    obj = torch_file(path)
    if not isinstance(obj, dict) or obj.get("format") != expected_format:
        raise BenchError(f"{str(path)!r} is not an atbench {expected_format.split('-', 1)[1]} file "
                         f"(expected a dict with format={expected_format!r})")
    if obj.get("version") != FORMAT_VERSION:
        raise BenchError(f"{str(path)!r} has format version {obj.get('version')!r}; this atbench reads {FORMAT_VERSION}")
    return obj


def model_checkpoint(model: nn.Module, *, run_id: str | None, epoch: int, dataset: str, dataset_options: dict,
                     norm: str, eps: float) -> dict:
    return {"format": MODEL_FORMAT, "version": FORMAT_VERSION, "model_spec": model.spec,
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "run_id": run_id, "epoch": epoch, "dataset": dataset, "dataset_options": dataset_options,
            "norm": norm, "eps": eps}


def load_model(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild the model from a model checkpoint; returns (model in eval mode, metadata)."""
    obj = safe_load(path, MODEL_FORMAT)
    try:
        model = build_model_from_spec(obj["model_spec"])
        model.load_state_dict(obj["state_dict"])
    except (KeyError, TypeError, RuntimeError) as exc:
        raise BenchError(f"checkpoint {str(path)!r} does not match its model spec: {str(exc).splitlines()[0][:200]}") from None
    meta = {k: v for k, v in obj.items() if k != "state_dict"}
    return model.eval(), meta


def plant(checkpoint: str | Path, kind: str, out: str | Path) -> Path:
    """Write `out`: the model of `checkpoint` wrapped by the plant `kind`, same weights and metadata."""
    if kind not in PLANTS:
        raise BenchError(f"unknown plant {kind!r}; accepted: {', '.join(PLANTS)}")
    obj = safe_load(checkpoint, MODEL_FORMAT)
    spec = obj["model_spec"]
    if spec["name"] == "planted":
        raise BenchError(f"{str(checkpoint)!r} is already planted")
    new_spec = {**spec, "name": "planted", "kwargs": {"plant": kind, "base": spec["name"],
                                                      "base_params": spec.get("kwargs", {})}}
    state = {(f"net.inner.{k[4:]}" if k.startswith("net.") else k): v for k, v in obj["state_dict"].items()}
    model = build_model_from_spec(new_spec)
    model.load_state_dict(state)  # checks that every weight found its place
    atomic_save({**obj, "format": MODEL_FORMAT, "version": FORMAT_VERSION, "model_spec": model.spec,
                 "state_dict": state, "planted": kind}, out)
    return Path(out)
