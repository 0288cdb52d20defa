"""Expectation over Transformation: the answer to randomness at inference."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.core.check import CheckResult
from bench.core.config import require
from bench.core.remedy import ATTACK_FAILURES, Remedy, apgd_pair, register_remedy
from bench.core.rng import fork_rng


def gradient_draws(model: nn.Module, x: torch.Tensor, y: torch.Tensor, draws: int) -> torch.Tensor:
    """`draws` cross-entropy input gradients of a randomized model at x, shape (draws, N, d)."""
    out = []
    for _ in range(draws):
        z = x.detach().requires_grad_(True)
        with torch.enable_grad():
            grad, = torch.autograd.grad(F.cross_entropy(model(z), y, reduction="sum"), z)
        out.append(grad.flatten(1))
    return torch.stack(out)


def draws_needed(grads: torch.Tensor, rel_variance: float) -> torch.Tensor:
    """Per sample, the smallest k for which the average of k gradient draws has a variance (summed
    over coordinates) of at most `rel_variance` times the squared norm of the expected gradient:
    k = ⌈tr Σ / (rel_variance · ‖E g‖²)⌉, with tr Σ the unbiased variance of `grads` (draws, N, d)
    and ‖E g‖² its unbiased estimate ‖ḡ‖² − tr Σ / m. Infinite where the expected gradient is not
    distinguishable from zero."""
    m = grads.shape[0]
    variance = grads.var(0, unbiased=True).sum(1)
    signal = grads.mean(0).pow(2).sum(1) - variance / m
    k = torch.ceil(variance / (rel_variance * signal.clamp_min(0)))
    return torch.where(signal > 0, k.clamp_min(1), torch.full_like(k, math.inf))


@register_remedy("eot")
class EOT(Remedy):
    """Expectation over Transformation (Athalye, Engstrom, Ilyas & Kwok 2018; Athalye et al. 2018,
    §4.3; Tramèr et al. 2020, §5.8): the gradient of a randomized model averaged over k forward
    passes, in APGD-CE and APGD-DLR (AutoAttack's `rand` version, Croce & Hein 2020). k is
    measured: `draws` gradient draws at the clean points of the first `probe_samples` samples give
    each sample's smallest k whose average has a variance of at most `rel_variance` × ‖E ∇‖²
    (`draws_needed`: a relative error of about √0.1 ≈ 0.3 at the default); k is their median,
    between 1 and `max_k` (20, AutoAttack's `eot_iter`). Applies when `deterministic_outputs` flagged
    the model. It answers that check when the chosen k meets the variance target for the median
    sample (k below `max_k`): the model stays random, but its expectation is what is attacked.
    Defaults: APGD's 100 steps, 1 restart."""

    title = "EOT"
    paper = "Athalye et al. 2018 §4.3; Croce & Hein 2020 (AutoAttack rand)"
    answers = ("deterministic_outputs",) + ATTACK_FAILURES
    order = 2

    @dataclass(frozen=True)
    class Config:
        steps: int = 100
        restarts: int = 1
        draws: int = 16
        probe_samples: int = 64
        rel_variance: float = 0.1
        max_k: int = 20

        def __post_init__(self):
            require(self, at_least_one=("steps", "restarts", "probe_samples", "max_k"), positive=("rel_variance",))
            if self.draws < 2:
                raise ValueError(f"draws must be >= 2 (a variance needs two), got {self.draws}")

    def applies(self, ctx):
        flag = ctx.flags.get("deterministic_outputs")
        return None if flag is not None and flag.status in ("fail", "warn") else "the model's outputs are deterministic"

    def needed(self, ctx) -> torch.Tensor:
        """Each probed sample's `draws_needed` (measured once per checkpoint, seeded)."""
        c = self.config
        key = ("eot_needed", c.draws, c.probe_samples, c.rel_variance)
        if key not in ctx.cache:
            with fork_rng(ctx.device):
                torch.manual_seed(ctx.seed)
                grads = gradient_draws(ctx.model, ctx.x[:c.probe_samples], ctx.y[:c.probe_samples], c.draws)
            ctx.cache[key] = draws_needed(grads, c.rel_variance)
        return ctx.cache[key]

    def k(self, ctx) -> int:
        """The number of passes each gradient averages: the median sample's need, in [1, max_k]."""
        return int(min(max(self.needed(ctx).median().item(), 1), self.config.max_k))

    def recheck(self, check, ctx):
        if check != "deterministic_outputs":
            return None
        needed, k = self.needed(ctx), self.k(ctx)
        median, met = needed.median().item(), (needed <= k).float().mean().item()
        return CheckResult("pass" if median <= self.config.max_k else "fail", median, float(self.config.max_k),
                           f"EOT averages k = {k} passes: the median sample needs {median:g} for a gradient variance "
                           f"of at most {self.config.rel_variance:g}·‖E∇‖² ({met:.0%} of {len(needed)} samples are met)",
                           {"k": k, "met": met, "needed": needed.tolist()})

    def attacks(self, ctx):
        c = self.config
        return apgd_pair(ctx, "apgd_dlr", steps=c.steps, restarts=c.restarts, eot_iter=self.k(ctx))
