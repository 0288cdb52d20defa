"""Running the sanity checks of one checkpoint and storing their results (the checks are in
`bench.checks`, their contract in `bench.core.check`).

The checks read every stored result of the checkpoint at its threat model, not only what the
current command computed: the clean evaluation and each leaderboard attack (per label, the one on
the most samples, then the newest), and the widest set of curves (the same rule). So a narrower
command (one more attack on fewer samples) adds to what the checks see and never removes from it,
and which command ran last does not change what they read. Each
stored check records its revision and a digest of what it read; the checks are recomputed when
either changes (or with `force`) and skipped otherwise.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import TYPE_CHECKING

import torch

from bench.core.attack import ATTACKS
from bench.core.check import CHECKS, STATUSES, CheckContext, CheckResult, Record, not_run
from bench.core.rng import fork_rng
from bench.engine.curves import unbounded_eps
from bench.engine.provenance import provenance
from bench.store.schema import Evaluation, SanityCheck

if TYPE_CHECKING:
    from bench.engine.evaluation import Evaluator, SampleSet


def records(store, evaluations: list[Evaluation]) -> dict[int, Record]:
    """The evaluations as the checks see them, with the attributes their attack classes declare."""
    results = store.sample_results([e.evaluation_id for e in evaluations])
    out = {}
    for e in evaluations:
        cls = ATTACKS.get(e.attack) if e.attack in ATTACKS else None
        index, correct, loss = results[e.evaluation_id]
        out[e.evaluation_id] = Record(
            e.evaluation_id, e.label, e.attack, "clean" if e.norm is None else (cls.kind if cls else "unknown"),
            bool(cls and cls.minimum_norm), e.norm, e.eps, index, correct, loss, e.diagnostics or {},
            iterative=bool(cls and cls.iterative), single_step=bool(cls and cls.single_step),
            ensemble=bool(cls and cls.ensemble))
    return out


def build_context(evaluator: "Evaluator", samples: "SampleSet") -> tuple[CheckContext, str, "SampleSet"]:
    """The context of every stored result of the checkpoint at its threat model (see the module
    docstring), a digest of what it holds, and the sample set it holds them on (the widest clean
    evaluation's)."""
    store, threat = evaluator.store, evaluator.threat
    clean = store.clean_evaluation(evaluator.checkpoint_id)
    if clean is not None and clean.indices_hash != samples.digest:
        widest = evaluator.samples(clean.n_samples)
        samples = widest if widest.digest == clean.indices_hash else samples
    attacks = store.attack_evaluations(evaluator.checkpoint_id, threat.key)
    curves = store.curves(evaluator.checkpoint_id, evaluator.seed)
    points = store.evaluations([eid for pts in curves.values() for _, eid in pts])
    recs = records(store, ([clean] if clean else []) + attacks + list(points.values()))
    ctx = CheckContext(evaluator.model, samples.x, samples.y, threat, evaluator.data.num_classes,
                       unbounded_eps(threat, evaluator.data.input_shape),
                       clean=recs[clean.evaluation_id] if clean else None,
                       attacks=[recs[e.evaluation_id] for e in attacks],
                       curves={name: [(x, recs[eid]) for x, eid in pts] for name, pts in curves.items()})
    inputs = {"samples": samples.digest, "clean": clean.evaluation_id if clean else None,
              "attacks": [e.evaluation_id for e in attacks], "curves": curves}
    return ctx, hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16], samples


def revisions() -> dict[str, int]:
    """Every registered check's revision: part of a suite's checks and adaptive jobs, so that a
    new or changed check makes them run again (and recompute what it changed)."""
    return {name: CHECKS.get(name).revision for name in CHECKS.names()}


def run_checks(evaluator: "Evaluator", samples: "SampleSet") -> dict[str, CheckResult] | None:
    """Run the registered checks on the checkpoint's stored results and store them: every check
    with `force`, else those not stored with their current revision and these inputs. Returns
    their results, or None when there was none to run."""
    store, threat = evaluator.store, evaluator.threat
    ctx, inputs, _ = build_context(evaluator, samples)
    stored = {row.name: row for row in store.stored_checks(evaluator.checkpoint_id, threat.key)}
    names = [name for name in CHECKS.names() if evaluator.force or name not in stored
             or stored[name].revision != CHECKS.get(name).revision or stored[name].inputs_hash != inputs]
    if not names:
        return None
    results = {}
    for name in names:
        try:
            with fork_rng(evaluator.device), evaluator.backends():
                torch.manual_seed(evaluator.seed)
                results[name] = CHECKS.get(name)().run(ctx)
        except Exception as exc:  # a broken check must not hide the others: it is recorded as not run
            results[name] = not_run(f"the check raised {type(exc).__name__}: {exc}")
    prov = provenance(evaluator.device, {"checkpoint": evaluator.checkpoint, "checks": names}, evaluator.seed)
    store.replace_checks(evaluator.checkpoint_id, threat.key, [
        SanityCheck(norm=threat.norm, eps=threat.eps, name=name, revision=CHECKS.get(name).revision,
                    inputs_hash=inputs, status=r.status, value=_finite(r.value), threshold=_finite(r.threshold),
                    summary=r.summary, evidence=r.evidence, **prov) for name, r in results.items()])
    counts = {st: [n for n, r in results.items() if r.status == st] for st in STATUSES}
    flagged = "; ".join(f"{st}: {', '.join(counts[st])}" for st in ("fail", "warn") if counts[st])
    evaluator.log(f"  sanity       {len(counts['pass'])} pass, {len(counts['warn'])} warn, {len(counts['fail'])} fail, "
                  f"{len(counts['not-run'])} not run" + (f" ({flagged})" if flagged else ""))
    return results


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)
