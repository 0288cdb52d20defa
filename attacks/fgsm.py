"""Fast Gradient Sign Method (Goodfellow et al., ICLR 2015)."""

from __future__ import annotations

from dataclasses import dataclass

from bench.adversary.ball import ascent_step, project
from bench.adversary.losses import ce_loss
from bench.adversary.pgd import input_gradient
from bench.core.attack import Attack, register_attack


@register_attack("fgsm")
class FGSM(Attack):
    """One step of size eps along the sign of the cross-entropy gradient (Linf), or along the
    L2-normalized gradient (L2, the "fast gradient method"). No random start. Default Linf 8/255."""

    single_step = True

    @dataclass(frozen=True)
    class Config:
        norm: str = "Linf"
        eps: float = 8 / 255

    def perturb(self, model, x, y):
        c = self.config
        grad = input_gradient(model, x, lambda logits: ce_loss(logits, y))
        return project(ascent_step(x, grad, c.norm, c.eps), x, c.norm, c.eps).detach()
