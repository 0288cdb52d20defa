"""Models trained on demand and cached like any run: a TGCL teacher, the natural starting point
of transfer AT, EAT's static models, a transfer attack's surrogate.

`Pretrained` implements `bench.core.pretrained.PretrainedModels`; it is handed to defenses
(`ctx.pretrained`) and attacks (`ctx.pretrained` in `Attack.prepare`), bound to the asker by
`asked_by`. Calling it names a defense and, optionally, another architecture or training budget;
it trains that run with the shared trainer if it is not stored yet (resuming an interrupted one,
like any run) and returns the model, frozen and in eval mode. The run is an ordinary run: its id
is the hash of its config, it appears in the store, and the run that asked for it is identified
by a config that determines it and by the revisions of the defenses it declares in
`pretrained_defenses` (asking for an undeclared one is an error, so no identity misses one).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from bench.core.data import Dataset
from bench.core.errors import BenchError
from bench.core.rng import fork_rng
from bench.core.threat import ThreatModel
from bench.engine.checkpoint import load_model
from bench.engine.runspec import RunSpec, TrainConfig, TrainResult, build_train_config
from bench.store import Store


@dataclass
class Pretrained:
    """Trains (or finds) runs on `data` that share the asking run's dataset, threat model, seed
    and, unless told otherwise, architecture and training config."""

    data: Dataset
    store: Store
    checkpoint_root: Path
    device: torch.device
    threat: ThreatModel
    model: str  # "" when the asking model has no registered architecture (a model defined elsewhere)
    model_params: dict = field(default_factory=dict)
    train: TrainConfig | None = None  # None: every call must give `train`
    seed: int = 0
    progress: bool = True
    trainer: Callable[..., TrainResult] = field(kw_only=True)  # bench.engine.trainer.train (which builds a Pretrained)
    asker: str = ""
    declared: tuple[str, ...] | None = None  # the asker's `pretrained_defenses` (None: anything)
    dependency_train: dict[str, TrainConfig] = field(default_factory=dict)  # by defense: in place of `train`

    def asked_by(self, asker: str, declared: tuple[str, ...]) -> "Pretrained":
        """This source for `asker` ("defense 'tgcl'"), which may ask only for the `declared` defenses."""
        return dataclasses.replace(self, asker=asker, declared=tuple(declared))

    def check_declared(self, defense: str) -> None:
        """BenchError unless the asker declared `defense` in its `pretrained_defenses`."""
        if self.declared is not None and defense not in self.declared:
            raise BenchError(f"{self.asker} asks for a pretrained {defense!r} run but declares "
                             f"pretrained_defenses = {self.declared}: add it there, so that its revision is part "
                             f"of the asker's identity")

    def spec(self, defense: str = "natural", *, model: str | None = None, model_params: dict | None = None,
             train: dict | None = None, defense_params: dict | None = None, seed: int | None = None) -> RunSpec:
        """The run a call with these arguments trains. `train` overrides fields of the training
        config the asking run gives `defense` (`dependency_train`), or else of its own;
        `model_params` apply to `model` (default: the asking run's)."""
        own = self.dependency_train.get(defense, self.train)
        if own is None and not train:
            raise BenchError(f"a pretrained {defense!r} model needs a training config here (give `train`)")
        if not (model or self.model):
            raise BenchError(f"{self.asker or 'a caller'} asks for a pretrained {defense!r} run of the evaluated "
                             f"model's architecture, but that model was defined outside atbench: name a registered "
                             f"architecture (model=...)")
        base = dataclasses.asdict(own if own is not None else TrainConfig())
        return RunSpec(defense=defense, dataset=self.data.name, model=model or self.model,
                       threat=self.threat, train=build_train_config({**base, **(train or {})}, f"pretrained {defense!r}"),
                       defense_params=dict(defense_params or {}),
                       model_params=dict(model_params if model_params is not None else {} if model else self.model_params),
                       dataset_options=dict(self.data.options), seed=self.seed if seed is None else seed)

    def __call__(self, defense: str = "natural", *, which: str = "best", **kwargs) -> nn.Module:
        """The `which` ("best" or "last") checkpoint of that run, on the device, frozen, in eval mode."""
        if which not in ("best", "last"):
            raise BenchError(f"pretrained checkpoint must be 'best' or 'last', got {which!r}")
        self.check_declared(defense)
        spec = self.spec(defense, **kwargs)
        # training reseeds the global RNG; the caller's stream must not depend on whether the run was stored
        with fork_rng(self.device):
            result = self.trainer(spec, self.data, store=self.store, checkpoint_root=self.checkpoint_root,
                           device=self.device, progress=self.progress)
        if self.progress and result.trained_now:
            print(f"  pretrained {defense} ({spec.model}, {spec.train.epochs} epochs) trained: run {spec.run_id}",
                  flush=True)
        model, _ = load_model(result.directory / f"{which}.pt")
        return model.to(self.device).eval().requires_grad_(False)
