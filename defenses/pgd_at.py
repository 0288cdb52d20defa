"""PGD adversarial training (Madry et al., ICLR 2018)."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from bench.adversary.training import pgd_at_adversary
from bench.core.config import require
from bench.core.defense import Defense, register_defense


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
            require(self, at_least_one=("steps",), positive=("step_ratio",))

    def training_step(self, model, x, y, ctx):
        eps = ctx.threat.eps
        x_adv = pgd_at_adversary(model, x, y, eps=eps, norm=ctx.threat.norm, steps=self.config.steps,
                                 step_size=self.config.step_ratio * eps)
        return F.cross_entropy(model(x_adv), y)
