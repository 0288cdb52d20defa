"""Adversarial logit pairing (Kannan, Kurakin & Goodfellow 2018, arXiv:1803.06373)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.adversary.ball import random_start
from bench.adversary.losses import ce_loss
from bench.adversary.pgd import pgd
from bench.core.config import require
from bench.core.defense import Defense, register_defense
from bench.core.models import eval_mode


@register_defense("alp")
class ALP(Defense):
    """The ALP objective J(M, θ) + λ·(1/m) Σᵢ L(f(xᵢ), f(x̃ᵢ)): J the cross-entropy of the mixed
    minibatch M of m clean examples and their m PGD examples (mixed-minibatch adversarial training),
    L the squared L2 distance of the logits. As the authors' code (tensorflow/models,
    research/adversarial_logit_pairing, train.py): one forward of the concatenated batch [x; x̃]
    (BatchNorm sees the mix), the mean CE over its 2m rows, and λ·mean((f(x) − f(x̃))²) over all
    m·C logits (tf.losses.mean_squared_error); x̃ is generated in eval mode and held constant.

    Defaults: λ = 0.5 (the README's training command and the released Tiny ImageNet model; the
    ImageNet 64×64 one used 0.25). The code's label smoothing 0.1 is a training recipe, not part of
    ALP, and is left out. The adversary has the code's budget `pgd_16_2_10` (10 steps of ε/8 from a
    uniform random start) but is untargeted on the cross-entropy, the harness's threat model and
    the Madry et al. PGD the paper's MNIST experiments build on; the code's ImageNet models were
    trained on least-likely-class targeted PGD.
    """

    @dataclass(frozen=True)
    class Config:
        pairing_weight: float = 0.5  # λ
        steps: int = 10
        step_ratio: float = 0.125  # step size / ε (2/255 at 16/255)

        def __post_init__(self):
            require(self, at_least_one=("steps",), positive=("step_ratio",), non_negative=("pairing_weight",))

    def training_step(self, model, x, y, ctx):
        c, eps, norm = self.config, ctx.threat.eps, ctx.threat.norm
        with eval_mode(model):
            x_adv = pgd(model, x, lambda logits: ce_loss(logits, y), eps=eps, norm=norm, steps=c.steps,
                        step_size=c.step_ratio * eps, x_init=random_start(x, norm, eps))
        logits = model(torch.cat([x, x_adv]))
        clean, adv = logits.chunk(2)
        return F.cross_entropy(logits, y.repeat(2)) + c.pairing_weight * F.mse_loss(clean, adv)
