"""Adversarial weight perturbation (Wu, Xia & Wang, NeurIPS 2020), on PGD-AT or TRADES."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.adversary.training import TRADES_INIT_STD, pgd_at_adversary, trades_adversary, trades_loss
from bench.core.config import require, require_choice
from bench.core.defense import Defense, register_defense
from bench.core.schedules import paper_epoch

BASES = ("pgd_at", "trades")
# (γ, start_fraction) per base: the authors' CIFAR-10 L∞ runs (see `AWP`)
BASE_DEFAULTS = {"pgd_at": (1e-2, 0.0), "trades": (5e-3, 9 / 200)}
DIV_EPS = 1e-20  # the authors' guard against a zero gradient norm


@register_defense("awp")
class AWP(Defense):
    """Wu et al. 2020, Sec. 4 and Algorithm 1: min_w max_{‖v_l‖ ≤ γ‖w_l‖} ρ(w + v), ρ the
    adversarial loss of the base method (PGD-AT: CE(f(x'), y); TRADES: CE(f(x), y) + β·KL(f(x) ‖ f(x'))).
    Per step: craft x' as the base method does; one ascent step on the weights gives, for every weight
    tensor l, v_l = γ·‖w_l‖·g_l/‖g_l‖, g_l = ∇_{w_l} ρ(w) (one normalized step, so the proxy learning
    rate cancels); the loss ρ(w + v) is returned, the trainer steps the optimizer from w + v, and
    `on_step_end` subtracts v again: w ← w + v − η∇ρ(w + v) − v.

    Defaults: 10 PGD steps of ε/4 (the authors' code for both bases: 2/255 at 8/255), TRADES β = 6.
    The weights perturbed are those with two or more dimensions (conv kernels and linear matrices);
    biases and normalization parameters are not (the authors' `diff_in_weights`).

    γ and the warm-up follow, per base, the runs behind the published CIFAR-10 L∞ numbers (the paper,
    Sec. 5, says γ = 5e-3 and gives no warm-up; the released code and logs differ for AT-AWP):
    - pgd_at: γ = 1e-2 and no warm-up, the AT_AWP code's defaults (`--awp-gamma 0.01`,
      `--awp-warmup 0`) and what its logs record for the CIFAR-10 L∞ WRN-34-10 and PRN-18 runs
      (`awp_size=0.01, awp_warmup=0`).
    - trades: γ = 5e-3 and AWP from the code's 1-based epoch 10 of 200 (`--awp-warmup 10` tested as
      `epoch >= 10` with epochs counted from 1): 9 warm-up epochs, `start_fraction` = 9/200.
    Left unset (None), `gamma` and `start_fraction` take these values for the chosen base; the
    config records the resolved values, so spelling out a default does not change a run's identity.

    Choices where the paper is silent or the code differs:
    - Warm-up: plain base training while the run's epoch stands for a paper time before
      `start_fraction` of training (`bench.core.schedules.paper_epoch`: epoch e of E is active once
      (e − ½)/E ≥ start_fraction), AWP from then on; at E = 200 and 9/200, epochs 1-9 warm up and
      AWP starts at epoch 10, as the TRADES-AWP code. A model still at chance may not
      leave it under AWP (small_cnn on digits at ε = 0.2 from scratch stays at 10% with AWP from epoch
      1, and trains with `start_fraction` = 0.3): short budgets may need a longer warm-up.
    - The authors compute g on a proxy copy of the model so that BatchNorm statistics are untouched;
      here g comes from the model itself (so the pass is counted) and its buffers are restored after.
    - x' and ρ are the bases' own (`bench.adversary.training`: `pgd_at_adversary`; `trades_adversary` with TRADES'
      start x + 0.001·N(0, I), `trades_loss`), so modes are as the bases' code: PGD-AT attacks
      in train mode, TRADES in eval mode; g and the loss in train mode.
    """

    revision = 2  # 2: γ and warm-up per base (AT-AWP: 1e-2, none; TRADES-AWP: 5e-3, 9 of 200 epochs)

    @dataclass(frozen=True)
    class Config:
        base: str = "pgd_at"
        gamma: float | None = None  # None: the base's (BASE_DEFAULTS)
        start_fraction: float | None = None  # None: the base's (BASE_DEFAULTS)
        steps: int = 10
        step_ratio: float = 0.25  # step size / ε
        beta: float = 6.0  # TRADES only

        def __post_init__(self):
            require_choice(self.base, BASES, "base")
            gamma, start_fraction = BASE_DEFAULTS[self.base]
            if self.gamma is None:
                object.__setattr__(self, "gamma", gamma)
            if self.start_fraction is None:
                object.__setattr__(self, "start_fraction", start_fraction)
            require(self, at_least_one=("steps",), positive=("step_ratio",),
                         non_negative=("gamma", "start_fraction", "beta"))

    def __init__(self, **params):
        super().__init__(**params)
        self.perturbation: list[tuple[torch.Tensor, torch.Tensor]] = []

    def active(self, epoch: int, epochs: int) -> bool:
        """Whether the weights are perturbed in the 1-based `epoch` of `epochs`."""
        return paper_epoch(epoch, epochs, 1.0) >= self.config.start_fraction

    def adversarial_example(self, model, x, y, ctx) -> torch.Tensor:
        c, eps, norm = self.config, ctx.threat.eps, ctx.threat.norm
        if c.base == "pgd_at":
            return pgd_at_adversary(model, x, y, eps=eps, norm=norm, steps=c.steps, step_size=c.step_ratio * eps)
        return trades_adversary(model, x, eps=eps, norm=norm, steps=c.steps, step_size=c.step_ratio * eps,
                                init_std=TRADES_INIT_STD)

    def objective(self, model, x, x_adv, y) -> torch.Tensor:
        """ρ: the base method's outer loss."""
        if self.config.base == "pgd_at":
            return F.cross_entropy(model(x_adv), y)
        return trades_loss(model, x, x_adv, y, self.config.beta)

    def weight_perturbation(self, model, x, x_adv, y) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(w_l, v_l) for every weight tensor; the model's buffers are left as they were."""
        weights = [p for p in model.parameters() if p.dim() > 1]
        buffers = [b.clone() for b in model.buffers()]
        grads = torch.autograd.grad(self.objective(model, x, x_adv, y), weights)
        with torch.no_grad():
            for b, saved in zip(model.buffers(), buffers):
                b.copy_(saved)
            return [(w, self.config.gamma * w.norm() / (g.norm() + DIV_EPS) * g) for w, g in zip(weights, grads)]

    def training_step(self, model, x, y, ctx):
        x_adv = self.adversarial_example(model, x, y, ctx)
        if self.active(ctx.epoch, ctx.epochs):
            self.perturbation = self.weight_perturbation(model, x, x_adv, y)
            with torch.no_grad():
                for w, v in self.perturbation:
                    w.add_(v)
        return self.objective(model, x, x_adv, y)

    def on_step_end(self, model, ctx):
        with torch.no_grad():
            for w, v in self.perturbation:
                w.sub_(v)
        self.perturbation = []
