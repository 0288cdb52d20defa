"""The adaptive stage of one checkpoint, after its sanity checks: from flag to fix.

Each failed check (and, with `warned`, each warned one) calls for the remedies that answer it
(`bench.remedies`), tried cheapest first (`Remedy.order`) among those that apply to the model. A
remedy's attacks run once per checkpoint and are stored as evaluations with role "adaptive", per
sample, like every attack. After each remedy the flagged check is re-run on the new results
(`_recheck`): the adaptive evaluations count as white-box iterative attacks, a check of the model
alone reads the remedy's `view`, and a check of one point of the eps curve gets the remedy's
attacks at that eps. The first remedy whose re-run passes closes the flag; otherwise the
flag stays open after every remedy that applies. One outcome per flagged check is stored
(`Store.replace_remedy_outcomes`), with the adaptive worst case: the per-sample AND over the
suite's attacks, the clean evaluation and every adaptive evaluation run up to then.

A remedy's first evaluation that runs carries the cost of what it prepares (a distilled
surrogate is trained there, and its queries of the model are counted there). The stage is skipped
when the stored outcomes were computed from the same flags, settings and remedy revisions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from bench.core.check import CHECKS, CheckResult, not_run
from bench.core.config import build_config
from bench.core.errors import BenchError
from bench.core.remedy import REMEDIES, AdaptiveAttack, Remedy, RemedyContext
from bench.core.rng import fork_rng
from bench.engine.provenance import provenance
from bench.engine.sanity import build_context, records
from bench.store.schema import RemedyOutcome

if TYPE_CHECKING:
    from bench.engine.evaluation import Evaluator, SampleSet


@dataclass(frozen=True)
class AdaptiveSettings:
    """Which flags call for remedies (failed checks; `warned` checks too) and the remedies'
    budgets: {remedy name: parameters}, validated here."""

    warned: bool = False
    remedies: dict = field(default_factory=dict)

    def __post_init__(self):
        for name, params in self.remedies.items():
            cls = REMEDIES.get(name)
            if not isinstance(params, dict):
                raise BenchError(f"remedy {name!r}: parameters must be a table, got {params!r}")
            cls(**params)

    def remedy(self, name: str) -> Remedy:
        return REMEDIES.get(name)(**self.remedies.get(name, {}))


def adaptive_settings(table: dict, where: str) -> AdaptiveSettings:
    """AdaptiveSettings from a suite's [adaptive] table (`warned`, and [adaptive.NAME] budgets)."""
    table = dict(table)
    warned = table.pop("warned", False)
    return build_config(AdaptiveSettings, {"warned": warned, "remedies": table}, where)


@dataclass
class Ran:
    """A remedy's adaptive evaluations on this checkpoint: their ids, labels and cost."""

    remedy: Remedy
    evaluation_ids: list[int]
    labels: list[str]
    forward: int
    backward: int
    seconds: float


