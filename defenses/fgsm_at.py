"""FGSM adversarial training (Goodfellow et al., ICLR 2015; Kurakin et al., ICLR 2017)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.adversary.ball import ascent_step, project
from bench.core.defense import Defense, register_defense


@register_defense("fgsm_at")
class FGSMAT(Defense):
    """Goodfellow et al. 2015, Sec. 6: J̃(x) = α·J(x) + (1−α)·J(x + ε·sign ∇ₓJ(x)), α = 0.5.

    No random start (that is `fast_at`). Kurakin et al. 2017 train on the same mix of clean
    and one-step examples; we use Goodfellow's weighted-loss form with their α. The clean
    forward pass is shared by the clean loss and the FGSM gradient.
    """

    @dataclass(frozen=True)
    class Config:
        alpha: float = 0.5  # weight of the clean loss (Goodfellow et al. 2015, Eq. after (6))

    def training_step(self, model, x, y, ctx):
        eps, norm = ctx.threat.eps, ctx.threat.norm
        x = x.clone().requires_grad_(True)
        clean_loss = F.cross_entropy(model(x), y)
        grad, = torch.autograd.grad(clean_loss, x, retain_graph=True)
        x_adv = project(ascent_step(x.detach(), grad, norm, eps), x.detach(), norm, eps)
        adv_loss = F.cross_entropy(model(x_adv), y)
        return self.config.alpha * clean_loss + (1 - self.config.alpha) * adv_loss
