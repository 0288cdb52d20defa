"""Geometry of the threat model's ball in pixel space: per-sample views and norms, projection,
random starts and the ascent step. Every function draws from the global RNG where it is random,
so seed it for determinism.

The update and projection follow torchattacks' PGD/PGDL2 (sign step for Linf, L2-normalized step
for L2, clip to the eps ball then to [0, 1]) up to the L2 rescaling in `ascent_step`.
"""

from __future__ import annotations

import torch

DIV_EPS = 1e-10  # guards divisions by a zero gradient norm (as torchattacks' eps_for_division)
START_GUARD = 1e-12  # the official APGD guard when normalizing its random start


def per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-sample vector v (N,) viewed as (N, 1, 1, ...), to broadcast against `like` (N, ...)."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def l2_norm(v: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norm, shaped to broadcast against NCHW."""
    return per_sample(v.flatten(1).norm(p=2, dim=1), v)


def clip_to_ball(delta: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """Project a perturbation onto the eps ball (not onto the [0, 1] box): clamp (Linf) or
    rescale to length eps when longer (L2)."""
    if norm == "Linf":
        return delta.clamp(-eps, eps)
    return delta * torch.clamp(eps / (l2_norm(delta) + DIV_EPS), max=1.0)


def project(x_adv: torch.Tensor, x: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """Project x_adv onto the eps ball around x, then onto [0, 1]."""
    return (x + clip_to_ball(x_adv - x, norm, eps)).clamp(0, 1)


def random_start(x: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """Linf: uniform in the cube; L2: a uniformly random direction at radius U(0, eps)
    (torchattacks' PGDL2 start)."""
    if norm == "Linf":
        delta = torch.empty_like(x).uniform_(-eps, eps)
    else:
        delta = torch.empty_like(x).normal_()
        r = per_sample(torch.zeros(x.shape[0], device=x.device).uniform_(0, 1), x)
        delta = delta / l2_norm(delta) * r * eps
    return (x + delta).clamp(0, 1)


def sphere_start(x: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """The official APGD random start: Linf x + eps·t/‖t‖∞ with t ~ U[−1, 1] (one pixel at ±eps);
    L2 x + eps·t/‖t‖₂ with t ~ N(0, I) (on the sphere); then clipped to [0, 1]. The official FAB
    draws its restarts the same way, at radius restart_scale·eps."""
    if norm == "Linf":
        t = 2 * torch.rand(x.shape, device=x.device, dtype=x.dtype) - 1
        t = t / (per_sample(t.flatten(1).abs().amax(1), x) + START_GUARD)
    else:
        t = torch.randn(x.shape, device=x.device, dtype=x.dtype)
        t = t / (per_sample(t.flatten(1).norm(p=2, dim=1), x) + START_GUARD)
    return (x + eps * t).clamp(0, 1)


def gaussian_start(x: torch.Tensor, std: float) -> torch.Tensor:
    """x + std·N(0, I), clipped to [0, 1]: the start of TRADES' inner maximization (std 0.001)
    and of the methods built on it."""
    return (x + std * torch.randn_like(x)).clamp(0, 1)


def ascent_step(x_adv: torch.Tensor, grad: torch.Tensor, norm: str, step_size: float) -> torch.Tensor:
    """A signed step (Linf) or a step along the unit-L2 gradient (L2). For L2 the gradient is
    first scaled by its per-sample max, so tiny gradients (1e-20 on confident samples) still
    give a full-length step instead of vanishing next to DIV_EPS."""
    if norm == "Linf":
        return x_adv + step_size * grad.sign()
    scale = per_sample(grad.flatten(1).abs().amax(1), grad)
    grad = grad / torch.where(scale > 0, scale, torch.ones_like(scale))
    return x_adv + step_size * grad / (l2_norm(grad) + DIV_EPS)


def default_step_size(eps: float, steps: int) -> float:
    """2.5·eps/steps: lets an iterate cross the ball and come back (Madry et al. 2018,
    the rule of their `robustness` library)."""
    return 2.5 * eps / max(steps, 1)
