"""Input-gradient regularizers that defenses add to their losses (double backpropagation), and the
precision such losses run in."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def full_precision(device: torch.device) -> torch.autocast:
    """A context with autocast off: the block runs in the parameters' precision (fp32) even inside
    the trainer's bfloat16 autocast. For losses that back-propagate through an input gradient or
    compare nearly equal quantities, where bf16 rounding can dominate the term: on CPU bf16 autocast
    (PreAct ResNet-18, batch 32), with a teacher whose weights differ from the student's by 0.1%,
    TGCL's L_diff came out at 3.9× its fp32 value and its weight gradient had cosine 0.09 with the
    fp32 one; the logit-pair penalty of SAT-R1/R2 at 2/255 apart, cosine 0.77 (plain CE: 0.97)."""
    return torch.autocast(device.type, enabled=False)


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
