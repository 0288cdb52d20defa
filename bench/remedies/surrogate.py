"""A smooth surrogate distilled from the model: BPDA through it and transfer from it, the answers
to gradients that are missing or misleading where no non-differentiable part is declared."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.adversary.ball import random_start
from bench.adversary.losses import ce_loss
from bench.adversary.pgd import pgd
from bench.core.attack import ATTACKS
from bench.core.config import require
from bench.core.models import build_model, eval_mode
from bench.core.remedy import (ATTACK_FAILURES, APGDBudget, Remedy, RemedyContext, forward_backward, probability_rows,
                               recover_logits, register_remedy)
from bench.core.rng import fork_rng


@dataclass(frozen=True)
class Distillation:
    """How the surrogate is distilled (both remedies of this module share one per checkpoint when
    these agree): architecture, rounds of (label, train, attack), the random neighbours of each
    evaluation input labelled in the first round, the epochs, Adam's learning rate and the batch."""

    surrogate_model: str = "small_cnn"
    surrogate_model_params: dict = field(default_factory=dict)
    rounds: int = 3
    neighbours: int = 8
    epochs: int = 30
    lr: float = 1e-3
    batch_size: int = 128
    attack_steps: int = 20

    def __post_init__(self):
        require(self, at_least_one=("rounds", "epochs", "batch_size", "attack_steps"), non_negative=("neighbours",),
                positive=("lr",))


def probabilities(out: torch.Tensor) -> torch.Tensor:
    """The class probabilities a model's outputs stand for (its softmax, or the outputs themselves
    where they already are probability vectors)."""
    return torch.where(probability_rows(out)[:, None], out, torch.softmax(out.float(), dim=1))


def _label(model: nn.Module, x: torch.Tensor, batch: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([probabilities(model(x[i:i + batch])) for i in range(0, len(x), batch)])


def distill(model: nn.Module, ctx: RemedyContext, d: Distillation) -> nn.Module:
    """A smooth surrogate of `model` trained on the model's own output probabilities at the
    evaluation inputs and their eps-neighbourhoods (Papernot et al. 2017's substitute training,
    around the points under attack): round 1 labels the inputs and `neighbours` uniform random
    points of each ball; every round trains `epochs` epochs (soft cross-entropy, Adam) and then
    adds the end points of PGD on the surrogate from a random start in each ball, labelled by the
    model: where the two disagree is what the next round learns. Seeded; leaves the caller's RNG."""
    data, threat = ctx.data, ctx.threat
    with fork_rng(ctx.device), eval_mode(model):
        torch.manual_seed(ctx.seed)
        surrogate = build_model(d.surrogate_model, num_classes=data.num_classes, input_shape=data.input_shape,
                                mean=data.mean, std=data.std, **d.surrogate_model_params).to(ctx.device)
        optimizer = torch.optim.Adam(surrogate.parameters(), lr=d.lr)
        pool = torch.cat([ctx.x] + [random_start(ctx.x, threat.norm, threat.eps) for _ in range(d.neighbours)])
        targets = _label(model, pool, d.batch_size)
        for round_ in range(d.rounds):
            surrogate.train()
            for _ in range(d.epochs):
                for idx in torch.randperm(len(pool), device=pool.device).split(d.batch_size):
                    loss = -(targets[idx] * F.log_softmax(surrogate(pool[idx]), dim=1)).sum(1).mean()
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
            surrogate.eval()
            if round_ < d.rounds - 1:
                found = pgd(surrogate, ctx.x, lambda z: ce_loss(z, ctx.y), eps=threat.eps, norm=threat.norm,
                            steps=d.attack_steps, step_size=2.5 * threat.eps / d.attack_steps,
                            x_init=random_start(ctx.x, threat.norm, threat.eps))
                pool, targets = torch.cat([pool, found]), torch.cat([targets, _label(model, found, d.batch_size)])
    return surrogate.requires_grad_(False)


def surrogate_of(model: nn.Module, ctx: RemedyContext, d: Distillation) -> nn.Module:
    """The checkpoint's surrogate for these settings, distilled on first use."""
    key = ("surrogate", repr(d))
    if key not in ctx.cache:
        ctx.cache[key] = distill(model, ctx, d)
    return ctx.cache[key]


class Hybrid(nn.Module):
    """BPDA with a learned approximation of the whole model: the forward pass is the model's
    (recovered) logits, the backward pass the surrogate's input gradient."""

    def __init__(self, model: nn.Module, surrogate: nn.Module):
        super().__init__()
        self.model, self.surrogate = model, surrogate

    def forward(self, x):
        return forward_backward(recover_logits(self.model(x)), self.surrogate(x))


@register_remedy("bpda_surrogate")
class BPDASurrogate(Remedy):
    """BPDA through a distilled surrogate (Athalye et al. 2018, §4.1: a differentiable
    approximation, here of the whole model, learned as Tramèr et al. 2020 do where a defense hides
    where its gradient breaks, §5.13; Papernot et al. 2017 for the substitute): where no
    non-differentiable part is declared, a smooth surrogate is distilled from the model's own
    outputs on the evaluation inputs and their neighbourhoods (`distill`); APGD-CE and APGD-T
    then run on the model's forward pass and the surrogate's backward pass (`Hybrid`), so every
    step and every kept point is judged by the model itself. Applies to any model (the most
    expensive gradient remedy: the last one tried). Defaults: AutoAttack's APGD (100 steps, 9
    target classes); the surrogate: small_cnn, 3 rounds of 30 epochs, 8 neighbours per input."""

    title = "BPDA surrogate"
    revision = 3  # 3: logits rescaled only where their spread saturates the cross-entropy; 2: forward pass exact
    paper = "Athalye et al. 2018 §4.1; Tramèr et al. 2020 §5.13; Papernot et al. 2017"
    answers = ("gradients_nonzero",) + ATTACK_FAILURES
    order = 6

    @dataclass(frozen=True)
    class Config(Distillation, APGDBudget):
        def __post_init__(self):
            Distillation.__post_init__(self)
            APGDBudget.__post_init__(self)

    def attacks(self, ctx):
        return self.config.apgd_ce_and_t(ctx)

    def view(self, model, ctx):
        return Hybrid(model, surrogate_of(model, ctx, _distillation(self.config)))


@register_remedy("transfer_surrogate")
class TransferSurrogate(Remedy):
    """Transfer from the distilled surrogate (Papernot et al. 2017; Athalye et al. 2018 §3.1 and
    Carlini et al. 2019 §5.2 name transfer the check of misleading gradients): PGD with the margin
    loss and `restarts` random starts on the surrogate of `bpda_surrogate` (the same one when the
    distillation settings agree), each end point then classified by the model. Defaults: 100
    steps of 2.5·eps/100, 5 restarts."""

    title = "transfer from surrogate"
    paper = "Papernot et al. 2017; Athalye et al. 2018 §3.1"
    answers = ATTACK_FAILURES
    order = 9

    @dataclass(frozen=True)
    class Config(Distillation):
        steps: int = 100
        restarts: int = 5

        def __post_init__(self):
            super().__post_init__()
            require(self, at_least_one=("steps", "restarts"))

    def attacks(self, ctx):
        c = self.config
        return [("pgd_cw", ATTACKS.get("pgd")(norm=ctx.threat.norm, eps=ctx.threat.eps, steps=c.steps,
                                              restarts=c.restarts, loss="cw"))]

    def view(self, model, ctx):
        return surrogate_of(model, ctx, _distillation(self.config))


def _distillation(config) -> Distillation:
    return Distillation(**{name: getattr(config, name) for name in Distillation.__dataclass_fields__})