def run_adaptive(evaluator: Evaluator, samples: SampleSet, settings: AdaptiveSettings
                 ) -> list[RemedyOutcome] | None:
    """Run the adaptive stage of the evaluator's checkpoint (see the module docstring) and store
    its outcomes. Returns them, or None when the stored ones still stand."""
    store, threat = evaluator.store, evaluator.threat
    ctx, inputs, samples = build_context(evaluator, samples)
    checks = store.stored_checks(evaluator.checkpoint_id, threat.key)
    flags = {row.name: CheckResult(row.status, row.value, row.threshold, row.summary or "", row.evidence or {})
             for row in checks if row.status in ("fail", "warn")}
    triggered = calls_for(flags, settings)
    digest = _digest(inputs, {n: flags[n].status for n in triggered}, settings)
    stored = store.remedy_outcomes(evaluator.checkpoint_id, threat.key)
    if not evaluator.force and [r.check for r in stored] == sorted(triggered) \
            and all(r.inputs_hash == digest for r in stored):
        return None
    rctx = RemedyContext(evaluator.model, samples.x, samples.y, evaluator.data, threat, evaluator.device,
                         evaluator.seed, flags)
    suite = [r.evaluation_id for r in ctx.attacks] + ([ctx.clean.evaluation_id] if ctx.clean else [])
    ran: dict[str, Ran] = {}
    skipped: dict[str, str | None] = {}
    outcomes = []
    for name in sorted(triggered):
        tried, closed_by, recheck = [], None, None
        for remedy in _remedies_for(name, settings):
            if remedy.name not in skipped:
                skipped[remedy.name] = remedy.applies(rctx)
            if skipped[remedy.name] is not None:
                tried.append({"remedy": remedy.name, "title": remedy.title, "applies": False,
                              "why": skipped[remedy.name]})
                continue
            if remedy.name not in ran:
                ran[remedy.name] = _run_remedy(evaluator, samples, remedy, rctx)
            adaptive = [i for r in ran.values() for i in r.evaluation_ids]
            recheck, at_eps = _recheck(name, flags[name], ctx, evaluator, rctx, remedy, adaptive)
            worst, n = store.sample_matrix(suite + adaptive).worst_case()
            r = ran[remedy.name]
            tried.append({"remedy": remedy.name, "title": remedy.title, "revision": remedy.revision, "applies": True,
                          "labels": r.labels, "evaluations": r.evaluation_ids, "forward": r.forward,
                          "backward": r.backward, "seconds": r.seconds, "recheck": recheck.status,
                          "summary": recheck.summary, "worst_case": worst, "n": n,
                          **({"at_eps": {"labels": at_eps.labels, "evaluations": at_eps.evaluation_ids,
                                         "forward": at_eps.forward, "backward": at_eps.backward,
                                         "seconds": at_eps.seconds}} if at_eps else {})})
            if recheck.status == "pass":
                closed_by = remedy.name
                break
        applied = [t for t in tried if t["applies"]]
        outcomes.append(RemedyOutcome(
            norm=threat.norm, eps=threat.eps, check=name, check_status=flags[name].status,
            status="closed" if closed_by else "open" if applied else "none", closed_by=closed_by,
            worst_case=applied[-1]["worst_case"] if applied else None, n_samples=applied[-1]["n"] if applied else None,
            recheck_status=recheck.status if recheck else None, recheck_summary=recheck.summary if recheck else None,
            remedies=tried, inputs_hash=digest,
            **provenance(evaluator.device, {"checkpoint": evaluator.checkpoint, "check": name,
                                            "settings": dataclasses.asdict(settings), "revisions": revisions()},
                         evaluator.seed)))
    store.replace_remedy_outcomes(evaluator.checkpoint_id, threat.key, outcomes)
    _log(evaluator, outcomes, store.sample_matrix(suite + [i for r in ran.values() for i in r.evaluation_ids]))
    return outcomes


def calls_for(flags: dict[str, CheckResult], settings: AdaptiveSettings) -> list[str]:
    """The flagged checks whose remedies run: the failed ones, and with `settings.warned` the
    warned ones too; sorted."""
    return sorted(name for name, r in flags.items() if r.status == "fail" or (settings.warned and r.status == "warn"))


def revisions() -> dict[str, int]:
    """Every registered remedy's revision: stored with each outcome, so that a new or changed
    remedy makes the outcomes stale."""
    return {name: REMEDIES.get(name).revision for name in REMEDIES.names()}


def _remedies_for(check: str, settings: AdaptiveSettings) -> list[Remedy]:
    """The remedies that answer `check`, cheapest first."""
    classes = [REMEDIES.get(n) for n in REMEDIES.names() if check in REMEDIES.get(n).answers]
    return [settings.remedy(cls.name) for cls in sorted(classes, key=lambda c: (c.order, c.name))]


def _run_remedy(evaluator: Evaluator, samples: SampleSet, remedy: Remedy, rctx: RemedyContext) -> Ran:
    """Evaluate (or find stored) every attack of the remedy at the threat model, role "adaptive"."""
    return _evaluate_all(evaluator, samples, remedy, rctx, remedy.attacks(rctx))


def _evaluate_all(evaluator: Evaluator, samples: SampleSet, remedy: Remedy, rctx: RemedyContext,
                  attacks: list) -> Ran:
    ran = Ran(remedy, [], [], 0, 0, 0.0)
    for label, attack in attacks:
        full = f"{remedy.name}:{label}"
        outcome = evaluator.evaluate(full, attack.name, AdaptiveAttack(remedy, rctx, attack), samples, role="adaptive")
        ran.evaluation_ids.append(outcome.evaluation_id)
        ran.labels.append(full)
        ran.forward += outcome.forward_passes
        ran.backward += outcome.backward_passes
        ran.seconds += outcome.seconds
        n = outcome.n_samples
        evaluator.log(f"  {full:<24} {outcome.robust_acc:7.2%}  ({outcome.forward_passes / n:.0f} fwd, "
                      f"{outcome.backward_passes / n:.0f} bwd per sample, {outcome.seconds:.1f}s"
                      + (", stored)" if outcome.cached else ")"))
    return ran


