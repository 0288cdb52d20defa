"""Curves of one checkpoint, each point an evaluation (so it keeps its per-sample results and the
sanity checks can pair samples across points):

- `eps:fgsm`, `eps:pgd`: accuracy and mean cross-entropy against eps, on a grid that ends at an
  eps that lets an attack reach any image (Linf 1; L2 the diameter of the pixel cube);
- `steps:pgd`: accuracy against PGD steps at one fixed step size. PGD-t is the first t steps of
  PGD-T from the same start, so one trajectory of max(steps) gives every point, exactly as separate
  runs would (same seeds, same batches); it also records the per-sample loss trace;
- `restarts:pgd`: accuracy against PGD restarts. PGD with r restarts is the first r restarts of
  one run with more, so one run of max(restarts) gives every point.

Points that coincide with stored evaluations (an attack of the suite, an earlier curve) are reused.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from sqlalchemy import select

from attacks.fgsm import FGSM
from attacks.pgd import PGD, ce_loss, pgd, random_start
from bench.counting import count_passes
from bench.errors import BenchError
from bench.evaluation import CLEAN, AttackResult, Evaluator, SampleSet, batch_seed, thin
from bench.models import eval_mode
from bench.provenance import provenance
from bench.store import Curve, CurvePoint
from bench.threat import ThreatModel

EPS_MULTIPLES = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)
CONVERGENCE_WINDOW = 0.1   # the last 10% of a trajectory's iterations ...
CONVERGENCE_GAIN = 0.01    # ... raising a still-robust sample's best loss by more than 1% = not converged


@dataclass(frozen=True)
class CurveSettings:
    """Which curves to compute, on the first `n_samples` of the evaluation subset (None: all).
    `eps` empty means `default_eps_grid`. The steps curve uses a step of `step_fraction`·eps (0.025:
    PGD-100's default 2.5·eps/100, so its point at 100 steps is the suite's PGD-100). In a suite,
    `checkpoints` says which of its evaluated checkpoints get curves."""

    n_samples: int | None = 200
    eps: tuple[float, ...] = ()
    eps_steps: int = 20
    steps: tuple[int, ...] = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
    step_fraction: float = 0.025
    restarts: tuple[int, ...] = (1, 2, 5, 10)
    restart_steps: int = 20
    checkpoints: tuple[str, ...] = ("best", "last")

    def __post_init__(self):
        if any(e <= 0 or not math.isfinite(e) for e in self.eps):
            raise BenchError(f"curve eps values must be positive numbers, got {list(self.eps)}")
        if not self.steps or min(self.steps) < 1 or not self.restarts or min(self.restarts) < 1:
            raise BenchError(f"curve steps and restarts must be lists of integers >= 1, got "
                             f"{list(self.steps)} and {list(self.restarts)}")
        if self.eps_steps < 1 or self.restart_steps < 1 or not self.step_fraction > 0:
            raise BenchError("curve eps_steps and restart_steps must be >= 1 and step_fraction > 0")


def unbounded_eps(threat: ThreatModel, input_shape) -> float:
    """The eps at which the ball covers the whole pixel cube [0, 1]^d."""
    return 1.0 if threat.norm == "Linf" else math.sqrt(math.prod(input_shape))


def default_eps_grid(threat: ThreatModel, input_shape) -> list[float]:
    """Multiples of the threat eps (¼ … 4×) below the unbounded eps, then the unbounded eps."""
    top = unbounded_eps(threat, input_shape)
    grid = {round(m * threat.eps, 10) for m in EPS_MULTIPLES if 0 < m * threat.eps < top}
    return sorted(grid) + [top]


def compute_curves(evaluator: Evaluator, settings: CurveSettings) -> dict[str, int]:
    """Compute (or find) every curve of the checkpoint and store them; returns {curve name: curve_id}."""
    threat, samples = evaluator.threat, evaluator.samples(settings.n_samples)
    clean = evaluator.evaluate(CLEAN, CLEAN, None, samples, role="curve").evaluation_id
    grid = list(settings.eps) or default_eps_grid(threat, evaluator.data.input_shape)
    curves = {}
    for name, make in (("fgsm", lambda e: FGSM(norm=threat.norm, eps=e)),
                       ("pgd", lambda e: PGD(norm=threat.norm, eps=e, steps=settings.eps_steps))):
        points = {0.0: clean}
        for eps in grid:
            points[eps] = evaluator.evaluate(f"{name}@{eps:g}", name, make(eps), samples, role="curve").evaluation_id
        curves[f"eps:{name}"] = _save_curve(evaluator, f"eps:{name}", "eps", samples, points)
    curves["steps:pgd"] = _save_curve(evaluator, "steps:pgd", "steps", samples, _steps_points(evaluator, settings, samples))
    curves["restarts:pgd"] = _save_curve(evaluator, "restarts:pgd", "restarts", samples,
                                         _restart_points(evaluator, settings, samples))
    evaluator.log(f"  curves       {len(curves)} on {len(samples)} samples (eps grid {', '.join(f'{e:g}' for e in grid)})")
    return curves


def _steps_points(evaluator: Evaluator, settings: CurveSettings, samples: SampleSet) -> dict[float, int]:
    threat = evaluator.threat
    attacks = {t: PGD(norm=threat.norm, eps=threat.eps, steps=t, step_size=settings.step_fraction * threat.eps)
               for t in sorted(set(settings.steps))}
    stored = _stored(evaluator, attacks, samples)
    if len(stored) == len(attacks):
        return stored
    results, diagnostics = _trajectory(evaluator, samples, attacks)
    return {t: stored.get(t) or evaluator.save(f"pgd{t}@step", "pgd", a.params(), a.implementation_id, results[t],
                                               samples, "curve", diagnostics[t], threat.norm, threat.eps)
            for t, a in attacks.items()}


def _restart_points(evaluator: Evaluator, settings: CurveSettings, samples: SampleSet) -> dict[float, int]:
    threat = evaluator.threat
    attacks = {r: PGD(norm=threat.norm, eps=threat.eps, steps=settings.restart_steps, restarts=r)
               for r in sorted(set(settings.restarts))}
    stored = _stored(evaluator, attacks, samples)
    if len(stored) == len(attacks):
        return stored
    results = _restarts(evaluator, samples, attacks)
    return {r: stored.get(r) or evaluator.save(f"pgd×{r}", "pgd", a.params(), a.implementation_id, results[r], samples,
                                               "curve", {"computed_with": f"one run of {max(attacks)} restarts"},
                                               threat.norm, threat.eps)
            for r, a in attacks.items()}


def _stored(evaluator: Evaluator, attacks: dict[int, PGD], samples: SampleSet) -> dict[float, int]:
    found = {k: evaluator.find("pgd", a.params(), a.implementation_id, samples) for k, a in attacks.items()}
    return {k: row.evaluation_id for k, row in found.items() if evaluator.reusable(row)}


def _trajectory(evaluator: Evaluator, samples: SampleSet, attacks: dict[int, PGD]):
    """Run PGD for max(steps), batch by batch as run_attack would (same seeds), recording the
    result after each requested step count, and the per-sample cross-entropy at every iterate."""
    model, n = evaluator.model, len(samples)
    record, total = set(attacks), max(attacks)
    step_size, threat = attacks[total].step_size, evaluator.threat
    correct = {t: [] for t in record}
    losses = {t: [] for t in record}
    spent = {t: [0, 0, 0.0] for t in record}
    traces = []
    with torch.random.fork_rng(devices=[evaluator.device] if evaluator.device.type == "cuda" else []), \
            eval_mode(model), count_passes(model) as counter:
        for i in range(0, n, evaluator.batch_size):
            x, y = samples.x[i:i + evaluator.batch_size], samples.y[i:i + evaluator.batch_size]
            torch.manual_seed(batch_seed(evaluator.seed, i))
            x_adv = random_start(x, threat.norm, threat.eps)
            trace = []
            start = time.perf_counter()
            for t in range(1, total + 1):
                x_adv = pgd(model, x, lambda z: ce_loss(z, y), eps=threat.eps, norm=threat.norm, steps=1,
                            step_size=step_size, x_init=x_adv, observe=lambda z, loss: trace.append(loss.detach()))
                if t in record:
                    with torch.no_grad():
                        logits = model(x_adv)
                    correct[t].append((logits.argmax(1) == y).cpu())
                    losses[t].append(F.cross_entropy(logits, y, reduction="none").cpu())
                    spent[t][0] += counter.forward
                    spent[t][1] += counter.backward
                    spent[t][2] += time.perf_counter() - start
            with torch.no_grad():
                trace.append(F.cross_entropy(model(x_adv), y, reduction="none"))
            traces.append(torch.stack(trace).cpu())
            counter.forward = counter.backward = 0
    trace = torch.cat(traces, dim=1)  # (total + 1, n): the loss at the start and after every step
    results = {t: AttackResult(torch.cat(correct[t]), None, torch.cat(losses[t]), None, None, int(spent[t][0]),
                               int(spent[t][1]), spent[t][2]) for t in record}
    diagnostics = {t: {"computed_with": f"one trajectory of {total} steps (passes include its recording forwards)"}
                   for t in record}
    diagnostics[total].update(_convergence(trace, results[total].correct, samples))
    return results, diagnostics


def _convergence(trace: torch.Tensor, robust: torch.Tensor, samples: SampleSet) -> dict:
    """Incomplete optimization (Pintor et al. 2022): among the samples still robust at the end, those
    whose best loss rose by more than CONVERGENCE_GAIN (relative) over the last CONVERGENCE_WINDOW
    of the iterations: more steps would likely have helped the attack."""
    total = trace.shape[0] - 1
    cut = total - max(1, int(round(CONVERGENCE_WINDOW * total)))
    before = trace[:cut + 1].amax(0)
    after = trace.amax(0)
    gain = (after - before) / before.abs().clamp_min(1e-12)
    improving = (gain > CONVERGENCE_GAIN) & robust
    return {"loss_trace": thin(trace.mean(1).tolist()), "robust_at_end": int(robust.sum()),
            "not_converged": int(improving.sum()),
            "not_converged_indices": [samples.indices[i] for i in improving.nonzero().flatten().tolist()],
            "convergence_rule": f"best loss up >{CONVERGENCE_GAIN:.0%} in the last {CONVERGENCE_WINDOW:.0%} of {total} steps"}


def _restarts(evaluator: Evaluator, samples: SampleSet, attacks: dict[int, PGD]) -> dict[int, AttackResult]:
    """Run PGD with max(restarts), batch by batch as run_attack would, recording the result after
    each requested restart count (PGD keeps, per sample, the first restart that fools the model)."""
    model, n = evaluator.model, len(samples)
    record, total = set(attacks), max(attacks)
    one = attacks[total]
    c = one.config
    correct = {r: [] for r in record}
    losses = {r: [] for r in record}
    spent = {r: [0, 0, 0.0] for r in record}
    with torch.random.fork_rng(devices=[evaluator.device] if evaluator.device.type == "cuda" else []), \
            eval_mode(model), count_passes(model) as counter:
        for i in range(0, n, evaluator.batch_size):
            x, y = samples.x[i:i + evaluator.batch_size], samples.y[i:i + evaluator.batch_size]
            torch.manual_seed(batch_seed(evaluator.seed, i))
            best, fooled = x.clone(), torch.zeros(len(x), dtype=torch.bool, device=x.device)
            start = time.perf_counter()
            for r in range(1, total + 1):
                if not bool(fooled.all()):
                    x_adv = pgd(model, x, lambda z: ce_loss(z, y), eps=c.eps, norm=c.norm, steps=c.steps,
                                step_size=one.step_size, x_init=random_start(x, c.norm, c.eps))
                    with torch.no_grad():
                        now = model(x_adv).argmax(1) != y
                    best[~fooled] = x_adv[~fooled]
                    fooled |= now
                if r in record:
                    with torch.no_grad():
                        correct[r].append((~fooled).cpu())
                        losses[r].append(F.cross_entropy(model(best), y, reduction="none").cpu())
                    spent[r][0] += counter.forward
                    spent[r][1] += counter.backward
                    spent[r][2] += time.perf_counter() - start
            counter.forward = counter.backward = 0
    return {r: AttackResult(torch.cat(correct[r]), None, torch.cat(losses[r]), None, None, int(spent[r][0]),
                            int(spent[r][1]), spent[r][2]) for r in record}


def _save_curve(evaluator: Evaluator, name: str, x_label: str, samples: SampleSet, points: dict[float, int]) -> int:
    """Create or update the curve row and point it at these evaluations."""
    store = evaluator.store
    with store.session() as s:
        curve = s.scalar(select(Curve).where(Curve.checkpoint_sha256 == evaluator.sha, Curve.name == name,
                                             Curve.indices_hash == samples.digest, Curve.seed == evaluator.seed))
        if curve is None:
            curve = Curve(checkpoint_sha256=evaluator.sha, name=name, indices_hash=samples.digest, x_label=x_label)
            s.add(curve)
        for key, value in provenance(evaluator.device, {"curve": name, "checkpoint": evaluator.checkpoint},
                                     evaluator.seed).items():
            setattr(curve, key, value)
        curve.points = [CurvePoint(x=float(x), evaluation_id=eid) for x, eid in sorted(points.items())]
        s.flush()
        return curve.curve_id
