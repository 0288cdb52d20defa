"""What identifies a training run: the shared training config (`TrainConfig`) and `RunSpec`, whose
canonical form (every default filled in, and the revisions of the code that trains it) hashes to
the run id. The trainer (`bench.engine.trainer`) trains a RunSpec and returns a `TrainResult`."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench import adversary
from bench.core.config import build_config, require, require_choice
from bench.core.data import dataset_options
from bench.core.defense import DEFENSES
from bench.core.errors import BenchError
from bench.core.models import model_params
from bench.core.threat import ThreatModel

TRAINER_REVISION = 1  # of the training loop in bench.engine.trainer: bump when a change can change its weights
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("piecewise", "cosine", "cyclic", "constant")


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters shared by all defenses. Defaults: SGD, momentum 0.9,
    weight decay 5e-4, piecewise LR ×0.1 at 50% and 75% of training (Rice et al. 2020's
    CIFAR-10 recipe: lr 0.1, decays at epochs 100 and 150 of 200)."""

    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "piecewise"
    milestones: tuple[float, ...] = (0.5, 0.75)  # fractions of training where the LR is multiplied by gamma
    gamma: float = 0.1
    val_steps: int = 10  # PGD steps for validation robust accuracy (step eps/4, random start)
    val_samples: int | None = None  # None: the whole validation split
    amp: bool = False  # bfloat16 autocast on CUDA (ignored on CPU)

    def __post_init__(self):
        require_choice(self.optimizer, OPTIMIZERS, "optimizer")
        require_choice(self.schedule, SCHEDULES, "LR schedule")
        require(self, at_least_one=("epochs", "batch_size", "val_steps", "val_samples"), positive=("lr",),
                non_negative=("momentum", "weight_decay", "gamma"), fraction=("milestones",))


@dataclass(frozen=True)
class RunSpec:
    """Everything that identifies a training run (its hash is the run id), plus a display label.

    `pretrained_train` gives, by defense name, the training config of the runs the defense asks
    `ctx.pretrained` for, in place of this run's own (e.g. TAT-DRA's natural start trained with the
    natural recipe, not with TAT's fine-tuning config); a name must be one of the defense's
    `pretrained_defenses`. It is part of the identity, left out of the canonical form when empty."""

    defense: str
    dataset: str
    model: str
    threat: ThreatModel
    train: TrainConfig = field(default_factory=TrainConfig)
    defense_params: dict = field(default_factory=dict)
    model_params: dict = field(default_factory=dict)
    dataset_options: dict = field(default_factory=dict)
    seed: int = 0
    label: str = ""
    pretrained_train: dict[str, TrainConfig] = field(default_factory=dict)

    def canonical(self) -> dict:
        """The config with every default filled in, and the revisions of the defense (with those
        of the runs it trains on demand), of the adversary library and of the training loop."""
        cls = DEFENSES.get(self.defense)
        defense = cls(**self.defense_params)
        for name in self.pretrained_train:
            if name not in cls.pretrained_defenses:
                raise BenchError(f"defense {self.defense!r} trains no pretrained {name!r} run; it can be given the "
                                 f"training config of: {', '.join(cls.pretrained_defenses) or 'none'}")
        dependencies = {"pretrained_train": {name: dataclasses.asdict(cfg) for name, cfg in
                                             sorted(self.pretrained_train.items())}} if self.pretrained_train else {}
        return {**dependencies, "defense": self.defense, "defense_params": defense.params(), "dataset": self.dataset,
                "dataset_options": dataset_options(self.dataset, self.dataset_options), "model": self.model,
                "model_params": model_params(self.model, self.model_params),
                "norm": self.threat.norm, "eps": self.threat.eps, "train": dataclasses.asdict(self.train),
                "seed": self.seed,
                "revisions": {"defense": cls.revision_id(), "adversary": adversary.REVISION,
                              "trainer": TRAINER_REVISION}}

    @property
    def run_id(self) -> str:
        blob = json.dumps(self.canonical(), sort_keys=True, default=list)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class TrainResult:
    run_id: str
    directory: Path
    epochs_done: int
    trained_now: bool  # False when the run was already complete


def build_train_config(params: dict, owner: str = "training") -> TrainConfig:
    return build_config(TrainConfig, params, owner)


def lr_at(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """The learning rate at optimization step `step` (0-based) of `total_steps`."""
    t = step / max(total_steps, 1)
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "piecewise":
        return cfg.lr * cfg.gamma ** sum(t >= m for m in cfg.milestones)
    if cfg.schedule == "cosine":
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * t))
    # cyclic (Wong et al. 2020): 0 → lr at 2/5 of training → 0
    return float(np.interp(t, [0, 0.4, 1], [0, cfg.lr, 0]))
