"""Sanity checks: the framework that tells a user when a checkpoint's numbers cannot be trusted.

A check (registered in `bench.checks`) reads a `CheckContext` — the model and its evaluation
samples (pre-checks) and the stored per-sample results of the attacks and curves (post-checks)
— and returns a `CheckResult`: status (pass / warn / fail / not-run), the measured value, the
threshold, a one-line summary and evidence. Results are stored per (checkpoint, threat model)
in `sanity_checks`, shown as flags on the leaderboard and printed by `bench eval`.

Thresholds account for sample size: a check that compares two attacks pairs them sample by
sample and tests the difference with a confidence interval (Newcombe's method for paired
proportions; a normal interval for paired losses), so a small sample cannot fail a model by
chance and a large one cannot hide a real gap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Sequence

import numpy as np
import torch
import torch.nn as nn
from sqlalchemy import delete, select

from bench.attack import ATTACKS, load_attacks
from bench.registry import Registry
from bench.store import Curve, Evaluation, SampleResult, SanityCheck as SanityRow
from bench.threat import ThreatModel

if TYPE_CHECKING:
    from bench.curves import CurveSettings
    from bench.evaluation import Evaluator, SampleSet

STATUSES = ("pass", "warn", "fail", "not-run")
Z = 1.959964  # two-sided 95%


# ----------------------------------------------------------------------------- statistics

def wilson(k: int, n: int, z: float = Z) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_difference(a: np.ndarray, b: np.ndarray, z: float = Z) -> tuple[float, float, float]:
    """mean(a) − mean(b) for paired booleans, with Newcombe's (1998, method 10) score interval."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    n = len(a)
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    both, only_a, only_b = int((a & b).sum()), int((a & ~b).sum()), int((~a & b).sum())
    neither = n - both - only_a - only_b
    p1, p2 = (both + only_a) / n, (both + only_b) / n
    l1, u1 = wilson(both + only_a, n, z)
    l2, u2 = wilson(both + only_b, n, z)
    denominator = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    phi = (both * neither - only_a * only_b) / math.sqrt(denominator) if denominator > 0 else 0.0
    theta = p1 - p2
    lower = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    upper = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return theta, theta - lower, theta + upper


def mean_difference(a: np.ndarray, b: np.ndarray, z: float = Z) -> tuple[float, float, float]:
    """mean(a − b) for paired real values, with a normal confidence interval."""
    d = np.asarray(a, float) - np.asarray(b, float)
    d = d[np.isfinite(d)]
    if len(d) == 0:
        return float("nan"), float("nan"), float("nan")
    half = z * d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else float("inf")
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def grade(estimate: float, lower: float, warn_above: float, fail_above: float) -> str:
    """fail when the violation exceeds `fail_above` with 95% confidence (its lower bound does);
    warn when it is significant (lower bound above 0) and its point estimate exceeds `warn_above`;
    pass otherwise. A flag thus always rests on evidence, not on a few samples' noise.
    (Comparisons ignore float rounding: one sample in 100 is 0.01, not 0.010000000000000009.)"""
    if lower > fail_above + 1e-12:
        return "fail"
    if lower > 1e-12 and estimate > warn_above + 1e-12:
        return "warn"
    return "pass"


# ----------------------------------------------------------------------------- what checks read

@dataclass
class Record:
    """A stored evaluation as the checks see it: arrays are ordered by sample index."""

    evaluation_id: int
    label: str
    attack: str
    kind: str            # the attack class's kind ("clean" for the clean evaluation)
    minimum_norm: bool
    norm: str | None
    eps: float | None
    index: np.ndarray
    correct: np.ndarray
    loss: np.ndarray
    diagnostics: dict

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean()) if len(self.correct) else float("nan")

    @property
    def mean_loss(self) -> float:
        finite = self.loss[np.isfinite(self.loss)]
        return float(finite.mean()) if len(finite) else float("nan")


def paired(*records: Record) -> list[tuple[np.ndarray, np.ndarray]]:
    """(correct, loss) of each record on the samples all of them cover, in one order."""
    common = records[0].index
    for r in records[1:]:
        common = np.intersect1d(common, r.index)
    out = []
    for r in records:
        where = np.searchsorted(r.index, common)
        out.append((r.correct[where], r.loss[where]))
    return out


@dataclass
class CheckContext:
    model: nn.Module
    samples: "SampleSet"
    threat: ThreatModel
    num_classes: int
    unbounded_eps: float
    clean: Record | None = None
    attacks: list[Record] = field(default_factory=list)        # role "attack" at the threat model
    curves: dict[str, list[tuple[float, Record]]] = field(default_factory=dict)

    def attacks_of(self, *kinds: str, names: Sequence[str] | None = None) -> list[Record]:
        return [r for r in self.attacks if r.kind in kinds and (names is None or r.attack in names)]

    def curve_point(self, curve: str, x: float) -> Record | None:
        return next((r for px, r in self.curves.get(curve, []) if math.isclose(px, x, rel_tol=1e-9, abs_tol=1e-12)),
                    None)


@dataclass
class CheckResult:
    status: str
    value: float | None
    threshold: float | None
    summary: str
    evidence: dict = field(default_factory=dict)

    def __post_init__(self):
        assert self.status in STATUSES, self.status


def not_run(why: str) -> CheckResult:
    return CheckResult("not-run", None, None, why)


class Check:
    """A sanity check: `name` (its registry key), `stage` ("pre": reads only the model and the
    samples; "post": reads stored results), a docstring saying what it detects and its source."""

    name: ClassVar[str]
    stage: ClassVar[str] = "post"

    def run(self, ctx: CheckContext) -> CheckResult:
        raise NotImplementedError


CHECKS: Registry[type[Check]] = Registry("sanity check", base=Check)
register_check = CHECKS.register


