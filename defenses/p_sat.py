"""P-SAT: probability-based smooth adversarial training (Sitawarin, Chakraborty & Wagner, AISec 2021)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attacks.pgd import ascent_step, ce_loss, input_gradient, margin_loss, project, random_start
from bench.defense import Defense, register_defense
from bench.models import eval_mode
from defenses.sat_schedule import check_schedule, curriculum_lambda


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
    Then CE(f(x'), y) in train mode. With λ ≥ 1 the constraint never binds: PGD-AT.

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

    def training_step(self, model, x, y, ctx):
        c, eps, norm = self.config, ctx.threat.eps, ctx.threat.norm
        lam = curriculum_lambda(c, ctx)
        with eval_mode(model):
            x_adv = random_start(x, norm, eps)
            active = torch.arange(len(x), device=x.device)
            for _ in range(c.steps):
                xa, ya, gap = x_adv[active], y[active], []
                grad = input_gradient(model, xa, lambda logits: ce_loss(logits, ya),
                                      lambda logits, _: gap.append(probability_gap(logits.detach(), ya)))
                keep = gap[0] <= lam
                active = active[keep]
                x_adv[active] = project(ascent_step(xa[keep], grad[keep], norm, c.step_ratio * eps),
                                        x[active], norm, eps)
                if len(active) == 0:
                    break
        return F.cross_entropy(model(x_adv), y)
