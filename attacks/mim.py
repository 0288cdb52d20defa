"""Momentum Iterative FGSM, MI-FGSM (Dong et al., CVPR 2018)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attacks.pgd import ascent_step, ce_loss, input_gradient, per_sample, project
from bench.attack import Attack, register_attack
from bench.errors import BenchError


@register_attack("mim")
class MIM(Attack):
    """MI-FGSM: g ← μ·g + ∇/‖∇‖₁, x ← Π(x + α·sign(g)) (Dong et al. 2018, Algorithm 1).

    Paper defaults: momentum μ = 1.0, T = 10 iterations, α = eps/T, no random start.
    For L2 the step follows g/‖g‖₂ instead of its sign (the paper's L2 variant).
    """

    @dataclass(frozen=True)
    class Config:
        norm: str = "Linf"
        eps: float = 8 / 255
        steps: int = 10
        momentum: float = 1.0
        step_size: float | None = None

    def __init__(self, **params):
        super().__init__(**params)
        c = self.config
        if c.steps < 1 or (c.step_size is not None and not c.step_size > 0):
            raise BenchError(f"attack 'mim' needs steps >= 1 and step_size > 0, got steps={c.steps}, step_size={c.step_size}")

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
