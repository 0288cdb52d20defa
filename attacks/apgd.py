"""Auto-PGD (Croce & Hein, ICML 2020, "Reliable evaluation of adversarial robustness with an
ensemble of diverse parameter-free attacks"): `apgd_ce`, `apgd_dlr` and the targeted `apgd_t`.

The reference is the official code (github fra31/auto-attack, autoattack/autopgd_base.py); the
iterates follow it operation for operation, so that they agree with torchattacks 3.5.1's APGD /
APGDT (a port of it) given the same random start. Differences, each documented where it occurs:
the random start comes from the global RNG (the official code re-seeds it with its own `seed`),
an L2 step does not shrink for gradients below 1e-12 (see `ascent_step`), the last iterate's
gradient (never used) is not computed, APGD-T takes its targets from the clean logits instead of
one more forward pass per target, and samples never fooled get the highest-loss point instead of x.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, ClassVar

import torch
import torch.nn as nn

from bench.adversary.ball import ascent_step, per_sample, project, sphere_start
from bench.adversary.losses import ce_loss, margin_loss
from bench.adversary.pgd import Observer
from bench.core.attack import Attack, register_attack
from bench.core.config import require
from bench.core.errors import BenchError

MOMENTUM = 0.75  # α of the momentum update (Sec. 3.1); the first step has none (α = 1)
GUARD = 1e-12  # the official code's guard against dividing by zero in the DLR losses


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """DLR(x, y) = −(z_y − max_{i≠y} z_i) / (z_π1 − z_π3) (Sec. 4), z_π sorted decreasingly.
    Needs at least 3 classes."""
    top = logits.topk(3, dim=1).values
    return margin_loss(logits, y) / (top[:, 0] - top[:, 2] + GUARD)


def targeted_dlr_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Targeted DLR = −(z_y − z_t) / (z_π1 − (z_π3 + z_π4)/2) (Sec. 4). Needs at least 4 classes."""
    top = logits.topk(4, dim=1).values
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_t = logits.gather(1, target[:, None]).squeeze(1)
    return -(z_y - z_t) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + GUARD)


def checkpoints(steps: int) -> list[int]:
    """Iterations after which the step size may be halved: w_j = ⌈p_j·N⌉ with p_0 = 0, p_1 = 0.22,
    p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06) (Sec. 3.2), in the official code's integer form
    (first window ⌊0.22·N⌋, shrinking by ⌊0.03·N⌋ down to ⌊0.06·N⌋, each at least 1).
    N = 100 gives 22, 41, 57, 70, 80, 87, 93, 99."""
    window, shrink, least = max(int(0.22 * steps), 1), max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
    out, at = [], window
    while at <= steps:
        out.append(at)
        window = max(window - shrink, least)
        at += window
    return out


