"""Random noise in the eps ball: the yardstick of the sanity check "random noise is weaker than
gradient attacks" (Carlini et al. 2019, "On Evaluating Adversarial Robustness", checklist)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bench.adversary.ball import l2_norm, per_sample
from bench.core.attack import Attack, register_attack
from bench.core.config import require


def uniform_in_ball(x: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """A point drawn uniformly from the eps ball around each x, clipped to [0, 1] (clipping only
    moves a coordinate towards x, so the point stays in the ball). Linf: uniform in the cube; L2:
    a Gaussian direction at radius eps·U^(1/d), d = C·H·W (uniform in the ball's volume)."""
    if norm == "Linf":
        delta = torch.empty_like(x).uniform_(-eps, eps)
    else:
        direction = torch.randn_like(x)
        u = per_sample(torch.rand(x.shape[0], device=x.device, dtype=x.dtype), x)
        delta = direction / l2_norm(direction) * eps * u ** (1.0 / x[0].numel())
    return (x + delta).clamp(0, 1)


@register_attack("noise")
class Noise(Attack):
    """Uniform random points in the eps ball, `draws` per sample; returns, per sample, the first
    draw that is misclassified, or the last draw. A sample stops drawing once fooled.

    Default: 100 draws (our choice; no paper fixes it). 100 draws find a fooling region that
    covers 3% of the ball with probability 1 − 0.97^100 = 95% and cost 100 forward passes per
    sample, about what PGD-50 costs, so "noise is weaker than PGD" compares similar budgets.
    """

    kind = "noise"

    @dataclass(frozen=True)
    class Config:
        norm: str = "Linf"
        eps: float = 8 / 255
        draws: int = 100

        def __post_init__(self):
            require(self, at_least_one=("draws",))


    @torch.no_grad()
    def perturb(self, model, x, y):
        c = self.config
        x_adv = x.detach().clone()
        active = torch.arange(len(x), device=x.device)
        for _ in range(c.draws):
            candidate = uniform_in_ball(x[active], c.norm, c.eps)
            logits = model(candidate)
            self.observe(logits, y[active], index=active)
            x_adv[active] = candidate
            active = active[logits.argmax(1) == y[active]]
            if len(active) == 0:
                break
        return x_adv
