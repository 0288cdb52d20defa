"""Sanity-check contract: the `Check` base, what a check reads (`CheckContext`, `Record`) and what it
returns (`CheckResult`), and the registry. The checks live in `bench.checks`; the engine runs them
and stores their results (`bench.engine.sanity`).

A check reads the model and its evaluation samples (pre-checks, `stage = "pre"`) or the stored
per-sample results of the attacks and curves (post-checks) and returns a status (pass / warn /
fail / not-run), the measured value, the threshold, a one-line summary and evidence. Checks pick
attacks by the attributes their classes declare (`kind`, `iterative`, `single_step`, `ensemble`,
`minimum_norm`), never by name, so that a new attack is compared like the ones before it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import reduce
from typing import ClassVar

import numpy as np
import torch
import torch.nn as nn

from bench.core.registry import Registry
from bench.core.stats import grade, paired_difference
from bench.core.threat import ThreatModel

STATUSES = ("pass", "warn", "fail", "not-run")
ORDER_MARGIN = 0.01   # one point of accuracy: what an ordering violation may reach by attack noise alone


@dataclass
class Record:
    """A stored evaluation as the checks see it: arrays are ordered by sample index. `kind` and the
    flags are those the attack's class declares ("clean" and all False for the clean evaluation,
    "unknown" for an attack no longer registered)."""

    evaluation_id: int
    label: str
    attack: str
    kind: str
    minimum_norm: bool
    norm: str | None
    eps: float | None
    index: np.ndarray
    correct: np.ndarray
    loss: np.ndarray
    diagnostics: dict
    iterative: bool = False
    single_step: bool = False
    ensemble: bool = False

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
    """What a check reads: the model in eval mode and the evaluation samples `x`, `y` (pre-checks);
    the stored clean evaluation, every attack evaluation of the checkpoint at this threat model and
    the curves, as `Record`s (post-checks)."""

    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    threat: ThreatModel
    num_classes: int
    unbounded_eps: float
    clean: Record | None = None
    attacks: list[Record] = field(default_factory=list)        # role "attack" at the threat model
    curves: dict[str, list[tuple[float, Record]]] = field(default_factory=dict)

    def attacks_of(self, *kinds: str) -> list[Record]:
        return [r for r in self.attacks if r.kind in kinds]

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
    samples; "post": reads stored results), a docstring saying what it detects and its source, and
    a `revision`, bumped whenever a change can change its result (a stored result of an older
    revision is recomputed)."""

    name: ClassVar[str]
    stage: ClassVar[str] = "post"
    revision: ClassVar[int] = 1

    def run(self, ctx: CheckContext) -> CheckResult:
        raise NotImplementedError


CHECKS: Registry[type[Check]] = Registry("sanity check", base=Check, plugins=("bench.checks",))
register_check = CHECKS.register


# ----------------------------------------------------------------------------- helpers for checks

def ordering(name_a: str, a: Record | list[Record], name_b: str, b: Record, what: str,
              margin: float = ORDER_MARGIN) -> CheckResult:
    """`a` (one record, or several ANDed per sample) should be at least as strong as `b`:
    violation = acc(a) − acc(b) on common samples."""
    group = a if isinstance(a, list) else [a]
    pairs = paired(*group, b)
    a_correct = np.logical_and.reduce([c for c, _ in pairs[:-1]])
    b_correct = pairs[-1][0]
    diff, lower, upper = paired_difference(a_correct, b_correct)
    status = grade(diff, lower, margin, margin)
    only_b = np.nonzero(a_correct & ~b_correct)[0]
    common = reduce(np.intersect1d, [r.index for r in group + [b]])
    return CheckResult(status, diff, margin,
                       f"{what}: accuracy {name_a} {a_correct.mean():.1%} vs {name_b} {b_correct.mean():.1%} "
                       f"(difference {diff:+.1%}, 95% CI [{lower:+.1%}, {upper:+.1%}], n={len(a_correct)})",
                       {"a": name_a, "b": name_b, "n": len(a_correct), "ci": [lower, upper],
                        "broken_only_by_b": int(len(only_b)), "examples": common[only_b[:10]].tolist()})


def strongest_iterative(ctx: CheckContext) -> Record | None:
    """The suite's strongest single iterative white-box attack that searches inside the ball (a
    gradient attack that is `iterative`, neither an `ensemble` nor `minimum_norm`: PGD, MIM, C&W-L∞,
    APGD, ...), lowest accuracy first; else the eps-curve PGD at the threat eps."""
    iterative = [r for r in ctx.attacks if r.kind == "gradient" and r.iterative and not r.ensemble
                 and not r.minimum_norm]
    if iterative:
        return min(iterative, key=lambda r: (r.accuracy, -r.evaluation_id))
    return ctx.curve_point("eps:pgd", ctx.threat.eps)


def white_box(ctx: CheckContext) -> list[Record]:
    """Every white-box (gradient) attack of the suite."""
    return ctx.attacks_of("gradient")


def curve(ctx: CheckContext, name: str) -> list[tuple[float, Record]] | None:
    """The points of curve `name`, when it has at least two."""
    points = ctx.curves.get(name)
    return points if points and len(points) >= 2 else None


def newly_broken(ctx: CheckContext, extra: Record, what: str, warn_above: float, fail_above: float,
                  evidence: dict) -> CheckResult:
    """How much `extra` lowers the suite's per-sample worst case (the AND over every attack of the
    suite, on the samples both cover): samples every suite attack left standing that it breaks."""
    suite = [r for r in ctx.attacks] + ([ctx.clean] if ctx.clean is not None else [])
    pairs = paired(*suite, extra)
    worst = np.logical_and.reduce([c for c, _ in pairs[:-1]])
    both = worst & pairs[-1][0]
    diff, lower, upper = paired_difference(worst, both)
    status = grade(diff, lower, warn_above, fail_above)
    return CheckResult(status, diff, warn_above,
                       f"{what} breaks {int((worst & ~both).sum())} of the {int(worst.sum())} samples the suite's "
                       f"worst case left standing: worst case {worst.mean():.1%} → {both.mean():.1%} (n={len(worst)}, "
                       f"drop 95% CI [{lower:+.1%}, {upper:+.1%}])",
                       {**evidence, "n": len(worst), "ci": [lower, upper], "fail_above": fail_above})
