"""Threat model = (norm, eps) in pixel space [0, 1]."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bench.core.config import parse_number
from bench.core.errors import BenchError

NORMS = ("Linf", "L2")
BALL_TOLERANCE = 1e-5  # float slack when checking that a point lies in its eps ball


@dataclass(frozen=True)
class ThreatModel:
    norm: str
    eps: float

    def __post_init__(self):
        check_norm(self.norm)
        check_eps(self.eps, self.norm)

    def __str__(self) -> str:
        return f"{self.norm} eps={format_eps(self.eps)}"

    def check_for(self, input_shape) -> "ThreatModel":
        """BenchError when eps is implausible for inputs of `input_shape`: an L2 eps above the
        diameter of the pixel cube √d (Linf: 1) lets any image be reached; returns self."""
        top = 1.0 if self.norm == "Linf" else math.sqrt(math.prod(input_shape))
        if self.eps > top:
            raise BenchError(f"eps = {self.eps:g} is out of range for {self.norm} on inputs {tuple(input_shape)}: "
                             f"the ball then covers every image; accepted: 0 to {top:g}")
        return self

    @property
    def key(self) -> str:
        """The exact, canonical text of the threat model ("Linf:0.2", "Linf:0.03137254901960784"):
        what the store keys results by, never a float."""
        return threat_key(self.norm, self.eps)


def threat_key(norm: str, eps: float) -> str:
    """`norm:repr(eps)`: repr is the shortest text that reads back as the same float."""
    return f"{norm}:{float(eps)!r}"


def check_norm(norm: str) -> str:
    if norm not in NORMS:
        raise BenchError(f"unknown norm {norm!r}; accepted norms: {', '.join(NORMS)}")
    return norm


def check_eps(eps: float, norm: str, name: str = "eps") -> float:
    """Linf eps lies in [0, 1] (pixels are in [0, 1]); an L2 eps is any finite value >= 0."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps):
        raise BenchError(f"{name} must be a finite number, got {eps!r}")
    if eps < 0:
        raise BenchError(f"{name} must be >= 0, got {eps}")
    if norm == "Linf" and eps > 1:
        raise BenchError(f"{name} = {eps} is out of range for Linf: pixels lie in [0, 1], so eps must be in [0, 1] (8/255 = {8/255:.4f})")
    return float(eps)


def parse_eps(value, name: str = "eps") -> float:
    """A number, or a fraction string such as "8/255"."""
    return parse_number(value, name)


def format_eps(eps: float) -> str:
    """Short decimals print as they are (0.3); k/255 values with long decimals as 'k/255'."""
    text = f"{eps:g}"
    k = eps * 255
    if len(text) > 5 and 0 < eps < 1 and abs(k - round(k)) < 1e-6:
        return f"{round(k)}/255"
    return text


def perturbation_norms(x_adv: torch.Tensor, x: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-sample distance ‖x_adv − x‖ in `norm`."""
    delta = (x_adv - x).flatten(1)
    return delta.abs().amax(1) if norm == "Linf" else delta.norm(p=2, dim=1)
