"""Evaluation stage: run attacks on a checkpoint over a fixed, recorded sample set and store
per-sample correctness, pass counts, seconds and implementation for each.

An evaluation is identified by (checkpoint sha256, attack, attack config, sample indices,
seed); one that is already stored is skipped unless `force`. The `clean` evaluation
(no attack) always comes first. Robust accuracy under all attacks is the per-sample AND
(`worst_case`), never the minimum of per-attack accuracies.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from sqlalchemy import select

from bench.attack import Attack, load_attacks
from bench.checkpoint import load_model, sha256_file
from bench.counting import count_passes
from bench.data import Dataset, eval_indices
from bench.errors import BenchError
from bench.models import eval_mode
from bench.pretrained import Pretrained
from bench.provenance import provenance
from bench.store import Evaluation, SampleResult, Store

BALL_TOLERANCE = 1e-5
CLEAN = "clean"


@dataclass
class EvalContext:
    """What an attack's `prepare` may use: the dataset, the device, the checkpoint's threat model
    and `pretrained` (other runs on the same data, trained on demand and cached; see
    bench.pretrained; it has no training config of its own, so callers give `train`)."""

    data: Dataset
    device: torch.device
    pretrained: Pretrained


@dataclass(frozen=True)
class AttackSpec:
    """An attack as a suite names it: `label` (e.g. "pgd100"), registered `attack`, parameters."""

    label: str
    attack: str
    params: dict = field(default_factory=dict)

    def build(self) -> Attack:
        return load_attacks().get(self.attack)(**self.params)


@dataclass
class Outcome:
    label: str
    attack: str
    robust_acc: float
    n_samples: int
    forward_passes: int
    backward_passes: int
    seconds: float
    cached: bool
    evaluation_id: int


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def perturbation_norms(x_adv: torch.Tensor, x: torch.Tensor, norm: str) -> torch.Tensor:
    delta = (x_adv - x).flatten(1)
    return delta.abs().amax(1) if norm == "Linf" else delta.norm(p=2, dim=1)


@dataclass
class AttackResult:
    """Per-sample outcome of one attack (or of `clean`) on a sample set.

    `correct`: still classified correctly (for a minimum-norm attack: no adversarial point within
    eps); `norms`: distance of the returned point (minimum-norm attacks: NaN where none was found);
    `losses`: cross-entropy at the returned point; `ever_fooled`: an observed iterate or the returned
    point was misclassified (None when the attack observes no iterates)."""

    correct: torch.Tensor
    norms: torch.Tensor | None
    losses: torch.Tensor
    ever_fooled: torch.Tensor | None
    loss_trace: list[float] | None
    forward: int
    backward: int
    seconds: float

    @property
    def silent_success(self) -> torch.Tensor | None:
        """Samples that an iterate fooled although the returned point does not (Pintor et al. 2022)."""
        return None if self.ever_fooled is None else self.ever_fooled & self.correct


def run_attack(model: nn.Module, attack: Attack | None, x: torch.Tensor, y: torch.Tensor,
               batch_size: int) -> AttackResult:
    """Per-sample results under `attack` (None: clean), with the attack's forward/backward passes
    and seconds. Checks every returned point lies in [0, 1] and (unless the attack is minimum-norm)
    in the eps ball: an attack that leaves its threat model is a bug, not a result."""
    correct, norms, losses, ever, traces = [], [], [], [], []
    with eval_mode(model), count_passes(model) as counter:
        start = time.perf_counter()
        for i in range(0, len(x), batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            if attack is not None:
                attack.start_trace()
                xa = attack(model, xb, yb).detach()
                trace = attack.pop_trace()
            else:
                xa, trace = xb, []
            with torch.no_grad():
                logits = model(xa)
            ok = logits.argmax(1) == yb
            if attack is not None:
                dist = perturbation_norms(xa, xb, attack.config.norm)
                outside = dist > attack.config.eps + BALL_TOLERANCE
                if xa.min() < 0 or xa.max() > 1 or (outside.any() and not attack.minimum_norm):
                    raise BenchError(f"attack {attack.name!r} returned points outside [0, 1] or its "
                                     f"{attack.threat} ball (max distance {dist.max().item():.6g})")
                if attack.minimum_norm:
                    dist = torch.where(ok, torch.full_like(dist, float("nan")), dist)
                    ok = ok | outside
                norms.append(dist.cpu())
                if trace:
                    fooled = ~ok.clone()
                    for step in trace:
                        if step.index is None:
                            fooled |= step.fooled
                        else:
                            fooled[step.index] |= step.fooled
                    ever.append(fooled.cpu())
                    traces.append([step.loss.mean().item() for step in trace
                                   if step.index is None and step.loss is not None])
            correct.append(ok.cpu())
            losses.append(F.cross_entropy(logits, yb, reduction="none").cpu())
        seconds = time.perf_counter() - start
        forward, backward = counter.forward, counter.backward
    n_batches = -(-len(x) // batch_size)
    return AttackResult(torch.cat(correct), torch.cat(norms) if norms else None, torch.cat(losses),
                        torch.cat(ever) if len(ever) == n_batches and n_batches else None,
                        _mean_trace(traces, [min(batch_size, len(x) - i) for i in range(0, len(x), batch_size)]),
                        forward, backward, seconds)


def _mean_trace(traces: list[list[float]], sizes: list[int]) -> list[float] | None:
    """The per-iterate mean loss over all samples, when every batch traced the same number of iterates."""
    if not traces or len(traces) != len(sizes) or len({len(t) for t in traces}) != 1 or not traces[0]:
        return None
    total = sum(sizes)
    return [sum(t[k] * n for t, n in zip(traces, sizes)) / total for k in range(len(traces[0]))]


def evaluate_checkpoint(store: Store, checkpoint: str | Path, data: Dataset, specs: Sequence[AttackSpec], *,
                        n_samples: int | None = None, seed: int = 0, batch_size: int = 256,
                        device: torch.device | str = "cpu", force: bool = False,
                        log: Callable[[str], None] = print) -> list[Outcome]:
    """Evaluate one checkpoint (clean first, then `specs` in order); returns one Outcome each."""
    device = torch.device(device)
    attacks = [(spec, spec.build()) for spec in specs]  # validate every spec before any work
    model, meta = load_model(checkpoint)
    if meta["dataset"] != data.name:
        raise BenchError(f"checkpoint {str(checkpoint)!r} was trained on {meta['dataset']!r}, not {data.name!r}")
    if meta.get("dataset_options", {}) != data.options:
        raise BenchError(f"checkpoint {str(checkpoint)!r} was trained on {data.name!r} with options "
                         f"{meta.get('dataset_options', {})}, not {data.options}")
    model = model.to(device)
    sha = sha256_file(checkpoint)
    indices = eval_indices(len(data.test_x), n_samples)
    indices_hash = _digest([data.name, data.options, indices])
    idx = torch.tensor(indices, dtype=torch.long)
    x, y = data.test_x[idx].to(device), data.test_y[idx].to(device)

    outcomes = []
    for spec, attack in [(AttackSpec(CLEAN, CLEAN), None)] + attacks:
        params = attack.params() if attack is not None else {}
        config_hash = _digest({"attack": spec.attack, "params": params, "implementation": _implementation(attack)})
        with store.session() as s:
            old = store.find_evaluation(s, sha, spec.attack, config_hash, indices_hash, seed)
            if old is not None and not force:
                outcomes.append(Outcome(spec.label, spec.attack, old.robust_acc, old.n_samples, old.forward_passes,
                                        old.backward_passes, old.seconds, True, old.evaluation_id))
                continue
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            result = run_attack(model, attack, x, y, batch_size)
        correct, norms, fwd, bwd, seconds = result.correct, result.norms, result.forward, result.backward, result.seconds
        row = Evaluation(checkpoint_sha256=sha, label=spec.label, attack=spec.attack,
                         norm=attack.config.norm if attack else None, eps=attack.config.eps if attack else None,
                         config_hash=config_hash, indices_hash=indices_hash, dataset=data.name,
                         n_samples=len(indices), n_correct=int(correct.sum()), robust_acc=float(correct.float().mean()),
                         forward_passes=fwd, backward_passes=bwd, seconds=seconds,
                         implementation=_implementation(attack),
                         **provenance(device, {"attack": spec.attack, "params": params, "checkpoint": str(checkpoint)}, seed))
        store.save_evaluation(row, indices, correct.tolist(), None if norms is None else norms.tolist())
        outcomes.append(Outcome(spec.label, spec.attack, row.robust_acc, row.n_samples, fwd, bwd, seconds, False,
                                row.evaluation_id))
        log(f"  {spec.label:<12} {row.robust_acc:7.2%}  ({fwd / len(indices):.0f} fwd, {bwd / len(indices):.0f} bwd "
            f"per sample, {seconds:.1f}s)")
    return outcomes


def _implementation(attack: Attack | None) -> str:
    return "atbench" if attack is None else attack.implementation


def worst_case(store: Store, evaluation_ids: Sequence[int]) -> tuple[float, int]:
    """Per-sample AND over the evaluations (on the samples they all cover): (accuracy, n)."""
    with store.session() as s:
        rows = s.execute(select(SampleResult.evaluation_id, SampleResult.sample_index, SampleResult.correct)
                         .where(SampleResult.evaluation_id.in_(list(evaluation_ids)))).all()
    per_sample: dict[int, list[bool]] = {}
    for _, index, correct in rows:
        per_sample.setdefault(index, []).append(bool(correct))
    covered = [v for v in per_sample.values() if len(v) == len(set(evaluation_ids))]
    if not covered:
        return float("nan"), 0
    return sum(all(v) for v in covered) / len(covered), len(covered)
