"""TRADES (Zhang et al., ICML 2019)."""

from __future__ import annotations

from dataclasses import dataclass

from bench.adversary.training import TRADES_INIT_STD, trades_adversary, trades_loss
from bench.core.config import require
from bench.core.defense import Defense, register_defense


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
        init_std: float = TRADES_INIT_STD

        def __post_init__(self):
            require(self, at_least_one=("steps",), positive=("step_ratio",), non_negative=("beta", "init_std"))

    def training_step(self, model, x, y, ctx):
        c, eps = self.config, ctx.threat.eps
        x_adv = trades_adversary(model, x, eps=eps, norm=ctx.threat.norm, steps=c.steps,
                                 step_size=c.step_ratio * eps, init_std=c.init_std)
        return trades_loss(model, x, x_adv, y, c.beta)
