"""Fast adversarial training: FGSM with a random start (Wong, Rice & Kolter, ICLR 2020)."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from bench.adversary.ball import random_start
from bench.adversary.losses import ce_loss
from bench.adversary.pgd import pgd
from bench.core.config import require
from bench.core.defense import Defense, register_defense


@register_defense("fast_at")
class FastAT(Defense):
    """Wong et al. 2020, Algorithm 3 ("FGSM adversarial training with random initialization"):
    δ ~ U(−ε, ε), one signed step of α = 1.25·ε, projected back to the ε ball and [0, 1],
    then cross-entropy on x + δ only. The paper pairs it with a cyclic LR and mixed precision:
    set `schedule = "cyclic"` and `amp = true` in the training config.
    """

    @dataclass(frozen=True)
    class Config:
        step_ratio: float = 1.25  # α / ε (Wong et al. 2020, Sec. 4: α = 1.25ε)

        def __post_init__(self):
            require(self, positive=("step_ratio",))

    def training_step(self, model, x, y, ctx):
        eps, norm = ctx.threat.eps, ctx.threat.norm
        x_adv = pgd(model, x, lambda logits: ce_loss(logits, y), eps=eps, norm=norm, steps=1,
                    step_size=self.config.step_ratio * eps, x_init=random_start(x, norm, eps))
        return F.cross_entropy(model(x_adv), y)
