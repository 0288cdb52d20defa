"""Curves of one checkpoint, each point an evaluation (so it keeps its per-sample results and the
sanity checks can pair samples across points):

- `eps:fgsm`, `eps:pgd`: accuracy and mean cross-entropy against eps, on a grid that ends at an
  eps that lets an attack reach any image (Linf 1; L2 the diameter of the pixel cube);
- `steps:pgd`: accuracy against PGD steps at one fixed step size. PGD-t is the first t steps of
  PGD-T from the same start, so one trajectory of max(steps) gives every point, exactly as separate
  runs would (same seeds, same batches); it also records the per-sample loss trace;
- `restarts:pgd`: accuracy against PGD restarts. PGD with r restarts is the first r restarts of
  one run with more (each restart after the first on the samples not fooled yet, as `pgd`), so
  one run of max(restarts) gives every point.

Points that coincide with stored evaluations (an attack of the suite, an earlier curve) are reused:
every point is stored as an evaluation of the registered `fgsm` or `pgd` attack with the parameters
it stands for, and the trajectories run the adversary library's loop that `pgd` runs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.adversary.ball import random_start
from bench.adversary.losses import ce_loss
from bench.adversary.pgd import best_of_restarts, pgd
from bench.core.attack import ATTACKS, Attack
from bench.core.config import require
from bench.core.errors import BenchError
from bench.core.models import eval_mode
from bench.core.rng import batch_seed, fork_rng
from bench.core.threat import ThreatModel
from bench.engine.counting import count_passes
from bench.engine.evaluation import CLEAN, AttackResult, Evaluator, SampleSet, thin, verdict
from bench.engine.evaluation import code_identity as evaluation_identity
from bench.engine.provenance import provenance

CURVE_ATTACKS = ("fgsm", "pgd")  # the eps curves' attacks (the steps and restarts curves run PGD)
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
        if not self.steps or not self.restarts:
            raise BenchError(f"curve steps and restarts must be non-empty lists, got {list(self.steps)} and "
                             f"{list(self.restarts)}")
        require(self, at_least_one=("n_samples", "eps_steps", "steps", "restarts", "restart_steps"),
                positive=("eps", "step_fraction"))


def code_identity(threat: ThreatModel) -> dict:
    """The code identity (`evaluation.code_identity`) of the attacks the curves run."""
    return {name: evaluation_identity(ATTACKS.get(name)(norm=threat.norm, eps=threat.eps)) for name in CURVE_ATTACKS}


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
    with evaluator.backends():
        return _compute_curves(evaluator, settings)


def _compute_curves(evaluator: Evaluator, settings: CurveSettings) -> dict[str, int]:
    threat, samples = evaluator.threat, evaluator.samples(settings.n_samples)
    clean = evaluator.evaluate(CLEAN, CLEAN, None, samples, role="curve").evaluation_id
    grid = list(settings.eps) or default_eps_grid(threat, evaluator.data.input_shape)
    fgsm, pgd_attack = (ATTACKS.get(name) for name in CURVE_ATTACKS)
    curves = {}
    for name, make in (("fgsm", lambda e: fgsm(norm=threat.norm, eps=e)),
                       ("pgd", lambda e: pgd_attack(norm=threat.norm, eps=e, steps=settings.eps_steps))):
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
    attacks = {t: ATTACKS.get("pgd")(norm=threat.norm, eps=threat.eps, steps=t,
                                     step_size=settings.step_fraction * threat.eps)
               for t in sorted(set(settings.steps))}
    stored = _stored(evaluator, attacks, samples)
    if len(stored) == len(attacks):
        return stored
    results, diagnostics = _trajectory(evaluator, samples, attacks)
    return {t: stored.get(t) or evaluator.save(f"pgd{t}@step", "pgd", a.params(), a.implementation_id, results[t],
                                               samples, "curve", diagnostics[t], threat)
            for t, a in attacks.items()}


def _restart_points(evaluator: Evaluator, settings: CurveSettings, samples: SampleSet) -> dict[float, int]:
    threat = evaluator.threat
    attacks = {r: ATTACKS.get("pgd")(norm=threat.norm, eps=threat.eps, steps=settings.restart_steps, restarts=r)
               for r in sorted(set(settings.restarts))}
    stored = _stored(evaluator, attacks, samples)
    if len(stored) == len(attacks):
        return stored
    results = _restarts(evaluator, samples, attacks)
    return {r: stored.get(r) or evaluator.save(f"pgd×{r}", "pgd", a.params(), a.implementation_id, results[r], samples,
                                               "curve", {"computed_with": f"one run of {max(attacks)} restarts"}, threat)
            for r, a in attacks.items()}


def _stored(evaluator: Evaluator, attacks: dict[int, Attack], samples: SampleSet) -> dict[float, int]:
    found = {k: evaluator.find("pgd", a.params(), a.implementation_id, samples) for k, a in attacks.items()}
    return {k: row.evaluation_id for k, row in found.items() if evaluator.reusable(row)}


class _Recorder:
    """Per-sample results and the passes and seconds spent up to chosen points of one run, batch
    by batch (the passes include the recording forwards)."""

    def __init__(self, points, counter):
        self.counter, self.start = counter, 0.0
        self.correct = {p: [] for p in points}
        self.losses = {p: [] for p in points}
        self.spent = {p: [0, 0, 0.0] for p in points}

    def record(self, point, logits: torch.Tensor, y: torch.Tensor, correct: torch.Tensor) -> None:
        self.correct[point].append(correct.cpu())
        self.losses[point].append(F.cross_entropy(logits, y, reduction="none").cpu())
        self.spent[point][0] += self.counter.forward
        self.spent[point][1] += self.counter.backward
        self.spent[point][2] += time.perf_counter() - self.start

    def results(self) -> dict:
        return {p: AttackResult(torch.cat(self.correct[p]), None, torch.cat(self.losses[p]), None, None,
                                int(self.spent[p][0]), int(self.spent[p][1]), self.spent[p][2]) for p in self.correct}


def _trajectory(evaluator: Evaluator, samples: SampleSet, attacks: dict[int, Attack]):
    """Run PGD for max(steps), batch by batch as run_attack would (same seeds), recording the
    result after each requested step count, and the per-sample cross-entropy at every iterate."""
    model, n = evaluator.model, len(samples)
    total = max(attacks)
    step_size, threat = attacks[total].step_size, evaluator.threat
    traces = []
    with fork_rng(evaluator.device), eval_mode(model), count_passes(model) as counter:
        recorder = _Recorder(attacks, counter)
        for i in range(0, n, evaluator.batch_size):
            x, y = samples.x[i:i + evaluator.batch_size], samples.y[i:i + evaluator.batch_size]
            torch.manual_seed(batch_seed(evaluator.seed, i))
            trace = []
            recorder.start = time.perf_counter()

            def after_step(t, x_t):
                if t in attacks:
                    with torch.no_grad():
                        logits, predicted = verdict(model, x_t, evaluator.draws)
                    recorder.record(t, logits, y, predicted == y)

            x_adv = pgd(model, x, lambda z: ce_loss(z, y), eps=threat.eps, norm=threat.norm, steps=total,
                        step_size=step_size, x_init=random_start(x, threat.norm, threat.eps),
                        observe=lambda z, loss: trace.append(loss.detach()), after_step=after_step)
            with torch.no_grad():
                trace.append(F.cross_entropy(model(x_adv), y, reduction="none"))
            traces.append(torch.stack(trace).cpu())
            counter.forward = counter.backward = 0
    trace = torch.cat(traces, dim=1)  # (total + 1, n): the loss at the start and after every step
    results = recorder.results()
    diagnostics = {t: {"computed_with": f"one trajectory of {total} steps (passes include its recording forwards)"}
                   for t in attacks}
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


def _restarts(evaluator: Evaluator, samples: SampleSet, attacks: dict[int, Attack]) -> dict[int, AttackResult]:
    """Run PGD with max(restarts), batch by batch as run_attack would, recording the result after
    each requested restart count (PGD keeps, per sample, the first restart that fools the model,
    and restarts only the samples not fooled yet)."""
    model, n = evaluator.model, len(samples)
    total = max(attacks)
    one = attacks[total]
    c = one.config
    with fork_rng(evaluator.device), eval_mode(model), count_passes(model) as counter:
        recorder = _Recorder(attacks, counter)
        for i in range(0, n, evaluator.batch_size):
            x, y = samples.x[i:i + evaluator.batch_size], samples.y[i:i + evaluator.batch_size]
            torch.manual_seed(batch_seed(evaluator.seed, i))
            recorder.start = time.perf_counter()

            def run(idx):
                xs, ys = (x, y) if idx is None else (x[idx], y[idx])
                return pgd(model, xs, lambda z: ce_loss(z, ys), eps=c.eps, norm=c.norm, steps=c.steps,
                           step_size=one.step_size, x_init=random_start(xs, c.norm, c.eps))

            def after_restart(r, best, fooled):
                if r in attacks:
                    with torch.no_grad():
                        if evaluator.draws == 1:
                            recorder.record(r, model(best), y, ~fooled)
                        else:  # a randomized model: the points judged as run_attack judges them
                            logits, predicted = verdict(model, best, evaluator.draws)
                            recorder.record(r, logits, y, predicted == y)

            best_of_restarts(model, x, y, run, total, after_restart)
            counter.forward = counter.backward = 0
    return recorder.results()


def _save_curve(evaluator: Evaluator, name: str, x_label: str, samples: SampleSet, points: dict[float, int]) -> int:
    """Create or update the curve row and point it at these evaluations."""
    return evaluator.store.save_curve(evaluator.checkpoint_id, name, x_label, samples.digest, evaluator.seed, points,
                                      provenance(evaluator.device, {"curve": name, "checkpoint": evaluator.checkpoint,
                                                                    "code": code_identity(evaluator.threat),
                                                                    "verdict_draws": evaluator.draws},
                                                 evaluator.seed))
