"""TRADES (Zhang et al., ICML 2019)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from attacks.pgd import gaussian_start, pgd
from bench.defense import Defense, check_fields, register_defense
from bench.models import eval_mode

INIT_STD = 0.001  # the start x + 0.001·N(0, I) of the authors' code

def kl_per_sample(p_log_target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ softmax(logits)) per sample, with log p given."""
    return (p_log_target.exp() * (p_log_target - F.log_softmax(logits, dim=1))).sum(1)


def trades_adversary(model: nn.Module, x: torch.Tensor, *, eps: float, norm: str, steps: int, step_size: float,
                     init_std: float) -> torch.Tensor:
    """TRADES' inner maximization (Algorithm 1, the authors' code): in eval mode, with p(x) fixed
    (computed once without grad), `steps` PGD steps on KL(p(x) ‖ p(x')) from x + init_std·N(0, I).
    Restores the model's mode."""
    with eval_mode(model):
        with torch.no_grad():
            p_log = F.log_softmax(model(x), dim=1)
        return pgd(model, x, lambda logits: kl_per_sample(p_log, logits), eps=eps, norm=norm, steps=steps,
                   step_size=step_size, x_init=gaussian_start(x, init_std))


def trades_loss(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    """TRADES' outer loss CE(f(x), y) + β·mean KL(f(x) ‖ f(x')), gradients through both f(x) and f(x')."""
    logits = model(x)
    robust = kl_per_sample(F.log_softmax(logits, dim=1), model(x_adv)).mean()
    return F.cross_entropy(logits, y) + beta * robust


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
        init_std: float = INIT_STD

        def __post_init__(self):
            check_fields(self, at_least_one=("steps",), positive=("step_ratio",), non_negative=("beta", "init_std"))

    def training_step(self, model, x, y, ctx):
        c, eps = self.config, ctx.threat.eps
        x_adv = trades_adversary(model, x, eps=eps, norm=ctx.threat.norm, steps=c.steps,
                                 step_size=c.step_ratio * eps, init_std=c.init_std)
        return trades_loss(model, x, x_adv, y, c.beta)
