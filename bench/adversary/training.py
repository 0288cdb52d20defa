"""Inner maximizations and outer losses of adversarial training that several defenses share
(PGD-AT and TRADES, reused by AWP; TRADES' KL term, reused by ATLAS and others)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.adversary.ball import gaussian_start, random_start
from bench.adversary.losses import ce_loss, kl_per_sample
from bench.adversary.pgd import pgd
from bench.core.models import eval_mode

TRADES_INIT_STD = 0.001  # the start x + 0.001·N(0, I) of the TRADES authors' code


def pgd_at_adversary(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str, steps: int,
                     step_size: float) -> torch.Tensor:
    """Madry et al.'s adversary: `steps` PGD steps on the cross-entropy from a uniform random start
    in the ε ball, with the model in whatever mode the caller left it (train mode for PGD-AT)."""
    return pgd(model, x, lambda logits: ce_loss(logits, y), eps=eps, norm=norm, steps=steps,
               step_size=step_size, x_init=random_start(x, norm, eps))


def trades_adversary(model: nn.Module, x: torch.Tensor, *, eps: float, norm: str, steps: int, step_size: float,
                     init_std: float) -> torch.Tensor:
    """TRADES' inner maximization (Zhang et al. 2019, Algorithm 1, the authors' code): in eval mode,
    with p(x) fixed (computed once without grad), `steps` PGD steps on KL(p(x) ‖ p(x')) from
    x + init_std·N(0, I). Restores the model's mode."""
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
