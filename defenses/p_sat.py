"""P-SAT: probability-based smooth adversarial training (Sitawarin, Chakraborty & Wagner, AISec 2021)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.adversary.ball import random_start
from bench.adversary.losses import ce_loss, margin_loss
from bench.adversary.pgd import pgd_with_stopping
from bench.core.config import require
from bench.core.defense import Defense, register_defense
from bench.core.models import eval_mode
from bench.core.schedules import check_schedule, curriculum_lambda


def probability_gap(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """ψ_P = max_{j≠y} p_j − p_y per sample (Eq. (12)), in [−1, 1]."""
    return margin_loss(F.softmax(logits, dim=1), y)


@register_defense("p_sat")
class PSAT(Defense):
    """Curriculum loss max_{‖δ‖≤ε} CE(f(x + δ), y) s.t. ψ_P(x + δ) ≤ λ (Eq. (10), (12)), solved by
    PGD with per-sample early termination (Sec. 4.4, Algorithm 1): from a uniform random start,
    each of the K steps first computes ψ_P at the current iterate and moves only the samples with
    ψ_P ≤ λ; a sample that violates the constraint keeps its iterate and, as nothing moves it again,
    is frozen. Frozen samples get no more forward or backward passes, so the cost per sample is
    1 + (steps it took part in) forward/backward passes: data dependent, at most that of PGD-AT.
    Then CE(f(x'), y) in train mode. With λ ≥ 1 the constraint never binds: PGD-AT's loss with the
    adversary in eval mode (`pgd_at` attacks in train mode).

    Defaults (CIFAR-10, App. A): PGD-10 with step 2/255 at ε = 8/255 (step_ratio = step/ε, so other
    ε keep the proportion), linear λ from 0 at epoch 30 to 1 at epoch 70 of 100 (App. A, Fig. 5b);
    λ is set per epoch, the schedule scaled to the run's budget (`curriculum_lambda`).
    The paper's step schedules (λ += 1/3 three times) are schedule = "step" with
    schedule_epochs = [0, 40, 60, 80] (PreAct ResNet-20) or [0, 30, 40, 50] (WRN-34-10) and
    schedule_values = [0, 0.3333, 0.6667, 1]. MNIST (70 epochs): steps = 40, step_ratio = 0.02/0.3,
    paper_epochs = 70, schedule = "step", schedule_epochs = [0, 30, 45, 60]; a suite sets these as
    keys of its [defenses.p_sat] table.

    Choices where the paper is silent: the adversary runs in eval mode and takes signed (Linf) or
    L2-normalized steps, as the authors' ATES code (`adv_model.PGDModel`); ψ_P is read from the
    same forward pass that gives the step's gradient; the iterate that first violates the
    constraint is kept (the step that crossed λ is not undone), as Algorithm 1 and that code.

    Augmentation: App. A trains with "random crop, flip, scaling, and brightness jitter"; the
    harness gives every defense its dataset's augmentation (CIFAR-10: random crop after 4-pixel
    padding and horizontal flip), so that defenses differ only in their method. The scaling and
    brightness jitter (whose ranges the paper does not give) are left out: expect the paper's clean
    accuracy to differ somewhat.
    """

    @dataclass(frozen=True)
    class Config:
        steps: int = 10
        step_ratio: float = 0.25  # step size / ε: 2/255 at 8/255 (App. A)
        schedule: str = "linear"
        schedule_epochs: tuple[float, ...] = (30.0, 70.0)  # knots in the paper's epochs
        schedule_values: tuple[float, ...] = (0.0, 1.0)  # λ at the knots
        paper_epochs: int = 100  # the budget the knots refer to (CIFAR; MNIST: 70)

        def __post_init__(self):
            check_schedule(self)
            require(self, at_least_one=("steps",), positive=("step_ratio",))

    def training_step(self, model, x, y, ctx):
        c, eps, norm = self.config, ctx.threat.eps, ctx.threat.norm
        lam = curriculum_lambda(c, ctx)
        with eval_mode(model):
            x_adv = pgd_with_stopping(model, x, y, ce_loss,
                                      lambda logits, grad, x_k, x_0, y_k: probability_gap(logits, y_k) <= lam,
                                      eps=eps, norm=norm, steps=c.steps, step_size=c.step_ratio * eps,
                                      x_init=random_start(x, norm, eps))
        return F.cross_entropy(model(x_adv), y)
