"""Natural (standard) training: cross-entropy on clean inputs, the no-defense baseline."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from bench.core.defense import Defense, register_defense


@register_defense("natural")
class Natural(Defense):
    """Empirical risk minimization on clean data; no hyper-parameters of its own.
    Its best checkpoint is chosen by clean validation accuracy (it has no robustness to select on)."""

    selection_metric = "clean"

    @dataclass(frozen=True)
    class Config:
        pass

    def training_step(self, model, x, y, ctx):
        return F.cross_entropy(model(x), y)
