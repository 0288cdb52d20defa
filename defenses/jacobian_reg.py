"""Jacobian regularization, the "zero-step JAC" baseline of ATLAS."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from bench.adversary.regularizers import full_precision, jacobian_norm_sq
from bench.core.config import require
from bench.core.defense import Defense, register_defense


@register_defense("jacobian_reg")
class JacobianReg(Defense):
    """Zero-step JAC (ATLAS paper, Sec. 6 and App. B; Jakubovitz & Giryes 2018, Hoffman et al. 2019):
    CE(f(x), y) + α·‖J(x)‖²_F, J = ∂f/∂x the Jacobian of the logits w.r.t. the pixels (the model
    normalizes inside), ‖J‖²_F by the random-projection estimate with one projection (the ATLAS
    paper, Sec. 5.1: "one backward pass regardless of the total number of classes").

    α = 0.5, the value of App. B for MNIST, CIFAR-10 and CIFAR-100. The penalty is ‖J‖²_F itself,
    as ATLAS Eq. (12) writes it; Hoffman et al.'s reference module returns ½‖J‖²_F (their λ_JR/2),
    so if the ATLAS authors used it their α is twice ours. No adversary, no ε: the threat model
    only matters for validation. The step runs with autocast off (`full_precision`): a double
    backward in fp32 under the trainer's bf16 autocast.
    """

    revision = 2  # 2: fp32 under bf16 autocast
    double_backward = True  # the Jacobian penalty (jacobian_norm_sq, create_graph)

    @dataclass(frozen=True)
    class Config:
        alpha: float = 0.5
        projections: int = 1

        def __post_init__(self):
            require(self, at_least_one=("projections",))

    def training_step(self, model, x, y, ctx):
        with full_precision(x.device):
            x = x.clone().requires_grad_(True)
            logits = model(x)
            penalty = jacobian_norm_sq(logits, x, self.config.projections).mean()
            return F.cross_entropy(logits, y) + self.config.alpha * penalty
