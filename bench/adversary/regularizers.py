"""Input-gradient regularizers that defenses add to their losses (double backpropagation)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def jacobian_norm_sq(logits: torch.Tensor, x: torch.Tensor, projections: int = 1) -> torch.Tensor:
    """Per-sample unbiased estimate of ‖∂f(x)/∂x‖²_F (Hoffman, Roberts & Yaida 2019, Alg. 1): for v
    drawn uniformly on the unit sphere of R^C, E[C·‖vᵀJ‖²] = ‖J‖²_F; averaged over `projections`
    draws, one backward pass each. `logits` = f(x) must be computed from `x` with `x.requires_grad`.
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