def _project(z: torch.Tensor, x: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """Onto the ball, then [0, 1]. Linf clamps z itself (as the official code): a point already
    inside stays bit-exact, where x + (z − x) may round."""
    if norm == "Linf":
        return torch.min(torch.max(z, x - eps), x + eps).clamp(0, 1)
    return project(z, x, norm, eps)


Loss = Callable[[torch.Tensor], torch.Tensor]  # logits -> per-sample loss (labels bound)


def _evaluate(model: nn.Module, x_adv: torch.Tensor, loss_fn: Loss, eot_iter: int, with_grad: bool):
    """(gradient averaged over `eot_iter` draws or None, logits, loss) at x_adv. As in the official
    code, the logits and loss are those of the last draw."""
    if not with_grad:
        with torch.no_grad():
            logits = model(x_adv)
            return None, logits, loss_fn(logits)
    grad = torch.zeros_like(x_adv)
    for _ in range(eot_iter):
        z = x_adv.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(z)
            loss = loss_fn(logits)
            grad += torch.autograd.grad(loss.sum(), z)[0]
    return grad / float(eot_iter), logits.detach(), loss.detach()


def apgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Loss, *, norm: str, eps: float,
         steps: int, rho: float = 0.75, eot_iter: int = 1, observe: Observer | None = None):
    """One run of APGD (Algorithm 1) on every sample of x from the official random start.

    Returns (x_adv, fooled, x_max, loss_max): per sample the last iterate that was misclassified
    (valid where `fooled`), and the iterate of highest loss with that loss. Costs eot_iter·steps + 1
    forward and eot_iter·steps backward passes per sample.
    """
    x = x.detach()
    x_adv = sphere_start(x, norm, eps)
    grad, logits, loss = _evaluate(model, x_adv, loss_fn, eot_iter, True)
    if observe is not None:
        observe(logits, loss)
    fooled = logits.argmax(1) != y
    x_fooled, x_max, loss_max, grad_max = x_adv, x_adv, loss, grad
    step = per_sample(torch.full((len(x),), 2.0 * eps, device=x.device, dtype=x.dtype), x)  # η⁽⁰⁾ = 2ε
    x_prev = x_adv
    schedule, last_check = set(checkpoints(steps)), 0
    # Condition 1 counts f(x⁽ⁱ⁺¹⁾) > f(x⁽ⁱ⁾) over the window. As in the official code (its loss
    # history wraps to an unfilled row), the first iterate is compared with 0, not with f(x⁽⁰⁾).
    increases, loss_prev = torch.zeros_like(loss), torch.zeros_like(loss)
    reduced_at_last = torch.ones_like(fooled)  # the first checkpoint has no previous one to compare
    loss_max_at_last = loss_max
    for i in range(steps):
        a = MOMENTUM if i > 0 else 1.0
        z = _project(ascent_step(x_adv, grad, norm, step), x, norm, eps)
        x_adv, x_prev = _project(x_adv + (z - x_adv) * a + (x_adv - x_prev) * (1 - a), x, norm, eps), x_adv
        new_grad, logits, loss = _evaluate(model, x_adv, loss_fn, eot_iter, i < steps - 1)
        if observe is not None:
            observe(logits, loss)
        wrong = logits.argmax(1) != y
        fooled |= wrong
        x_fooled = torch.where(per_sample(wrong, x), x_adv, x_fooled)
        increases += (loss > loss_prev).to(loss.dtype)
        loss_prev = loss
        better = loss > loss_max
        x_max, loss_max = torch.where(per_sample(better, x), x_adv, x_max), torch.where(better, loss, loss_max)
        if new_grad is None:  # the last iterate: its gradient would never be used
            continue
        grad = new_grad
        grad_max = torch.where(per_sample(better, x), grad, grad_max)
        if i + 1 in schedule:  # halve the step, restart from x_max (Sec. 3.2, conditions 1 and 2)
            window, last_check = i + 1 - last_check, i + 1
            # `<=` as the official code (the paper writes <)
            halve = (increases <= window * rho) | (~reduced_at_last & (loss_max_at_last >= loss_max))
            reduced_at_last, loss_max_at_last = halve, loss_max
            increases = torch.zeros_like(increases)
            h = per_sample(halve, x)
            step = torch.where(h, step / 2, step)
            x_adv, grad = torch.where(h, x_max, x_adv), torch.where(h, grad_max, grad)
    return x_fooled, fooled, x_max, loss_max


