"""SAT-R1: single-step adversarial training with regularizer 1 (Vivek & Babu, "Regularizers for
single-step adversarial training", arXiv:2002.00614, 2020)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.adversary.losses import ce_loss
from bench.adversary.pgd import pgd
from bench.adversary.regularizers import full_precision
from bench.core.config import require
from bench.core.defense import Defense, register_defense
from bench.core.models import eval_mode


@register_defense("sat_r1")
class SATR1(Defense):
    """Eq. (14): L = (1/m) Σᵢ CE(f(x_fgsm^i), y^i) + λ·(1/k) Σ_{j≤k} ‖g(x_fgsm^j) − g(x_ifgsm^j)‖²₂,
    g the logits (pre-softmax), x_fgsm = x + ε·sign ∇ₓCE(x) (Eq. (1)), x_ifgsm = I-FGSM from x with
    steps of ε/steps (Eq. (4)-(5), "α = ε/steps"), both clipped to [0, 1]; L2 threats take
    L2-normalized steps instead of signs.

    Defaults (Sec. 5, "Hyper-parameters"): λ = 0.2 and k = 1 on MNIST and CIFAR-10 (0.05 on their
    ImageNet subset). I-FGSM steps: 7 on CIFAR-10, 40 on MNIST (Table 8, the "(7)" and "(40)" of
    SAT-R1); the authors' code trains with 3 (CIFAR-10) and 10 (MNIST). A MNIST suite sets
    ifgsm_steps = 40 in its [defenses.sat_r1] table.
    As that code: x_fgsm and x_ifgsm are generated in eval mode, the k pairs are the last k samples
    of the (shuffled) batch, and one train-mode forward of [x_fgsm; x_ifgsm] (B + k samples) gives
    both terms; the penalty back-propagates through both logits. That forward and the loss run with
    autocast off (`full_precision`): in bf16 the difference of two nearby logit vectors is largely
    rounding (measured there); the examples are generated under the trainer's autocast.
    """

    revision = 2  # 2: the loss in fp32 under bf16 autocast

    @dataclass(frozen=True)
    class Config:
        lam: float = 0.2  # λ (MNIST and CIFAR-10)
        pairs: int = 1  # k: samples per batch that also get an I-FGSM example
        ifgsm_steps: int = 7  # Table 8 (CIFAR-10); MNIST: 40

        def __post_init__(self):
            require(self, at_least_one=("pairs", "ifgsm_steps"))

    def training_step(self, model, x, y, ctx):
        c, eps, norm = self.config, ctx.threat.eps, ctx.threat.norm
        k = min(c.pairs, len(x))
        with eval_mode(model):
            x_fgsm = pgd(model, x, lambda logits: ce_loss(logits, y), eps=eps, norm=norm, steps=1, step_size=eps)
            x_ifgsm = pgd(model, x[-k:], lambda logits: ce_loss(logits, y[-k:]), eps=eps, norm=norm,
                          steps=c.ifgsm_steps, step_size=eps / c.ifgsm_steps)
        with full_precision(x.device):
            logits = model(torch.cat([x_fgsm, x_ifgsm]))
            fgsm, ifgsm = logits[:len(x)], logits[len(x):]
            return F.cross_entropy(fgsm, y) + c.lam * (fgsm[-k:] - ifgsm).pow(2).sum(1).mean()
