"""Projected gradient descent (Madry et al., ICLR 2018), Linf and L2, with the
cross-entropy or the C&W margin loss (Carlini & Wagner 2017), random start and restarts.

The helpers here (losses, projection, random start, ascent step) are the building blocks
of every gradient attack in this package and of the defenses' inner maximization.
The update and projection follow torchattacks' PGD/PGDL2 exactly (sign step for Linf,
L2-normalized step for L2, clip to the eps ball then to [0, 1]), so the two agree given
the same start.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.attack import Attack, register_attack
from bench.errors import BenchError

DIV_EPS = 1e-10  # guards divisions by a zero gradient norm (as torchattacks' eps_for_division)


def ce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy."""
    return F.cross_entropy(logits, y, reduction="none")


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample C&W margin max_{j≠y} z_j − z_y (positive once misclassified)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return other - true


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"ce": ce_loss, "cw": margin_loss}


def l2_norm(v: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norm, shaped to broadcast against NCHW."""
    return v.flatten(1).norm(p=2, dim=1).view(-1, *([1] * (v.dim() - 1)))


def project(x_adv: torch.Tensor, x: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """Project x_adv onto the eps ball around x, then onto [0, 1]."""
    delta = x_adv - x
    if norm == "Linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * torch.clamp(eps / (l2_norm(delta) + DIV_EPS), max=1.0)
    return (x + delta).clamp(0, 1)


def random_start(x: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """Linf: uniform in the cube; L2: a uniformly random direction at radius U(0, eps)
    (torchattacks' PGDL2 start). Uses the global RNG, so seed it for determinism."""
    if norm == "Linf":
        delta = torch.empty_like(x).uniform_(-eps, eps)
    else:
        delta = torch.empty_like(x).normal_()
        r = torch.zeros(x.shape[0], *([1] * (x.dim() - 1)), device=x.device).uniform_(0, 1)
        delta = delta / l2_norm(delta) * r * eps
    return (x + delta).clamp(0, 1)


def ascent_step(x_adv: torch.Tensor, grad: torch.Tensor, norm: str, step_size: float) -> torch.Tensor:
    """A signed step (Linf) or a step along the unit-L2 gradient (L2). For L2 the gradient is
    first scaled by its per-sample max, so tiny gradients (1e-20 on confident samples) still
    give a full-length step instead of vanishing next to DIV_EPS."""
    if norm == "Linf":
        return x_adv + step_size * grad.sign()
    scale = grad.flatten(1).abs().amax(1).view(-1, *([1] * (grad.dim() - 1)))
    grad = grad / torch.where(scale > 0, scale, torch.ones_like(scale))
    return x_adv + step_size * grad / (l2_norm(grad) + DIV_EPS)


Observer = Callable[[torch.Tensor, torch.Tensor], None]  # (logits, per-sample loss) at an iterate


def input_gradient(model: nn.Module, x: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor],
                   observe: Observer | None = None) -> torch.Tensor:
    """∇_x of the summed per-sample loss; the model's parameters get no gradient. `observe`, if
    given, sees the logits and per-sample losses at x (no extra forward pass)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        losses = loss_fn(logits)
        if observe is not None:
            observe(logits, losses)
        return torch.autograd.grad(losses.sum(), x)[0]


def pgd(model: nn.Module, x: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor], *, eps: float,
        norm: str, steps: int, step_size: float, x_init: torch.Tensor | None = None,
        observe: Observer | None = None) -> torch.Tensor:
    """Maximize `loss_fn(model(x'))` (per-sample losses from logits) over the eps ball by
    `steps` projected ascent steps from `x_init` (default: x). Returns the last iterate;
    `observe` sees every iterate but the last (see `input_gradient`)."""
    x = x.detach()
    x_adv = (x if x_init is None else x_init).detach()
    for _ in range(steps):
        grad = input_gradient(model, x_adv, loss_fn, observe)
        x_adv = project(ascent_step(x_adv, grad, norm, step_size), x, norm, eps).detach()
    return x_adv


def default_step_size(eps: float, steps: int) -> float:
    """2.5·eps/steps: lets an iterate cross the ball and come back (Madry et al. 2018,
    the rule of their `robustness` library)."""
    return 2.5 * eps / max(steps, 1)


@register_attack("pgd")
class PGD(Attack):
    """PGD (Madry et al. 2018). Suites use it as PGD-20, PGD-100 (cross-entropy) and PGD-CW
    (`loss = "cw"`, the C&W margin loss as in TRADES/MART's "CW∞").

    Defaults: Linf 8/255, 20 steps, step 2.5·eps/steps, uniform random start, 1 restart.
    Restarts keep, per sample, the first restart whose end point is misclassified.
    """

    @dataclass(frozen=True)
    class Config:
        norm: str = "Linf"
        eps: float = 8 / 255
        steps: int = 20
        step_size: float | None = None
        random_start: bool = True
        restarts: int = 1
        loss: str = "ce"

    def __init__(self, **params):
        super().__init__(**params)
        c = self.config
        if c.loss not in LOSSES:
            raise BenchError(f"unknown loss {c.loss!r} for attack 'pgd'; accepted: {', '.join(LOSSES)}")
        if c.steps < 1 or c.restarts < 1:
            raise BenchError(f"attack 'pgd' needs steps >= 1 and restarts >= 1, got steps={c.steps}, restarts={c.restarts}")
        if c.step_size is not None and not c.step_size > 0:
            raise BenchError(f"attack 'pgd' needs step_size > 0, got {c.step_size}")

    @property
    def step_size(self) -> float:
        c = self.config
        return c.step_size if c.step_size is not None else default_step_size(c.eps, c.steps)

    def perturb(self, model, x, y):
        c = self.config
        loss = LOSSES[c.loss]

        def observe(logits, losses):
            self.observe(logits, y, losses)

        if c.restarts == 1:
            start = random_start(x, c.norm, c.eps) if c.random_start else x
            return pgd(model, x, lambda logits: loss(logits, y), eps=c.eps, norm=c.norm, steps=c.steps,
                       step_size=self.step_size, x_init=start, observe=observe)
        best = x.clone()
        fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        for _ in range(c.restarts):
            start = random_start(x, c.norm, c.eps) if c.random_start else x
            x_adv = pgd(model, x, lambda logits: loss(logits, y), eps=c.eps, norm=c.norm, steps=c.steps,
                        step_size=self.step_size, x_init=start, observe=observe)
            with torch.no_grad():
                now_fooled = model(x_adv).argmax(1) != y
            take = ~fooled
            best[take] = x_adv[take]
            fooled |= now_fooled
            if bool(fooled.all()):
                break
        return best
