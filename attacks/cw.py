"""Carlini & Wagner (S&P 2017): the L2 optimization attack with a binary search over its constant
c (`cw_l2`), and the L∞ "C&W" of the TRADES/MART evaluations, PGD on the C&W margin loss
(`cw_linf`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.adversary.losses import margin_loss
from bench.adversary.pgd import pgd_with_restarts
from bench.core.attack import Attack, register_attack
from bench.core.config import require
from bench.core.errors import BenchError
from bench.core.threat import perturbation_norms

TANH_SHRINK = 1 - 1e-6  # atanh of (2x − 1)·shrink is finite at x = 0 and 1 (Carlini's arctanh(x·1.999999))
NO_BOUND = 1e10  # Carlini's "no upper bound on c yet"


@register_attack("cw_linf")
class CWLinf(Attack):
    """CW∞: PGD maximizing the C&W margin max_{j≠y} z_j − z_y in the L∞ ball, the "CW∞" that TRADES
    (Zhang et al. 2019) and MART (Wang et al. 2020) report.

    Defaults: 20 steps of size eps/10, 1 restart. The steps and their size follow TRADES's PGD-20
    evaluation (yaodongyu/TRADES, pgd_attack_cifar10.py: 20 steps of 0.003 at ε = 0.031, about
    ε/10); the uniform random start is this project's choice, as for `pgd`. The margin is not
    clamped at 0: ascent goes on after a sample is misclassified, which keeps a fooled point fooled.
    L∞ only (the name says so): for L2 use `pgd` with loss = "cw".
    """

    revision = 2  # 2: restarts after the first only on the samples not fooled yet (bench.adversary.pgd_with_restarts)
    norms = ("Linf",)
    norm_hint = "for L2 use pgd with loss=cw"
    iterative = True

    @dataclass(frozen=True)
    class Config:
        norm: str = "Linf"
        eps: float = 8 / 255
        steps: int = 20
        step_size: float | None = None
        random_start: bool = True
        restarts: int = 1
        loss: str = "cw"

        def __post_init__(self):
            if self.loss != "cw":
                raise BenchError(f"cw_linf uses the C&W margin loss, got loss={self.loss!r}; for cross-entropy use pgd")
            require(self, at_least_one=("steps", "restarts"), positive=("step_size",))

    @property
    def step_size(self) -> float:
        c = self.config
        return c.step_size if c.step_size is not None else c.eps / 10

    def perturb(self, model, x, y):
        c = self.config
        return pgd_with_restarts(model, x, y, margin_loss, eps=c.eps, norm=c.norm, steps=c.steps,
                                 step_size=self.step_size, uniform_start=c.random_start, restarts=c.restarts,
                                 observe=lambda logits, losses, index: self.observe(
                                     logits, y if index is None else y[index], losses, index=index))


@register_attack("cw_l2")
class CWL2(Attack):
    """The C&W L2 attack (Carlini & Wagner 2017, §V and their nn_robust_attacks/l2_attack.py):
    minimize ‖x' − x‖² + c·max(z_y − max_{j≠y} z_j + κ, 0) over x' = (tanh(w) + 1)/2 with Adam,
    and binary-search c per sample (after a success, c moves halfway to the largest failed c, or
    to 0; after a failure, ×10 until a first success, then halfway to the smallest successful c).
    Each binary step restarts from x with a fresh Adam.

    Defaults are theirs: 9 binary steps, 10,000 iterations, lr 0.01, initial c 1e-3, κ = 0, abort
    early (every 10% of the iterations, stop when the loss fell by less than 0.01% since the last
    check); with ≥ 10 binary steps the last one uses the upper bound of c. The abort is decided per
    sample, on its own loss: the reference code decides on the loss summed over its batch, which is
    per sample at its default batch of one, so here a sample's result does not depend on the other
    samples of the batch. A sample that stopped is no longer evaluated in that binary step (Adam is
    elementwise, so the others' updates are unchanged). (torchattacks 3.5.1's `CW` fixes c = 1
    and runs 50 Adam steps, without the search over c.)

    Minimum-norm: returns, per sample, the adversarial iterate with the smallest L2 distance over
    all binary steps, or x where none was found. Success at an iterate means argmax(z + κ·e_y) ≠ y,
    as Carlini's untargeted `compare` (for κ = 0, misclassified).
    """

    revision = 2  # 2: early abort per sample (was: on the batch's summed loss)
    minimum_norm = True
    iterative = True
    norms = ("L2",)
    norm_hint = "for Linf use cw_linf"

    @dataclass(frozen=True)
    class Config:
        norm: str = "L2"
        eps: float = 0.5
        steps: int = 10000
        binary_steps: int = 9
        lr: float = 0.01
        initial_const: float = 1e-3
        confidence: float = 0.0
        abort_early: bool = True

        def __post_init__(self):
            require(self, at_least_one=("steps", "binary_steps"), positive=("lr", "initial_const"),
                    non_negative=("confidence",))

    def perturb(self, model, x, y):
        c = self.config
        x = x.detach()
        n = len(x)
        w0 = torch.atanh((2 * x - 1) * TANH_SHRINK)
        x0 = (torch.tanh(w0) + 1) / 2  # x as tanh space represents it; the distance term is 0 at the start
        lower = torch.zeros(n, device=x.device)
        upper = torch.full((n,), NO_BOUND, device=x.device)
        const = torch.full((n,), c.initial_const, device=x.device)
        best_dist = torch.full((n,), float("inf"), device=x.device)
        best = x.clone()
        for outer in range(c.binary_steps):
            if c.binary_steps >= 10 and outer == c.binary_steps - 1:
                const = upper.clone()
            w = w0.clone().requires_grad_(True)
            optimizer = torch.optim.Adam([w], lr=c.lr)
            succeeded = torch.zeros(n, dtype=torch.bool, device=x.device)
            running = torch.ones(n, dtype=torch.bool, device=x.device)
            previous = torch.full((n,), float("inf"), device=x.device)
            for it in range(c.steps):
                idx = running.nonzero().squeeze(1)
                if len(idx) == 0:
                    break
                with torch.enable_grad():
                    x_new = (torch.tanh(w[idx]) + 1) / 2
                    logits = model(x_new)
                    hinge = (c.confidence - margin_loss(logits, y[idx])).clamp(min=0)  # max(z_y − max_{j≠y} z_j + κ, 0)
                    losses = (x_new - x0[idx]).flatten(1).pow(2).sum(1) + const[idx] * hinge
                    w.grad, = torch.autograd.grad(losses.sum(), w)  # zero on the rows no longer running
                if c.abort_early and it % max(c.steps // 10, 1) == 0:
                    stalled = losses.detach() > previous[idx] * 0.9999
                    previous[idx] = losses.detach()
                    running[idx[stalled]] = False
                    idx, x_new, logits = idx[~stalled], x_new[~stalled], logits[~stalled]
                with torch.no_grad():
                    x_it, yi = x_new.detach(), y[idx]
                    self.observe_in_ball(logits.detach(), yi, x_it, x[idx], idx)
                    true_class = F.one_hot(yi, logits.shape[1]).bool()
                    success = (logits.detach() + c.confidence * true_class).argmax(1) != yi
                    dist = perturbation_norms(x_it, x[idx], "L2")
                    better = success & (dist < best_dist[idx])
                    best_dist[idx[better]] = dist[better]
                    best[idx[better]] = x_it[better]
                    succeeded[idx[success]] = True
                optimizer.step()
            upper = torch.where(succeeded, torch.minimum(upper, const), upper)
            lower = torch.where(succeeded, lower, torch.maximum(lower, const))
            const = torch.where(upper < NO_BOUND / 10, (lower + upper) / 2, torch.where(succeeded, const, const * 10))
        return best
