"""TRADES (Zhang et al., ICML 2019)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attacks.pgd import pgd
from bench.defense import Defense, register_defense
from bench.models import eval_mode


def kl_per_sample(p_log_target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ softmax(logits)) per sample, with log p given."""
    return (p_log_target.exp() * (p_log_target - F.log_softmax(logits, dim=1))).sum(1)


@register_defense("trades")
class TRADES(Defense):
    """min CE(f(x), y) + β·max_{x'} KL(f(x) ‖ f(x')) (Zhang et al. 2019, Eq. (5), Algorithm 1).

    Paper defaults (CIFAR-10, Sec. 5.3.2): β = 6, 10 PGD steps of 0.007 at ε = 0.031
    (step_ratio = 0.007/0.031), start x + 0.001·N(0, I). The inner maximization runs in
    eval mode with a fixed clean distribution, as the authors' code; the outer KL keeps
    gradients through both terms. MNIST in the paper: 40 steps of 0.01 at ε = 0.3.
    """

    @dataclass(frozen=True)
    class Config:
        beta: float = 6.0
        steps: int = 10
        step_ratio: float = 0.007 / 0.031
        init_std: float = 0.001

    def training_step(self, model, x, y, ctx):
        c, eps, norm = self.config, ctx.threat.eps, ctx.threat.norm
        with eval_mode(model):
            with torch.no_grad():
                p_log = F.log_softmax(model(x), dim=1)
            start = (x + c.init_std * torch.randn_like(x)).clamp(0, 1)
            x_adv = pgd(model, x, lambda logits: kl_per_sample(p_log, logits), eps=eps, norm=norm,
                        steps=c.steps, step_size=c.step_ratio * eps, x_init=start)
        logits = model(x)
        robust = kl_per_sample(F.log_softmax(logits, dim=1), model(x_adv)).mean()
        return F.cross_entropy(logits, y) + c.beta * robust