def load_checks() -> Registry[type[Check]]:
    import bench.checks  # noqa: F401

    return CHECKS


# ----------------------------------------------------------------------------- running and storing

def _records(store, evaluation_ids: Sequence[int]) -> dict[int, Record]:
    load_attacks()
    with store.session() as s:
        rows = {e.evaluation_id: e for e in s.scalars(select(Evaluation).where(
            Evaluation.evaluation_id.in_(list(evaluation_ids))))}
        samples = s.execute(select(SampleResult.evaluation_id, SampleResult.sample_index, SampleResult.correct,
                                   SampleResult.loss).where(SampleResult.evaluation_id.in_(list(rows)))
                            .order_by(SampleResult.evaluation_id, SampleResult.sample_index)).all()
    per: dict[int, list] = {}
    for eid, index, correct, loss in samples:
        per.setdefault(eid, []).append((index, correct, loss if loss is not None else float("nan")))
    out = {}
    for eid, e in rows.items():
        cls = ATTACKS.get(e.attack) if e.attack in ATTACKS else None
        values = per.get(eid, [])
        out[eid] = Record(eid, e.label, e.attack, "clean" if e.norm is None else (cls.kind if cls else "unknown"),
                          bool(cls and cls.minimum_norm), e.norm, e.eps,
                          np.array([v[0] for v in values], dtype=np.int64), np.array([v[1] for v in values], bool),
                          np.array([v[2] for v in values], float), e.diagnostics or {})
    return out


def build_context(evaluator: "Evaluator", samples: "SampleSet", evaluation_ids: Sequence[int],
                  curve_settings: "CurveSettings | None") -> CheckContext:
    from bench.curves import unbounded_eps

    threat = evaluator.threat
    ctx = CheckContext(evaluator.model, samples, threat, evaluator.data.num_classes,
                       unbounded_eps(threat, evaluator.data.input_shape))
    records = _records(evaluator.store, evaluation_ids)
    for eid in evaluation_ids:
        r = records[eid]
        if r.kind == "clean":
            ctx.clean = r
        elif r.norm == threat.norm and r.eps is not None and math.isclose(r.eps, threat.eps, rel_tol=1e-9):
            ctx.attacks.append(r)
    if curve_settings is not None:
        digest = evaluator.samples(curve_settings.n_samples).digest
        with evaluator.store.session() as s:
            curves = {c.name: [(p.x, p.evaluation_id) for p in c.points] for c in s.scalars(select(Curve).where(
                Curve.checkpoint_sha256 == evaluator.sha, Curve.indices_hash == digest, Curve.seed == evaluator.seed))}
        points = _records(evaluator.store, [eid for pts in curves.values() for _, eid in pts])
        ctx.curves = {name: [(x, points[eid]) for x, eid in pts] for name, pts in curves.items()}
    return ctx


def run_checks(evaluator: "Evaluator", samples: "SampleSet", evaluation_ids: Sequence[int],
               curve_settings: "CurveSettings | None") -> dict[str, CheckResult] | None:
    """Run every registered check and store the results (replacing the checkpoint's earlier ones
    for this threat model). Skipped, returning None, when nothing was computed by this evaluator,
    `force` is off and every check is already stored."""
    from bench.provenance import provenance

    names = load_checks().names()
    threat = evaluator.threat
    with evaluator.store.session() as s:
        stored = set(s.scalars(select(SanityRow.name).where(
            SanityRow.checkpoint_sha256 == evaluator.sha, SanityRow.norm == threat.norm, SanityRow.eps == threat.eps)))
    if evaluator.computed == 0 and not evaluator.force and stored >= set(names):
        return None
    ctx = build_context(evaluator, samples, evaluation_ids, curve_settings)
    results = {}
    for name in names:
        try:
            with torch.random.fork_rng(devices=[evaluator.device] if evaluator.device.type == "cuda" else []):
                torch.manual_seed(evaluator.seed)
                results[name] = CHECKS.get(name)().run(ctx)
        except Exception as exc:  # a broken check must not hide the others: it is recorded as not run
            results[name] = not_run(f"the check raised {type(exc).__name__}: {exc}")
    prov = provenance(evaluator.device, {"checkpoint": evaluator.checkpoint, "checks": names}, evaluator.seed)
    with evaluator.store.session() as s:
        s.execute(delete(SanityRow).where(SanityRow.checkpoint_sha256 == evaluator.sha,
                                          SanityRow.norm == threat.norm, SanityRow.eps == threat.eps))
        for name, r in results.items():
            s.add(SanityRow(checkpoint_sha256=evaluator.sha, norm=threat.norm, eps=threat.eps, name=name,
                            status=r.status, value=_finite(r.value), threshold=_finite(r.threshold),
                            summary=r.summary, evidence=r.evidence, **prov))
    counts = {st: [n for n, r in results.items() if r.status == st] for st in STATUSES}
    flagged = "; ".join(f"{st}: {', '.join(counts[st])}" for st in ("fail", "warn") if counts[st])
    evaluator.log(f"  sanity       {len(counts['pass'])} pass, {len(counts['warn'])} warn, {len(counts['fail'])} fail, "
                  f"{len(counts['not-run'])} not run" + (f" ({flagged})" if flagged else ""))
    return results


def stored_checks(store, sha256: str, norm: str, eps: float) -> list[SanityRow]:
    """The stored checks of a checkpoint under a threat model, failures first."""
    with store.session() as s:
        rows = list(s.scalars(select(SanityRow).where(SanityRow.checkpoint_sha256 == sha256, SanityRow.norm == norm,
                                                      SanityRow.eps == eps)))
    order = ("fail", "warn", "pass", "not-run")
    return sorted(rows, key=lambda r: (order.index(r.status), r.name))


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)
