"""Momentum Iterative FGSM, MI-FGSM (Dong et al., CVPR 2018)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bench.adversary.ball import ascent_step, per_sample, project
from bench.adversary.losses import ce_loss
from bench.adversary.pgd import input_gradient
from bench.core.attack import Attack, register_attack
from bench.core.config import require


@register_attack("mim")
class MIM(Attack):
    """MI-FGSM: g ← μ·g + ∇/‖∇‖₁, x ← Π(x + α·sign(g)) (Dong et al. 2018, Algorithm 1).

    Paper defaults: momentum μ = 1.0, T = 10 iterations, α = eps/T, no random start.
    For L2 the step follows g/‖g‖₂ instead of its sign (the paper's L2 variant).
    """

    iterative = True

    @dataclass(frozen=True)
    class Config:
        norm: str = "Linf"
        eps: float = 8 / 255
        steps: int = 10
        momentum: float = 1.0
        step_size: float | None = None

        def __post_init__(self):
            require(self, at_least_one=("steps",), positive=("step_size",))

    def perturb(self, model, x, y):
        c = self.config
        alpha = c.step_size if c.step_size is not None else c.eps / c.steps
        g = torch.zeros_like(x)
        x_adv = x.detach()
        for _ in range(c.steps):
            grad = input_gradient(model, x_adv, lambda logits: ce_loss(logits, y),
                                  lambda logits, losses: self.observe(logits, y, losses))
            l1 = per_sample(grad.abs().flatten(1).sum(1), grad)
            g = c.momentum * g + grad / torch.where(l1 > 0, l1, torch.ones_like(l1))
            x_adv = project(ascent_step(x_adv, g, c.norm, alpha), x, c.norm, c.eps).detach()
        return x_adv