class APGD(Attack):
    """APGD (Croce & Hein 2020, Sec. 3, Algorithm 1): PGD with momentum α = 0.75, step size 2ε
    halved at the checkpoints of `checkpoints` when fewer than ρ = 0.75 of the window's steps raised
    the loss or the best loss did not move since the last halving; after a halving it restarts from
    the best point. Linf (sign step) and L2 (step along the unit gradient).

    As the official `perturb`: samples the model already misclassifies are not attacked (returned
    as they are); each restart runs only on samples no earlier restart fooled; a fooled sample gets
    the last misclassified iterate of its run, a sample never fooled the highest-loss point of all
    runs (the official code returns x there, which counts the same). `eot_iter` > 1 averages the
    gradient over that many forward passes (EOT, for randomized defenses; AutoAttack's `rand`).
    Defaults (AutoAttack's): 100 steps, 1 restart, ρ = 0.75, no EOT, Linf 8/255.
    """

    iterative = True
    loss_name: ClassVar[str]
    min_classes: ClassVar[int] = 2

    @dataclass(frozen=True)
    class Config:
        norm: str = "Linf"
        eps: float = 8 / 255
        steps: int = 100
        restarts: int = 1
        rho: float = 0.75
        eot_iter: int = 1

        def __post_init__(self):
            require(self, at_least_one=("steps", "restarts", "eot_iter"), positive=("rho",), fraction=("rho",))

    def losses(self, logits: torch.Tensor, y: torch.Tensor) -> list[Callable[[torch.Tensor], Loss]]:
        """One entry per run series (per target for APGD-T): given the positions of the samples it
        attacks, the loss as a function of their logits."""
        raise NotImplementedError

    def attack_robust(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if logits.shape[1] < self.min_classes:
            raise BenchError(f"attack {self.name!r} needs a model with at least {self.min_classes} classes "
                             f"(the {self.loss_name} loss is undefined below that); this one has {logits.shape[1]}")
        c = self.config
        x, x_adv = x.detach(), x.detach().clone()
        done = logits.argmax(1) != y  # misclassified already, or fooled by an earlier run
        loss_max = torch.full((len(x),), float("-inf"), device=x.device)
        for make_loss in self.losses(logits, y):
            for _ in range(c.restarts):
                idx = (~done).nonzero().squeeze(1)
                if idx.numel() == 0:
                    return x_adv
                index = None if idx.numel() == len(x) else idx
                yi = y[idx]
                x_fooled, fooled, x_max, run_max = apgd(
                    model, x[idx], yi, make_loss(idx), norm=c.norm, eps=c.eps, steps=c.steps, rho=c.rho,
                    eot_iter=c.eot_iter, observe=lambda z, loss: self.observe(z, yi, loss, index=index))
                higher = run_max > loss_max[idx]
                keep = torch.where(per_sample(higher, x_max), x_max, x_adv[idx])
                x_adv[idx] = torch.where(per_sample(fooled, x_fooled), x_fooled, keep)
                loss_max[idx] = torch.maximum(run_max, loss_max[idx])
                done[idx] = fooled
        return x_adv


@register_attack("apgd_ce")
class APGDCE(APGD):
    """APGD on the cross-entropy loss (APGD-CE, the first attack of AutoAttack). See `APGD`."""

    loss_name = "cross-entropy"

    def losses(self, logits, y):
        return [lambda idx: partial(ce_loss, y=y[idx])]


@register_attack("apgd_dlr")
class APGDDLR(APGD):
    """APGD on the Difference of Logits Ratio loss (APGD-DLR, Sec. 4), invariant to shifting and
    rescaling the logits. DLR divides by z_π1 − z_π3: a model with fewer than 3 classes is refused
    (with 2 the ratio is the constant ±1; the official code fails on an index there)."""

    loss_name = "DLR"
    min_classes = 3

    def losses(self, logits, y):
        return [lambda idx: partial(dlr_loss, y=y[idx])]


@register_attack("apgd_t")
class APGDT(APGD):
    """Targeted APGD on the targeted DLR loss (APGD-T, Sec. 4 and 5): one run per target class,
    the 2nd, 3rd, ... most likely classes of the clean point, `n_target_classes` of them (9, as
    AutoAttack's standard version), each on the samples no earlier target fooled.

    Fewer classes: the targets are capped at C − 1 (every wrong class; the official code would
    index past the logits), and a model with fewer than 4 classes is refused, since the loss
    divides by z_π1 − (z_π3 + z_π4)/2 (AutoAttack leaves APGD-T out there, see `autoattack`).
    """

    loss_name = "targeted DLR"
    min_classes = 4

    @dataclass(frozen=True)
    class Config(APGD.Config):
        n_target_classes: int = 9

        def __post_init__(self):
            super().__post_init__()
            require(self, at_least_one=("n_target_classes",))

    def losses(self, logits, y):
        ranked = logits.sort(dim=1).indices  # ascending, as the official code: target k is column −k
        n = min(self.config.n_target_classes, logits.shape[1] - 1)

        def for_target(k):
            return lambda idx: partial(targeted_dlr_loss, y=y[idx], target=ranked[idx, -k])

        return [for_target(k) for k in range(2, n + 2)]
