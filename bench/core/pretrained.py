"""The contract of `ctx.pretrained`: other runs on the same data that a defense (a teacher, a
natural starting point, static models) or an attack (a transfer surrogate) needs, trained on
demand and cached like any run. The engine implements it (`bench.engine.pretrained`)."""

from __future__ import annotations

from typing import Protocol

import torch.nn as nn


class PretrainedModels(Protocol):
    def __call__(self, defense: str = "natural", *, which: str = "best", model: str | None = None,
                 model_params: dict | None = None, train: dict | None = None, defense_params: dict | None = None,
                 seed: int | None = None) -> nn.Module:
        """The `which` ("best" or "last") checkpoint of the run of `defense` on the asking run's
        dataset, threat model and seed, with `model`/`model_params` (default: the asker's
        architecture) and the asker's training config overridden by `train`: on the device,
        frozen, in eval mode. The asker must declare `defense` in its `pretrained_defenses`."""
        ...
