"""Defense base class, training context and registry. Defenses live in the `defenses`
package, one file each; the shared trainer (bench.engine.trainer) calls their hooks."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from bench.core.config import build_config
from bench.core.pretrained import PretrainedModels
from bench.core.registry import Registry
from bench.core.threat import ThreatModel


@dataclass
class TrainContext:
    """What the trainer tells a defense. `epoch` counts from 1; `step` is the global optimization
    step (from 0). `pretrained(defense, ...)` returns another run's model on the same data, trained
    on demand and cached (see bench.engine.pretrained); call it in `setup`."""

    threat: ThreatModel
    num_classes: int
    input_shape: tuple[int, ...]
    epochs: int
    device: torch.device
    optimizer: torch.optim.Optimizer
    steps_per_epoch: int
    pretrained: PretrainedModels
    epoch: int = 1
    step: int = 0


class Defense:
    """A training method. Subclasses define `Config` (a frozen dataclass whose defaults are
    the paper's) and `training_step`; `setup`, `on_epoch_start` and `on_step_end` are optional.

    The trainer puts the model in train mode before each step, calls `training_step`,
    back-propagates the returned scalar loss, takes the optimizer step, then calls
    `on_step_end`. A defense that needs the model in eval mode for its inner maximization
    switches it and switches back (`bench.core.models.eval_mode`); one that failed to would still
    train the next step in train mode.

    A defense whose paper sets something by epoch (a curriculum, a warm-up, phases) maps the
    run's epochs onto the paper's with `bench.core.schedules.paper_epoch`, so every schedule
    follows one rule.

    `revision` is bumped whenever a change can change what the defense trains for the same config;
    with the revisions of the defenses whose runs it asks `ctx.pretrained` for (which it names in
    `pretrained_defenses`) it is part of the run's identity (`revision_id`), so a run of an older
    revision is trained anew instead of reused.
    """

    Config: ClassVar[type]
    name: ClassVar[str]
    revision: ClassVar[int] = 1
    pretrained_defenses: ClassVar[tuple[str, ...]] = ()
    # validation accuracy that picks best.pt: "robust" (early stopping, Rice et al. 2020) or "clean"
    selection_metric: ClassVar[str] = "robust"
    # the loss back-propagates through an input gradient (create_graph): torch.compile is not used for it
    double_backward: ClassVar[bool] = False

    def __init__(self, **params):
        self.config = build_config(self.Config, params, f"defense {self.name!r}")

    def params(self) -> dict:
        return dataclasses.asdict(self.config)

    @classmethod
    def revision_id(cls) -> str:
        """The revision, with those of the defenses it trains on demand: "1" or "1(natural:1)"."""
        parts = [f"{name}:{DEFENSES.get(name).revision_id()}" for name in cls.pretrained_defenses]
        return f"{cls.revision}" + (f"({','.join(parts)})" if parts else "")

    def setup(self, model: nn.Module, ctx: TrainContext) -> None:
        """Build extra networks or state (teacher, discriminators)."""

    def on_epoch_start(self, epoch: int, ctx: TrainContext) -> None:
        """Update schedules (curriculum weights, eps ramps, phases)."""

    def training_step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: TrainContext) -> torch.Tensor:
        raise NotImplementedError

    def on_step_end(self, model: nn.Module, ctx: TrainContext) -> None:
        """After the optimizer step (e.g. AWP restores the weights it perturbed)."""

    def state_dict(self) -> dict:
        """Extra state to checkpoint (tensors, numbers, strings, containers of them)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


DEFENSES: Registry[type[Defense]] = Registry("defense", base=Defense, plugins=("defenses",))
register_defense = DEFENSES.register
