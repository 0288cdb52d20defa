"""GAIRAT: geometry-aware instance-reweighted adversarial training (Zhang et al., ICLR 2021)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bench.adversary.ball import random_start
from bench.adversary.losses import ce_loss
from bench.adversary.pgd import pgd
from bench.core.config import require
from bench.core.defense import Defense, register_defense
from bench.core.models import eval_mode
from bench.core.schedules import paper_epoch


def gair_weights(kappa: torch.Tensor, steps: int, lam: float) -> torch.Tensor:
    """ω = (1 + tanh(λ + 5·(1 − 2κ/K)))/2 (Zhang et al. 2021, Eq. (6)), normalized to mean 1 over
    the batch (Σω = B, the authors' `GAIR`). Small κ (close to the boundary) gets large weight."""
    w = (1 + torch.tanh(lam + 5 * (1 - 2 * kappa / steps))) / 2
    return w * len(w) / w.sum()


@register_defense("gairat")
class GAIRAT(Defense):
    """Zhang et al. 2021, Sec. 3, Algorithms 1-2: PGD-K on CE (uniform random start, eval mode) also
    measures the geometry value κ(x, y), the least number of steps that misclassifies x, counted as
    the authors' `GA_PGD` does: the number of iterates x⁰ … x^{K−1} still classified correctly (the
    same unless an iterate crosses back); the loss is the ω-weighted mean CE at x' (ω is constant).

    Defaults (Sec. 4 and the authors' CIFAR-10 WRN code): K = 10 steps of 0.007 at ε = 0.031
    (`step_ratio` = 0.007/0.031), λ = −1 ("fixed" λ schedule), burn-in: plain PGD-AT (uniform ω, the
    code's λ = +∞) for 59 of 120 epochs, reweighting from then on: the code loops over epochs from 0
    and reweights when `(epoch + 1) >= begin_epoch` = 60, i.e. from its 1-based epoch 60
    (`begin_fraction` = 59/120). Under a budget of E epochs the 1-based epoch e reweights once the
    paper time it stands for passes `begin_fraction` of training, (e − ½)/E ≥ begin_fraction
    (`bench.core.schedules.paper_epoch`): at 120 epochs from epoch 60, as the code.
    The code's other λ schedules ("linear", "piecewise") are not its defaults and are not included.
    """

    revision = 2  # 2: reweighting from epoch 60 of 120 (was 61), as the code's `(epoch + 1) >= 60`

    @dataclass(frozen=True)
    class Config:
        steps: int = 10
        step_ratio: float = 0.007 / 0.031  # step size / ε
        lam: float = -1.0  # λ
        begin_fraction: float = 59 / 120

        def __post_init__(self):
            require(self, at_least_one=("steps",), positive=("step_ratio",), non_negative=("begin_fraction",))

    def reweighting(self, epoch: int, epochs: int) -> bool:
        """Whether the 1-based `epoch` of `epochs` is past the burn-in."""
        return paper_epoch(epoch, epochs, 1.0) >= self.config.begin_fraction

    def training_step(self, model, x, y, ctx):
        c, eps, norm = self.config, ctx.threat.eps, ctx.threat.norm
        kappa = torch.zeros(len(x), device=x.device)

        def count_correct(logits, losses):
            kappa.add_(logits.argmax(1) == y)

        with eval_mode(model):
            x_adv = pgd(model, x, lambda logits: ce_loss(logits, y), eps=eps, norm=norm, steps=c.steps,
                        step_size=c.step_ratio * eps, x_init=random_start(x, norm, eps), observe=count_correct)
        losses = ce_loss(model(x_adv), y)
        if not self.reweighting(ctx.epoch, ctx.epochs):
            return losses.mean()
        return (losses * gair_weights(kappa, c.steps, c.lam)).mean()
