"""Projected gradient descent (Madry et al., ICLR 2018), Linf and L2, with the
cross-entropy or the C&W margin loss (Carlini & Wagner 2017), random start and restarts.

The helpers here (losses, projection, random start, ascent step) are the building blocks
of every gradient attack in this package and of the defenses' inner maximization.
The update and projection follow torchattacks' PGD/PGDL2 (sign step for Linf,
L2-normalized step for L2, clip to the eps ball then to [0, 1]) up to the L2 rescaling in
`ascent_step`, so the two agree given the same start (for L2, where no per-sample gradient
is tiny enough for that rescaling to matter).
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


def other_classes(logits: torch.Tensor, y: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """Per sample, the classes j ≠ y by decreasing logit (the first `k` of them; default all C − 1),
    shape (N, k): the targets or candidates of attacks that rank the wrong classes."""
    masked = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return masked.topk(logits.shape[1] - 1 if k is None else k, dim=1).indices


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"ce": ce_loss, "cw": margin_loss}


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
    (torchattacks' PGDL2 start). Uses the global RNG, so seed it for determinism."""
    if norm == "Linf":
        delta = torch.empty_like(x).uniform_(-eps, eps)
    else:
        delta = torch.empty_like(x).normal_()
        r = per_sample(torch.zeros(x.shape[0], device=x.device).uniform_(0, 1), x)
        delta = delta / l2_norm(delta) * r * eps
    return (x + delta).clamp(0, 1)


def gaussian_start(x: torch.Tensor, std: float) -> torch.Tensor:
    """x + std·N(0, I), clipped to [0, 1]: the start of TRADES' inner maximization (std 0.001)
    and of the methods built on it. Uses the global RNG."""
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


StopRule = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def pgd_with_stopping(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], going: StopRule, *,
                      eps: float, norm: str, steps: int, step_size: float, x_init: torch.Tensor) -> torch.Tensor:
    """PGD with per-sample early stopping: before each of the `steps` steps every running sample
    is checked at its current iterate, `going(logits, grad, x_adv, x, y) -> bool mask` (logits and
    `loss(logits, y)`'s input gradient there, from the one forward and backward the step needs);
    the samples that pass take the step, the others stop for good at that iterate and are no
    longer forwarded. So a sample costs one forward and backward per check, at most `steps`.
    Returns the iterates (a new tensor; `x_init` is not modified)."""
    x, x_adv = x.detach(), x_init.detach().clone()
    active = torch.arange(len(x), device=x.device)
    for _ in range(steps):
        x_k, x_0, y_k, seen = x_adv[active], x[active], y[active], []
        grad = input_gradient(model, x_k, lambda logits: loss(logits, y_k),
                              lambda logits, _: seen.append(logits.detach()))
        keep = going(seen[0], grad, x_k, x_0, y_k)
        active = active[keep]
        if len(active) == 0:
            break
        x_adv[active] = project(ascent_step(x_k[keep], grad[keep], norm, step_size), x_0[keep], norm, eps)
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
            raise BenchError(f"unknown loss {c.loss!r} for attack {self.name!r}; accepted: {', '.join(LOSSES)}")
        if c.steps < 1 or c.restarts < 1:
            raise BenchError(f"attack {self.name!r} needs steps >= 1 and restarts >= 1, got steps={c.steps}, "
                             f"restarts={c.restarts}")
        if c.step_size is not None and not c.step_size > 0:
            raise BenchError(f"attack {self.name!r} needs step_size > 0, got {c.step_size}")

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
