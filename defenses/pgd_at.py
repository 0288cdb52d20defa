"""PGD adversarial training (Madry et al., ICLR 2018)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from attacks.pgd import ce_loss, pgd, random_start
from bench.defense import Defense, check_fields, register_defense


def pgd_at_adversary(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str, steps: int,
                     step_size: float) -> torch.Tensor:
    """Madry et al.'s adversary: `steps` PGD steps on the cross-entropy from a uniform random start
    in the ε ball, with the model in whatever mode the caller left it (train mode for PGD-AT)."""
    return pgd(model, x, lambda logits: ce_loss(logits, y), eps=eps, norm=norm, steps=steps,
               step_size=step_size, x_init=random_start(x, norm, eps))


@register_defense("pgd_at")
class PGDAT(Defense):
    """min_θ E max_{‖δ‖≤ε} CE(f(x+δ), y), the inner max by PGD from a uniform random start.

    Defaults: 10 steps of ε/4 (2/255 at ε = 8/255), the CIFAR-10 setting of Rice et al. 2020
    (Madry et al. used 7 steps of 2/255 on CIFAR-10 and 40 steps of 0.01 at ε = 0.3 on MNIST).
    The adversary runs with the model in train mode, as in both papers' code.
    """

    @dataclass(frozen=True)
    class Config:
        steps: int = 10
        step_ratio: float = 0.25  # step size / ε

        def __post_init__(self):
            check_fields(self, at_least_one=("steps",), positive=("step_ratio",))

    def training_step(self, model, x, y, ctx):
        eps = ctx.threat.eps
        x_adv = pgd_at_adversary(model, x, y, eps=eps, norm=ctx.threat.norm, steps=self.config.steps,
                                 step_size=self.config.step_ratio * eps)
        return F.cross_entropy(model(x_adv), y)
