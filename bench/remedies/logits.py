"""Logit recovery: the answer to probabilities and saturated logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.core.config import require
from bench.core.remedy import ATTACK_FAILURES, APGDBudget, RecoveredLogits, Remedy, probability_rows, register_remedy


def _zero_gradient(model, x, y) -> torch.Tensor:
    """Per sample: is the cross-entropy input gradient of `model` exactly zero?"""
    z = x.detach().requires_grad_(True)
    with torch.enable_grad():
        grad, = torch.autograd.grad(F.cross_entropy(model(z), y, reduction="sum"), z)
    return grad.flatten(1).abs().amax(1) == 0

@register_remedy("logit_recovery")
class LogitRecovery(Remedy):
    """Logit recovery and margin losses (Carlini & Wagner 2017, §8: attack the logits, not the
    softmax; Carlini et al. 2019, §4.2; Tramèr et al. 2020, §5.2, whose defenses saturate the
    softmax; Croce & Hein 2020, DLR). The view takes the log of probability outputs and scales
    down each sample's logits spread wider than `LOGIT_STD_CAP` (logit rescaling: a huge scale no
    longer underflows the cross-entropy); on it run APGD-CE and APGD-T (from 4 classes), whose targeted DLR loss is
    invariant to the logits' shift and scale. Applies when the model returns probabilities (more
    than half of the outputs) or when the view has a gradient where the model's cross-entropy has
    none (more than `min_fraction` of the samples). Defaults: AutoAttack's APGD (100 steps, 1
    restart, 9 target classes)."""

    title = "logit recovery"
    paper = "Carlini & Wagner 2017 §8; Tramèr et al. 2020 §5.2; Croce & Hein 2020"
    answers = ("logits_not_probabilities", "gradients_nonzero") + ATTACK_FAILURES
    order = 1
    revision = 2  # 2: logits rescaled only where their spread saturates the cross-entropy (`recover_logits`)

    @dataclass(frozen=True)
    class Config(APGDBudget):
        min_fraction: float = 0.01

        def __post_init__(self):
            super().__post_init__()
            require(self, fraction=("min_fraction",))

    def applies(self, ctx):
        with torch.no_grad():
            probabilities = probability_rows(ctx.model(ctx.x)).float().mean().item()
        if probabilities > 0.5:
            return None
        restored = (_zero_gradient(ctx.model, ctx.x, ctx.y) & ~_zero_gradient(self.view(ctx.model, ctx), ctx.x, ctx.y))
        fraction = restored.float().mean().item()
        if fraction > self.config.min_fraction:
            return None
        return (f"the model returns logits, and recovering them restores a gradient on {fraction:.1%} of the samples "
                f"(needs > {self.config.min_fraction:.0%})")

    def attacks(self, ctx):
        return self.config.apgd_ce_and_t(ctx)

    def view(self, model, ctx):
        return RecoveredLogits(model)
