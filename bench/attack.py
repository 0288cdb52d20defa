"""Attack base class and registry. Attacks live in the `attacks` package, one file each."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
import torch.nn as nn

from bench.config import build_config
from bench.registry import Registry
from bench.threat import ThreatModel, check_eps, check_norm


class Attack:
    """An attack: `attack(model, x, y) -> x_adv` with x in [0, 1].

    Subclasses define `Config`, a frozen dataclass whose defaults are the paper's (it must
    have `norm` and `eps` fields), and `perturb`. The model is in eval mode when called.
    `implementation` says whose code runs (ours or a library, with its version).
    """

    Config: ClassVar[type]
    implementation: ClassVar[str] = "atbench"
    name: ClassVar[str]

    def __init__(self, **params):
        self.config = build_config(self.Config, params, f"attack {self.name!r}")
        check_norm(self.config.norm)
        check_eps(self.config.eps, self.config.norm)

    @property
    def threat(self) -> ThreatModel:
        return ThreatModel(self.config.norm, self.config.eps)

    def params(self) -> dict:
        return dataclasses.asdict(self.config)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.perturb(model, x, y)

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


ATTACKS: Registry[type[Attack]] = Registry("attack", base=Attack)
register_attack = ATTACKS.register


def load_attacks() -> Registry[type[Attack]]:
    """Import the `attacks` package so every attack registers itself."""
    import attacks  # noqa: F401

    return ATTACKS
