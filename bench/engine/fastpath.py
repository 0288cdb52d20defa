"""How the engine runs on a device: the options that make it fast without changing what it
computes (`FastPath`), including the float32 precision policy. None of them is part of a run's or
an evaluation's identity (like the device, they move at most the last bits of a float); every one
is recorded in the provenance of what it ran (`record`).

Defaults (`FastPath.default`): on CUDA, TF32, channels_last, cudnn.benchmark, one host-device sync
every `CUDA_SYNC_EVERY` training steps and background checkpoint writes; on the CPU none of them,
so CPU results stay bit-identical to the plain loop. `torch.compile` is off unless asked for and is
never used for a defense that back-propagates through an input gradient (`Defense.double_backward`:
TGCL, ATLAS, JAC): compiled graphs do not support double backward. CUDA graphs are not used: their
gain was never measured (docs/performance.md).
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn

from bench.core.config import build_config, require, require_choice
from bench.core.errors import BenchError

PRECISIONS = ("fp32", "tf32")  # float32 convolutions and matmuls: IEEE fp32, or TF32 tensor cores (CUDA)
CUDA_SYNC_EVERY = 50
CUDA_DEFAULTS = {"precision": "tf32", "channels_last": True, "cudnn_benchmark": True, "sync_every": CUDA_SYNC_EVERY,
                 "background_checkpoints": True}


@dataclass(frozen=True)
class FastPath:
    """The options, each off here (the CPU default); `default(device)` gives a device's."""

    precision: str = "fp32"           # attacks and fp32 training math: "fp32" (IEEE) or "tf32" (CUDA only)
    channels_last: bool = False       # the model's weights and activations NHWC (inputs stay NCHW)
    cudnn_benchmark: bool = False     # cuDNN times its kernels once per shape and keeps the fastest
    sync_every: int = 1               # training: steps between host-device syncs (the loss finiteness check)
    compile: bool = False             # training: torch.compile the model (never for double-backward defenses)
    background_checkpoints: bool = False  # training: write checkpoints while the next epoch trains

    def __post_init__(self):
        require_choice(self.precision, PRECISIONS, "precision")
        require(self, at_least_one=("sync_every",))

    @classmethod
    def default(cls, device: torch.device | str, overrides: dict | None = None) -> "FastPath":
        """The device's defaults with `overrides` (e.g. from `--fast KEY=VALUE`); TF32 needs CUDA."""
        device = torch.device(device)
        fast = build_config(cls, {**(CUDA_DEFAULTS if device.type == "cuda" else {}), **(overrides or {})}, "--fast")
        if fast.precision == "tf32" and device.type != "cuda":
            raise BenchError(f"--fast precision=tf32 needs a CUDA device (TF32 is a GPU tensor-core format); "
                             f"this runs on {device}")
        return fast

    def record(self) -> dict:
        return dataclasses.asdict(self)

    @contextmanager
    def backends(self, device: torch.device):
        """The block runs with this precision and cudnn.benchmark on `device` (process-wide
        settings of torch); the previous settings are restored after it."""
        if torch.device(device).type != "cuda":
            yield
            return
        old = _flags()
        _set_precision(self.precision)
        torch.backends.cudnn.benchmark = self.cudnn_benchmark
        try:
            yield
        finally:
            _restore(old)

    def prepare(self, model: nn.Module, *, double_backward: bool = False,
                log=lambda message: None) -> nn.Module:
        """`model` with channels_last weights and, when asked and possible, compiled in place (its
        state_dict keys, hooks and identity unchanged)."""
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        if self.compile:
            if double_backward:
                log("  torch.compile off: this defense back-propagates through an input gradient (double "
                    "backward), which compiled graphs do not support")
            else:
                model.compile()
        return model


def effective(fast: FastPath, double_backward: bool) -> FastPath:
    """What actually runs for a defense (compile off for a double-backward one): the record."""
    return dataclasses.replace(fast, compile=fast.compile and not double_backward)


_NEW_API = hasattr(torch.backends.cuda.matmul, "fp32_precision")  # torch >= 2.9


def _flags() -> tuple:
    if _NEW_API:
        return (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision,
                torch.backends.cudnn.benchmark)
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark


def _restore(flags: tuple) -> None:
    if _NEW_API:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = flags[:2]
    else:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags[:2]
    torch.backends.cudnn.benchmark = flags[2]


def _set_precision(policy: str) -> None:
    """Convolutions and matmuls in TF32 or in IEEE fp32 (torch's default is TF32 convolutions and
    IEEE matmuls; a policy makes both explicit and equal)."""
    tf32 = policy == "tf32"
    if _NEW_API:
        torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "tf32" if tf32 else "ieee"
    else:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
