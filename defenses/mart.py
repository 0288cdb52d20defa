"""MART: misclassification-aware adversarial training (Wang et al., ICLR 2020)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.adversary.ball import gaussian_start
from bench.adversary.losses import ce_loss
from bench.adversary.pgd import pgd
from bench.core.config import require
from bench.core.defense import Defense, register_defense
from bench.core.models import eval_mode


@register_defense("mart")
class MART(Defense):
    """L = BCE(p(x'), y) + β·KL(p(x) ‖ p(x'))·(1 − p_y(x)) (Wang et al. 2020, Eq. (8)),
    BCE = −log p_y(x') − log(1 − max_{k≠y} p_k(x')).

    Paper defaults (CIFAR-10, Sec. 5): β = 5, x' from 10 PGD steps of 0.007 at ε = 8/255
    (step_ratio = 0.007/0.031, as the authors' code) on cross-entropy, start x + 0.001·N(0, I),
    generated in eval mode. The constants 1.0001 and 1e-12 guarding the logs are the code's.
    """

    @dataclass(frozen=True)
    class Config:
        beta: float = 5.0
        steps: int = 10
        step_ratio: float = 0.007 / 0.031
        init_std: float = 0.001

        def __post_init__(self):
            require(self, at_least_one=("steps",), positive=("step_ratio",), non_negative=("beta", "init_std"))

    def training_step(self, model, x, y, ctx):
        c, eps, norm = self.config, ctx.threat.eps, ctx.threat.norm
        with eval_mode(model):
            x_adv = pgd(model, x, lambda logits: ce_loss(logits, y), eps=eps, norm=norm, steps=c.steps,
                        step_size=c.step_ratio * eps, x_init=gaussian_start(x, c.init_std))
        logits, logits_adv = model(x), model(x_adv)
        p_adv = F.softmax(logits_adv, dim=1)
        top2 = p_adv.argsort(dim=1)[:, -2:]
        runner_up = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
        bce = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - p_adv + 1e-12), runner_up)
        p_nat = F.softmax(logits, dim=1)
        kl = (p_nat * (torch.log(p_nat + 1e-12) - torch.log(p_adv + 1e-12))).sum(1)
        p_true = p_nat.gather(1, y[:, None]).squeeze(1)
        return bce + c.beta * (kl * (1.0000001 - p_true)).mean()
