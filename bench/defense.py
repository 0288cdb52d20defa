"""Defense base class, training context and registry. Defenses live in the `defenses`
package, one file each; the shared trainer (bench.trainer) calls their hooks."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn as nn

from bench.config import build_config
from bench.registry import Registry
from bench.threat import ThreatModel

if TYPE_CHECKING:
    from bench.pretrained import Pretrained


@dataclass
class TrainContext:
    """What the trainer tells a defense. `epoch` counts from 1; `step` is the global optimization
    step (from 0). `pretrained(defense, ...)` returns another run's model on the same data, trained
    on demand and cached (see bench.pretrained); call it in `setup`."""

    threat: ThreatModel
    num_classes: int
    input_shape: tuple[int, ...]
    epochs: int
    device: torch.device
    optimizer: torch.optim.Optimizer
    steps_per_epoch: int
    pretrained: "Pretrained"
    epoch: int = 1
    step: int = 0


class Defense:
    """A training method. Subclasses define `Config` (a frozen dataclass whose defaults are
    the paper's) and `training_step`; `setup`, `on_epoch_start` and `on_step_end` are optional.

    The trainer puts the model in train mode before each step, calls `training_step`,
    back-propagates the returned scalar loss, takes the optimizer step, then calls
    `on_step_end`. A defense that needs the model in eval mode for its inner maximization
    switches it and switches back (`bench.models.eval_mode`); one that failed to would still
    train the next step in train mode.

    A defense whose paper sets something by epoch (a curriculum, a warm-up, phases) maps the
    run's epochs onto the paper's with `paper_epoch`, so every schedule follows one rule.
    """

    Config: ClassVar[type]
    name: ClassVar[str]
    # validation accuracy that picks best.pt: "robust" (early stopping, Rice et al. 2020) or "clean"
    selection_metric: ClassVar[str] = "robust"

    def __init__(self, **params):
        self.config = build_config(self.Config, params, f"defense {self.name!r}")

    def params(self) -> dict:
        return dataclasses.asdict(self.config)

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


def paper_epoch(epoch: int, epochs: int, paper_epochs: float) -> float:
    """The paper time, in paper epochs from 0, that the run's `epoch` (from 1) of `epochs` stands
    for: the middle of the paper epochs it covers, (epoch − ½)·paper_epochs/epochs. With
    paper_epochs = 1 it is the fraction of training.

    Why the middle: run epoch e covers paper time [(e − 1)·P/E, e·P/E), and reading the schedule
    at the centre of that span treats both ends of training alike: the first and last run
    epochs stand for paper times P/2E and P − P/2E, symmetric about P/2. Reading at the start
    of the span instead reaches paper time 0 but never passes P − P/E, so a schedule that
    finishes late was cut short on small budgets (a 2-epoch P-SAT, whose λ rises to 1 by paper
    epoch 70 of 100, ended at λ = 0.5). With the middle, a schedule whose changes lie between
    P/2E and P − P/2E reaches both its start and its end value (on 2 epochs: between P/4 and
    3P/4, which P-SAT's 30 → 70 of 100 satisfies); a change outside that span is seen only in
    part (H-SAT's ramp from paper epoch 0 starts above its first value on any budget).

    A step at paper epoch s switches at the first run epoch whose middle passes s, i.e.
    (e − ½)·P/E ≥ s; at E = P that is 1-based epoch s + 1, exactly the paper's 0-based epoch s,
    while a linear ramp is then read half an epoch later than at the start of each epoch."""
    return (epoch - 0.5) * paper_epochs / epochs


def check_fields(config, *, at_least_one: tuple[str, ...] = (), positive: tuple[str, ...] = (),
                 non_negative: tuple[str, ...] = ()) -> None:
    """ValueError (a one-line BenchError once `build_config` wraps it) naming every field of the
    dataclass `config` that is not an integer >= 1 (`at_least_one`), > 0 (`positive`) or >= 0
    (`non_negative`); None values are skipped (optional fields)."""
    bad = [f"{name} must be >= 1, got {getattr(config, name)}" for name in at_least_one
           if getattr(config, name) is not None and not getattr(config, name) >= 1]
    bad += [f"{name} must be > 0, got {getattr(config, name)}" for name in positive
            if getattr(config, name) is not None and not getattr(config, name) > 0]
    bad += [f"{name} must be >= 0, got {getattr(config, name)}" for name in non_negative
            if getattr(config, name) is not None and not getattr(config, name) >= 0]
    if bad:
        raise ValueError("; ".join(bad))


DEFENSES: Registry[type[Defense]] = Registry("defense", base=Defense)
register_defense = DEFENSES.register


def load_defenses() -> Registry[type[Defense]]:
    """Import the `defenses` package so every defense registers itself."""
    import defenses  # noqa: F401

    return DEFENSES
