"""Carlini & Wagner (S&P 2017): the L2 optimization attack with a binary search over its constant
c (`cw_l2`), and the L∞ "C&W" of the TRADES/MART evaluations, PGD on the C&W margin loss
(`cw_linf`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attacks.pgd import PGD
from bench.attack import Attack, register_attack
from bench.errors import BenchError

TANH_SHRINK = 1 - 1e-6  # atanh of (2x − 1)·shrink is finite at x = 0 and 1 (Carlini's arctanh(x·1.999999))
NO_BOUND = 1e10  # Carlini's "no upper bound on c yet"


@register_attack("cw_linf")
class CWLinf(PGD):
    """CW∞: PGD maximizing the C&W margin max_{j≠y} z_j − z_y in the L∞ ball, as TRADES (Zhang et
    al. 2019) and MART (Wang et al. 2020) report it.

    Defaults: 20 steps of size eps/10 from a uniform random start, 1 restart: the PGD-20 of MART's
    evaluation code (YisenWang/MART, `_pgd_whitebox`: 20 steps, step ε/10, random start) and of
    TRADES's (yaodongyu/TRADES, pgd_attack_cifar10.py: 20 steps of 0.003 at ε = 0.031 ≈ ε/10).
    Neither repository ships its CW∞ code; the TRADES-derived `_cw_whitebox` scripts in circulation
    run exactly that PGD-20 on the margin loss. Those clamp the margin at 0 (no gradient once a
    sample is misclassified); ours keeps ascending it, which keeps a fooled point fooled as well.
    L∞ only (the name says so): for L2 use `pgd` with loss = "cw".
    """

    norms = ("Linf",)
    norm_hint = "for L2 use pgd with loss=cw"

    @dataclass(frozen=True)
    class Config:
        norm: str = "Linf"
        eps: float = 8 / 255
        steps: int = 20
        step_size: float | None = None
        random_start: bool = True
        restarts: int = 1
        loss: str = "cw"

    def __init__(self, **params):
        Attack.__init__(self, **params)
        c = self.config
        if c.loss != "cw":
            raise BenchError(f"attack 'cw_linf' uses the C&W margin loss, got loss={c.loss!r}; for cross-entropy use pgd")
        if c.steps < 1 or c.restarts < 1 or (c.step_size is not None and not c.step_size > 0):
            raise BenchError(f"attack 'cw_linf' needs steps >= 1, restarts >= 1 and step_size > 0, got "
                             f"steps={c.steps}, restarts={c.restarts}, step_size={c.step_size}")

    @property
    def step_size(self) -> float:
        c = self.config
        return c.step_size if c.step_size is not None else c.eps / 10


@register_attack("cw_l2")
class CWL2(Attack):
    """The C&W L2 attack (Carlini & Wagner 2017, §V and their nn_robust_attacks/l2_attack.py):
    minimize ‖x' − x‖² + c·max(z_y − max_{j≠y} z_j + κ, 0) over x' = (tanh(w) + 1)/2 with Adam,
    and binary-search c per sample (after a success, c moves halfway to the largest failed c, or
    to 0; after a failure, ×10 until a first success, then halfway to the smallest successful c).
    Each binary step restarts from x with a fresh Adam.

    Defaults are theirs: 9 binary steps, 10,000 iterations, lr 0.01, initial c 1e-3, κ = 0, abort
    early (every 10% of the iterations, stop when the batch loss fell by less than 0.01%); with
    ≥ 10 binary steps the last one uses the upper bound of c. On the trained test model they fool
    all 127 correctly classified test images (median L2 0.50). torchattacks 3.5.1's `CW` defaults
    (c = 1 fixed, no binary search, 50 Adam steps) fool 110: 50 steps of lr 0.01 are too few
    (500 steps: 126; c = 10 or 100 at 50 steps: 115-116), and without the search over c the
    distances are not minimal (median 0.66).

    Minimum-norm: returns, per sample, the adversarial iterate with the smallest L2 distance over
    all binary steps, or x where none was found. Success at an iterate means argmax(z + κ·e_y) ≠ y
    (for κ = 0, misclassified; Carlini's untargeted check subtracts κ instead, a sign slip).
    """

    minimum_norm = True
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

    def __init__(self, **params):
        super().__init__(**params)
        c = self.config
        if c.steps < 1 or c.binary_steps < 1 or not (c.lr > 0 and c.initial_const > 0 and c.confidence >= 0):
            raise BenchError(f"attack 'cw_l2' needs steps >= 1, binary_steps >= 1, lr > 0, initial_const > 0 and "
                             f"confidence >= 0, got steps={c.steps}, binary_steps={c.binary_steps}, lr={c.lr}, "
                             f"initial_const={c.initial_const}, confidence={c.confidence}")

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
        index = torch.arange(n, device=x.device)
        for outer in range(c.binary_steps):
            if c.binary_steps >= 10 and outer == c.binary_steps - 1:
                const = upper.clone()
            w = w0.clone().requires_grad_(True)
            optimizer = torch.optim.Adam([w], lr=c.lr)
            succeeded = torch.zeros(n, dtype=torch.bool, device=x.device)
            previous = float("inf")
            for it in range(c.steps):
                with torch.enable_grad():
                    x_new = (torch.tanh(w) + 1) / 2
                    logits = model(x_new)
                    true_class = F.one_hot(y, logits.shape[1]).bool()
                    real = logits.gather(1, y[:, None]).squeeze(1)
                    other = logits.masked_fill(true_class, float("-inf")).amax(1)
                    loss = ((x_new - x0).flatten(1).pow(2).sum(1) + const * (real - other + c.confidence).clamp(min=0)).sum()
                    w.grad, = torch.autograd.grad(loss, w)
                if c.abort_early and it % max(c.steps // 10, 1) == 0:
                    if loss.item() > previous * 0.9999:
                        break
                    previous = loss.item()
                with torch.no_grad():
                    x_it = x_new.detach()
                    self.observe_in_ball(logits.detach(), y, x_it, x, index)
                    success = (logits.detach() + c.confidence * true_class).argmax(1) != y
                    dist = (x_it - x).flatten(1).norm(dim=1)
                    better = success & (dist < best_dist)
                    best_dist = torch.where(better, dist, best_dist)
                    best[better] = x_it[better]
                    succeeded |= success
                optimizer.step()
            upper = torch.where(succeeded, torch.minimum(upper, const), upper)
            lower = torch.where(succeeded, lower, torch.maximum(lower, const))
            const = torch.where(upper < NO_BOUND / 10, (lower + upper) / 2, torch.where(succeeded, const, const * 10))
        return best
