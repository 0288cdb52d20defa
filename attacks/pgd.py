"""Projected gradient descent (Madry et al., ICLR 2018), Linf and L2, with the cross-entropy or
the C&W margin loss (Carlini & Wagner 2017), random start and restarts. The loop itself is the
adversary library's (`bench.adversary.pgd`), shared with the defenses and the curves."""

from __future__ import annotations

from dataclasses import dataclass

from bench.adversary.ball import default_step_size
from bench.adversary.losses import LOSSES
from bench.adversary.pgd import pgd_with_restarts
from bench.core.attack import Attack, register_attack
from bench.core.config import require, require_choice


@register_attack("pgd")
class PGD(Attack):
    """PGD (Madry et al. 2018). Suites use it as PGD-20, PGD-100 (cross-entropy) and PGD-CW
    (`loss = "cw"`, the C&W margin loss as in TRADES/MART's "CW∞").

    Defaults: Linf 8/255, 20 steps, step 2.5·eps/steps, uniform random start, 1 restart.
    Restarts keep, per sample, the first restart whose end point is misclassified; a restart after
    the first attacks only the samples not fooled yet (as AutoAttack's APGD restarts).
    """

    revision = 2  # 2: restarts after the first only on the samples not fooled yet (other random draws)
    iterative = True

    @dataclass(frozen=True)
    class Config:
        norm: str = "Linf"
        eps: float = 8 / 255
        steps: int = 20
        step_size: float | None = None
        random_start: bool = True
        restarts: int = 1
        loss: str = "ce"

        def __post_init__(self):
            require_choice(self.loss, LOSSES, "loss")
            require(self, at_least_one=("steps", "restarts"), positive=("step_size",))

    @property
    def step_size(self) -> float:
        c = self.config
        return c.step_size if c.step_size is not None else default_step_size(c.eps, c.steps)

    def perturb(self, model, x, y):
        c = self.config
        return pgd_with_restarts(model, x, y, LOSSES[c.loss], eps=c.eps, norm=c.norm, steps=c.steps,
                                 step_size=self.step_size, uniform_start=c.random_start, restarts=c.restarts,
                                 observe=lambda logits, losses, index: self.observe(
                                     logits, y if index is None else y[index], losses, index=index))
