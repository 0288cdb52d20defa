"""What an evaluation evaluates: a `Subject`, a model in eval mode with its identity in the store
and the dataset and threat model it is evaluated at. Either an atbench checkpoint file
(`Subject.from_checkpoint`) or any `nn.Module` taking [0, 1] pixels (`Subject.external`): a model
defined outside the project, trained elsewhere.

The store keys checkpoints by a sha256. A checkpoint file's is the sha256 of the file. An external
model's is the sha256 of its given name and its state dict (each tensor's name, dtype, shape and
bytes, in name order): the same weights under the same name are one checkpoint in the store,
whichever file or process they came from; other weights, or another name, are another. The name
stands for the code (the weights do not say what computes with them), so give different models
different names. Such a checkpoint has no run; its row records the name and where it came from.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from bench.core.data import Dataset
from bench.core.errors import BenchError
from bench.core.threat import ThreatModel
from bench.engine.checkpoint import load_model, sha256_file


@dataclass
class Subject:
    """`model` (eval mode), `sha256` (its checkpoint's key in the store), `path` (where it was last
    seen: a file, or "python:NAME" for a module handed over in Python), the `dataset` (with its
    `dataset_options`) and `threat` it is evaluated on, the registered `architecture` and its
    parameters that runs trained on demand (a transfer surrogate) default to ("" for an external
    model: such a run must name one), and `info`, recorded with the checkpoint (its name, source)."""

    model: nn.Module
    sha256: str
    path: str
    dataset: str
    dataset_options: dict
    threat: ThreatModel
    architecture: str = ""
    architecture_params: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> "Subject":
        """An atbench model checkpoint (`best.pt`, `last.pt`, a planted one), safely loaded."""
        model, meta = load_model(path)
        spec = meta["model_spec"]
        return cls(model, sha256_file(path), str(path), meta["dataset"], meta.get("dataset_options", {}),
                   ThreatModel(meta["norm"], meta["eps"]), spec["name"], spec.get("kwargs", {}),
                   info={"architecture": spec["name"]})

    @classmethod
    def external(cls, model: nn.Module, name: str, data: Dataset, threat: ThreatModel, *, path: str | None = None,
                 info: dict | None = None) -> "Subject":
        """A model defined outside the project, identified by `name` and its weights (see the module
        docstring); `path` is where its weights were read (default "python:NAME")."""
        if not isinstance(model, nn.Module):
            raise BenchError(f"the model to evaluate must be a torch.nn.Module, got {type(model).__name__}")
        if not name or not isinstance(name, str):
            raise BenchError(f"an external model needs a name (a non-empty string), got {name!r}")
        model.eval()
        return cls(model, identity(model, name), path or f"python:{name}", data.name, dict(data.options), threat,
                   info={"name": name, **(info or {})})


def identity(model: nn.Module, name: str) -> str:
    """sha256 of `name` and the model's state dict (names, dtypes, shapes and bytes, in name order)."""
    h = hashlib.sha256(b"atbench external model\0" + name.encode() + b"\0")
    for key, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
