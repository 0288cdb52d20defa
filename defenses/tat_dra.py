"""Transfer adversarial training with a dynamically regulated adversary (Hou, Zhou, Musilek, Han
and Li, IJCNN 2022; P. Hou's thesis, chapter 4)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.adversary.ball import default_step_size
from bench.adversary.losses import ce_loss
from bench.adversary.pgd import input_gradient
from bench.core.config import require
from bench.core.defense import Defense, register_defense
from bench.core.models import eval_mode
from bench.core.schedules import paper_epoch


def dra(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, budget: float, p: float, steps: int,
        step_size: float) -> torch.Tensor:
    """Dynamically regulated adversary (our reading of thesis Sec. 4.4.2; see `TATDRA`). Only the
    k = round(p·C·H·W) values with the largest |∇ₓ CE| at x move; each step follows the raw gradient
    on them, scaled to mean magnitude `step_size`; ‖x' − x‖₁ ≤ budget·k; x' in [0, 1]."""
    x = x.detach()
    k = max(1, round(p * x[0].numel()))
    radius = budget * k
    x_adv, mask = x, None
    for _ in range(steps):
        grad = input_gradient(model, x_adv, lambda logits: ce_loss(logits, y)).flatten(1)
        if mask is None:
            mask = torch.zeros_like(grad, dtype=torch.bool).scatter_(1, grad.abs().topk(k, dim=1).indices, True)
        g = torch.where(mask, grad, torch.zeros_like(grad))
        scale = g.abs().amax(1, keepdim=True)  # first to O(1), so tiny gradients still give a full step
        g = g / torch.where(scale > 0, scale, torch.ones_like(scale))
        norm = g.abs().sum(1, keepdim=True)
        delta = (x_adv - x).flatten(1) + step_size * k * g / torch.where(norm > 0, norm, torch.ones_like(norm))
        l1 = delta.abs().sum(1, keepdim=True)
        delta = delta * torch.where(l1 > radius, radius / l1, torch.ones_like(l1))
        x_adv = (x + delta.view_as(x)).clamp(0, 1).detach()
    return x_adv


@register_defense("tat_dra")
class TATDRA(Defense):
    """Transfer AT (thesis Sec. 4.4.1): start from a naturally trained model θ_std and fine-tune all
    its layers on a 1:1 mix of clean and DRA samples, min E[CE(f(x), y) + CE(f(x_dra), y)] / 2
    (a replay of clean data against forgetting); then a few clean-only epochs.

    DRA (Sec. 4.4.2, 4.5.4). The thesis says: DRA follows the loss gradient without sign, perturbs
    only the top-p fraction of the C·H·W values (channels counted apart) ranked by gradient
    magnitude, and bounds the noise with an L1-type "soft" budget instead of an L∞ ball; it does not
    print the algorithm. Our reading (`dra`), T = `steps`:
      k = round(p·C·H·W); M = the top-k of |∇ₓ CE(f(x), y)| at the clean x, fixed for all steps;
      for t = 1..T:  g = M ⊙ ∇ CE(f(x'), y);  δ ← δ + η·k·g/‖g‖₁;
                     δ ← δ·min(1, ε·k/‖δ‖₁);  x' = clip(x + δ, 0, 1),
    generated in eval mode (BN statistics are not fed adversarial batches), no random start, CE loss.
    So the budget ε is a mean |δ| over the k chosen values: ‖δ‖₁ ≤ ε·k = ε·p·C·H·W, the L1 size of
    an L∞-ε corner on those values, but one value may exceed ε (the "unbounded" attack of Sec. 4.1).
    The step η defaults to 2.5·ε/T (Madry's rule; the thesis gives none).

    Relation to the threat model: ε is DRA's own budget, independent of `ctx.threat` (eps and norm),
    which only says how the run is evaluated. In pixel units [0, 1]. We read the thesis' CIFAR budgets
    as /255 (as its PGD eps: "2" = 2/255, said to match PGD at 4–5/255 in Sec. 4.5.2) and MNIST's as
    [0, 1] units (0.1, next to PGD eps 0.1 and 0.3); a whole-image L1 norm of 2 or 0.1 would be
    negligible. The DRA sample may lie outside the threat model's eps ball.

    Defaults (CIFAR-10, Sec. 4.5.1): T = 5, p = 1/3, ε decayed linearly from 2/255 (first epoch) to
    0.5/255 (last adversarial epoch) over 50 epochs, then 10 clean epochs (60 in all). MNIST: T = 20,
    p = 2/3, ε = 0.1 constant for 50 epochs: `steps = 20, p = "2/3", budget_start = 0.1,
    budget_end = 0.1, clean_epochs = 0` in a suite. Other budgets: epoch e (1-based) of E = ctx.epochs
    follows the paper at the paper time t = (e − ½)·60/E it stands for (`bench.core.schedules.paper_epoch`,
    60 = decay_epochs + clean_epochs): adversarial while t < 50, clean after, so the paper's
    proportion (10 of 12 epochs adversarial at E = 12; with the defaults the first epoch always
    is); ε is linear in t from `budget_start` at paper epoch 0 to `budget_end` at paper epoch 49
    (the thesis' first and last adversarial epochs, as `sat_schedule` reads its knots), held after. At E = 60 the last
    adversarial epoch trains at 0.5/255 and the first at 2/255 less half an epoch's decay; short
    budgets see the decay at their epochs' middles, so their first and last adversarial epochs
    stop short of both ends (at E = 12: 1.92/255 … 0.55/255).

    Model selection: the thesis' model is the one at the end of training, after the clean-only
    epochs, i.e. the run's last.pt. The trainer's best.pt is chosen by robust validation accuracy
    (as for every defense) and may be an epoch of the adversarial phase: report last.pt to compare
    with the thesis.

    Natural pre-training: `ctx.pretrained("natural")`, best (clean-validation) checkpoint, copied into
    the model in `setup`. The thesis gives no budget for it, only that it is vanilla (standard)
    training (its vanilla ResNet-18: 93.1% clean, Table 4.4). Without more it is trained with the
    run's own training config, which is TAT's fine-tuning one (in the CIFAR-10 suite 60 epochs at
    lr 0.01, not how a natural model is trained); a suite gives it its own, the natural recipe, in
    `[defenses.LABEL.pretrained.natural]` (`RunSpec.pretrained_train`). `pretrain_epochs` overrides
    the epochs of whichever config it gets. The thesis does not give the fine-tuning learning rate
    either: that is the trainer's (suite's) choice.
    Its cost is recorded in that run, not in this one's passes per sample. The 1:1 mix is one
    concatenated batch [x; x_dra] (so batch norm sees both halves), our reading of "iteratively
    update upon clean and adversarial samples".
    """

    pretrained_defenses = ("natural",)

    @dataclass(frozen=True)
    class Config:
        steps: int = 5
        p: float = 1 / 3  # fraction of C·H·W input values DRA perturbs
        budget_start: float = 2 / 255  # ε in the first epoch (mean |δ| over the perturbed values)
        budget_end: float = 0.5 / 255  # ε in the last adversarial epoch
        decay_epochs: int = 50  # the paper's adversarial epochs ...
        clean_epochs: int = 10  # ... then clean-only epochs; scaled to the run's budget
        step_ratio: float | None = None  # η / ε; None: 2.5 / steps
        pretrain_epochs: int | None = None  # natural pre-training epochs; None: the run's

        def __post_init__(self):
            require(self, positive=("p", "step_ratio"), fraction=("p",), at_least_one=("steps", "decay_epochs", "pretrain_epochs"),
                    non_negative=("clean_epochs", "budget_start", "budget_end"))

    def setup(self, model, ctx):
        train = {"epochs": self.config.pretrain_epochs} if self.config.pretrain_epochs is not None else None
        model.load_state_dict(ctx.pretrained("natural", train=train).state_dict())

    def budget_at(self, epoch: int, epochs: int) -> float | None:
        """DRA's ε in `epoch` (from 1) of `epochs`; None in the clean-only epochs."""
        c = self.config
        t = paper_epoch(epoch, epochs, c.decay_epochs + c.clean_epochs)
        if t >= c.decay_epochs:
            return None
        progress = min(t / (c.decay_epochs - 1), 1.0) if c.decay_epochs > 1 else 0.0
        return c.budget_start + (c.budget_end - c.budget_start) * progress

    def training_step(self, model, x, y, ctx):
        c = self.config
        budget = self.budget_at(ctx.epoch, ctx.epochs)
        if budget is None:
            return F.cross_entropy(model(x), y)
        step = c.step_ratio * budget if c.step_ratio is not None else default_step_size(budget, c.steps)
        with eval_mode(model):
            x_dra = dra(model, x, y, budget=budget, p=c.p, steps=c.steps, step_size=step)
        return F.cross_entropy(model(torch.cat([x, x_dra])), torch.cat([y, y]))
