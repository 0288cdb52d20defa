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
from bench.core.threat import check_eps, check_norm

MODEL_FORMAT = "atbench-model"
STATE_FORMAT = "atbench-train-state"
FORMAT_VERSION = 1


def atomic_save(obj: dict, path: str | Path) -> None:
    """Write via a temporary file and rename, so an interruption never leaves a torn file; a
    failed write (disk full, read-only folder) removes the temporary file and is a BenchError,
    the previous file intact."""
    path = Path(path)
    _write_atomically(path, lambda tmp: torch.save(obj, tmp))


def atomic_copy(src: str | Path, dst: str | Path) -> None:
    _write_atomically(Path(dst), lambda tmp: shutil.copyfile(src, tmp))


def _write_atomically(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as a RuntimeError
        tmp.unlink(missing_ok=True)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0][:160]
        raise BenchError(f"cannot write {str(path)!r}: {reason}; the previous file, if any, is unchanged") from None


def check_writable(folder: str | Path) -> None:
    """BenchError unless files can be created in `folder` (created if missing), before any work."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise BenchError(f"cannot write checkpoints into {str(folder)!r}: {exc.strerror or exc}") from None


def stored_path(path: str | Path, checkpoint_root: str | Path) -> str:
    """How the store records a checkpoint's location: relative to the checkpoint root when it lies
    under it (so workers on other hosts, with the root mounted elsewhere, find it), else as given."""
    resolved, root = Path(path).resolve(), Path(checkpoint_root).resolve()
    return resolved.relative_to(root).as_posix() if resolved.is_relative_to(root) else str(path)


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
    """Rebuild the model from a model checkpoint; returns (model in eval mode, metadata).

    The metadata is validated, and the model is first built on the meta device (no memory) and
    its parameter names and shapes compared with the weights the file holds, so a crafted spec
    cannot make it allocate more than the file itself; the weights are then assigned, not copied.
    Non-finite weights are refused."""
    obj = safe_load(path, MODEL_FORMAT)
    meta = {k: v for k, v in obj.items() if k != "state_dict"}
    _check_metadata(path, meta)
    state = obj.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BenchError(f"checkpoint {str(path)!r} has no state_dict of tensors")
    try:
        with torch.device("meta"):
            model = build_model_from_spec(meta["model_spec"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise BenchError(f"checkpoint {str(path)!r} has a model spec that builds no model: "
                         f"{str(exc).splitlines()[0][:200]}") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    present = {k: tuple(v.shape) for k, v in state.items()}
    if expected != present:
        missing, extra = sorted(set(expected) - set(present)), sorted(set(present) - set(expected))
        shapes = [k for k in set(expected) & set(present) if expected[k] != present[k]]
        raise BenchError(f"checkpoint {str(path)!r} does not match its model spec: "
                         + "; ".join(part for part in (f"missing {missing[:3]}" if missing else "",
                                                       f"unexpected {extra[:3]}" if extra else "",
                                                       f"shape of {shapes[0]}: spec {expected[shapes[0]]}, file "
                                                       f"{present[shapes[0]]}" if shapes else "") if part))
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise BenchError(f"checkpoint {str(path)!r} has non-finite weights ({', '.join(bad[:3])}"
                         f"{', ...' if len(bad) > 3 else ''}): it cannot be evaluated")
    model.load_state_dict(state, assign=True)
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        raise BenchError(f"checkpoint {str(path)!r}: the model has state its file does not hold")
    return model.eval(), meta


def _check_metadata(path, meta: dict) -> None:
    """One-line BenchError naming the first metadata field of the wrong type."""
    types = {"model_spec": dict, "dataset": str, "dataset_options": dict, "norm": str, "eps": (int, float),
             "epoch": (int, type(None))}
    for key, kind in types.items():
        if key not in meta or not isinstance(meta[key], kind) or isinstance(meta[key], bool):
            raise BenchError(f"checkpoint {str(path)!r} has bad metadata: {key} = {meta.get(key)!r} "
                             f"(expected {kind.__name__ if isinstance(kind, type) else ' or '.join(k.__name__ for k in kind)})")
    check_norm(meta["norm"])
    check_eps(meta["eps"], meta["norm"])


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
