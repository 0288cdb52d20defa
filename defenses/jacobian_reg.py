"""Jacobian regularization, the "zero-step JAC" baseline of ATLAS, and the random-projection
estimate of ‖J‖²_F (Hoffman, Roberts & Yaida 2019) that `atlas` reuses."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.defense import Defense, register_defense
from bench.errors import BenchError


def jacobian_norm_sq(logits: torch.Tensor, x: torch.Tensor, projections: int = 1) -> torch.Tensor:
    """Per-sample unbiased estimate of ‖∂f(x)/∂x‖²_F (Hoffman et al. 2019, Alg. 1): for v drawn
    uniformly on the unit sphere of R^C, E[C·‖vᵀJ‖²] = ‖J‖²_F; averaged over `projections` draws,
    one backward pass each. `logits` = f(x) must be computed from `x` with `x.requires_grad`.
    The graph is kept (create_graph), so the estimate is differentiable in the parameters
    (double backpropagation). Uses the global RNG. With BatchNorm in train mode the samples of a
    batch are coupled and vᵀJ also holds cross-sample terms (as in Hoffman et al.'s code)."""
    num_classes = logits.shape[1]
    total = logits.new_zeros(logits.shape[0])
    for _ in range(projections):
        v = F.normalize(torch.randn_like(logits), dim=1)
        vjp, = torch.autograd.grad(logits, x, grad_outputs=v, create_graph=True)
        total = total + vjp.flatten(1).pow(2).sum(1)
    return num_classes * total / projections


@register_defense("jacobian_reg")
class JacobianReg(Defense):
    """Zero-step JAC (ATLAS paper, Sec. 6 and App. B; Jakubovitz & Giryes 2018, Hoffman et al. 2019):
    CE(f(x), y) + α·‖J(x)‖²_F, J = ∂f/∂x the Jacobian of the logits w.r.t. the pixels (the model
    normalizes inside), ‖J‖²_F by the random-projection estimate with one projection (the ATLAS
    paper, Sec. 5.1: "one backward pass regardless of the total number of classes").

    α = 0.5, the value of App. B for MNIST, CIFAR-10 and CIFAR-100. The penalty is ‖J‖²_F itself,
    as ATLAS Eq. (12) writes it; Hoffman et al.'s reference module returns ½‖J‖²_F (their λ_JR/2),
    so if the ATLAS authors used it their α is twice ours. No adversary, no ε: the threat model
    only matters for validation.
    """

    @dataclass(frozen=True)
    class Config:
        alpha: float = 0.5
        projections: int = 1

        def __post_init__(self):
            if self.projections < 1:
                raise BenchError(f"jacobian_reg needs projections >= 1, got {self.projections}")

    def training_step(self, model, x, y, ctx):
        x = x.clone().requires_grad_(True)
        logits = model(x)
        penalty = jacobian_norm_sq(logits, x, self.config.projections).mean()
        return F.cross_entropy(logits, y) + self.config.alpha * penalty