def _recheck(name: str, flag: CheckResult, ctx, evaluator: Evaluator, rctx: RemedyContext, remedy: Remedy,
             adaptive: list[int]) -> tuple[CheckResult, Ran | None]:
    """The check `name` re-run on the new results (or the remedy's own answer, `Remedy.recheck`):
    the adaptive evaluations count as white-box iterative attacks; a check of the model alone
    reads the remedy's `view`; a check that judged one point of the PGD eps curve away from the
    threat eps (its evidence's `eps`: the largest bounded eps, the unbounded one) gets the
    remedy's attacks at that eps, on the curve's samples, ANDed into that point. Returns the
    result and those extra evaluations."""
    own = remedy.recheck(name, rctx)
    if own is not None:
        return own, None
    check = CHECKS.get(name)
    extra = [_white_box(r) for r in records(evaluator.store, list(evaluator.store.evaluations(adaptive).values())).values()]
    model = remedy.view(evaluator.model, rctx) if check.stage == "pre" else ctx.model
    curves, at_eps = ctx.curves, None
    eps = flag.evidence.get("eps")
    point = ctx.curve_point("eps:pgd", eps) if isinstance(eps, (int, float)) and eps != ctx.threat.eps else None
    if point is not None:
        at_eps = _at_eps(evaluator, remedy, rctx, float(eps), point)
        if at_eps is not None:
            found = records(evaluator.store, list(evaluator.store.evaluations(at_eps.evaluation_ids).values()))
            correct = point.correct & np.logical_and.reduce([r.correct for r in found.values()])
            curves = {**ctx.curves, "eps:pgd": [(x, dataclasses.replace(r, correct=correct) if r is point else r)
                                                for x, r in ctx.curves["eps:pgd"]]}
    try:
        with fork_rng(evaluator.device):
            torch.manual_seed(evaluator.seed)
            result = check().run(dataclasses.replace(ctx, model=model, attacks=ctx.attacks + extra, curves=curves))
    except Exception as exc:  # as in run_checks: a broken check is recorded as not run
        result = not_run(f"the check raised {type(exc).__name__}: {exc}")
    return result, at_eps


def _white_box(record):
    return dataclasses.replace(record, kind="gradient", iterative=True, single_step=False, ensemble=False,
                               minimum_norm=False)


def _at_eps(evaluator: Evaluator, remedy: Remedy, rctx: RemedyContext, eps: float, point) -> Ran | None:
    """The remedy's attacks at `eps` on the samples of a curve point (None if they are not an
    evaluation subset this evaluator can rebuild)."""
    samples = evaluator.samples(len(point.index))
    if samples.indices != point.index.tolist():
        return None
    attacks = [(f"{label}@{eps:g}", type(a)(**{**a.params(), "eps": eps})) for label, a in remedy.attacks(rctx)]
    return _evaluate_all(evaluator, samples, remedy, rctx, attacks)


def _digest(inputs: str, flags: dict[str, str], settings: AdaptiveSettings) -> str:
    remedies = {n: [REMEDIES.get(n).revision, settings.remedy(n).params()] for n in REMEDIES.names()}
    blob = {"inputs": inputs, "flags": flags, "warned": settings.warned, "remedies": remedies}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def _log(evaluator: Evaluator, outcomes: list[RemedyOutcome], matrix) -> None:
    for o in outcomes:
        evaluator.log(f"  adaptive     {o.check}: {describe(o)}")
    acc, n = matrix.worst_case()
    if outcomes:
        evaluator.log(f"  adaptive     worst case {acc:.2%} (per-sample AND with the adaptive attacks, n={n})")


def describe(outcome: RemedyOutcome) -> str:
    """What the adaptive stage did about a flag, in a few words: "BPDA surrogate → 55.5% (closed)"."""
    applied = [t for t in outcome.remedies if t["applies"]]
    if not applied:
        return "no remedy answers it" if not outcome.remedies else "no remedy applies (" + "; ".join(
            f"{t['remedy']}: {t['why']}" for t in outcome.remedies) + ")"
    last = applied[-1]
    titles = " + ".join(t["title"] for t in applied)
    state = "closed" if outcome.status == "closed" else f"open, re-run check {outcome.recheck_status}"
    return f"{titles} → {last['worst_case']:.1%} ({state})"
