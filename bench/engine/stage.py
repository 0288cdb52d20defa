"""The evaluation stage of one checkpoint: clean and the attacks (in the order given, cheap to
expensive) → curves → sanity checks (of the model alone, then of every stored result of the
checkpoint at its threat model) → the adaptive stage (the remedies of the flagged checks), every
result stored with provenance."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from bench.core.data import Dataset
from bench.engine.adaptive import AdaptiveSettings, run_adaptive
from bench.engine.curves import CurveSettings, compute_curves
from bench.engine.evaluation import CLEAN, AttackSpec, Evaluator, Outcome
from bench.engine.fastpath import FastPath
from bench.engine.sanity import run_checks
from bench.engine.subject import Subject
from bench.store import Store


@dataclass
class CheckpointReport:
    """What `evaluate_checkpoint` did: the checkpoint's id in the store, one Outcome per clean/attack
    evaluation, how many evaluations it computed (attacks, curve points and adaptive attacks; the
    rest were stored), the sanity checks it ran and the adaptive stage's outcomes (None when they
    were stored already or not asked for)."""

    checkpoint_id: int
    outcomes: list[Outcome]
    computed: int
    checks: dict | None
    adaptive: list | None = None


def evaluate_checkpoint(store: Store, checkpoint: Subject | str | Path, data: Dataset, specs: Sequence[AttackSpec], *,
                        n_samples: int | None = None, seed: int = 0, batch_size: int | str = "auto",
                        device: torch.device | str = "cpu", force: bool = False, curves: CurveSettings | None = None,
                        sanity: bool = False, adaptive: AdaptiveSettings | None = None,
                        checkpoint_root: str | Path = "checkpoints", log: Callable[[str], None] = print,
                        fast: FastPath | None = None) -> CheckpointReport:
    """Evaluate one checkpoint (a file, or any model as a `Subject`): clean, then `specs` in order,
    then the curves (`CurveSettings`, or None for none), then (with `sanity`) the sanity checks and
    (with `adaptive` settings, after them) the adaptive stage; `fast`: the device's fast path by
    default."""
    attacks = [(spec, spec.build()) for spec in specs]  # validate every spec before any work
    for _, attack in attacks:
        attack.threat.check_for(data.input_shape)
    evaluator = Evaluator(store, checkpoint, data, seed=seed, batch_size=batch_size, device=device, force=force,
                          checkpoint_root=checkpoint_root, log=log, fast=fast)
    samples = evaluator.samples(n_samples)
    outcomes = [evaluator.evaluate(CLEAN, CLEAN, None, samples)]
    outcomes += [evaluator.evaluate(spec.label, spec.attack, attack, samples) for spec, attack in attacks]
    if curves is not None:
        compute_curves(evaluator, curves)
    checks = run_checks(evaluator, samples) if sanity else None
    remedied = run_adaptive(evaluator, samples, adaptive) if sanity and adaptive is not None else None
    return CheckpointReport(evaluator.checkpoint_id, outcomes, evaluator.computed, checks, remedied)
