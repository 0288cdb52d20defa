"""How long a suite's jobs will take on this device, and where a run of them stands.

The estimate, printed before any work, sums over the jobs still to do:
- train: the defense's optimization step timed here (`bench.app.perf_train.StepLoop`: the run's
  model, batch, autocast and fast path, random data of the dataset's shape, untrained stand-ins
  for the runs it trains on demand; the fastest of 3 steps after a warm-up) × steps per epoch ×
  the epochs left,
  plus each epoch's validation (PGD-`val_steps` on the validation samples) at the measured pass rates;
- evaluate, curves: the passes per sample when no sample is ever fooled (for an attack: counted by
  running it on a stand-in model that no point of the pixel cube can fool; for the curves: from
  their settings) × the samples × the seconds per forward and per backward sample-pass of the
  checkpoint's architecture, timed here at the evaluation batch. An upper bound: most attacks stop
  on a sample once it is fooled;
- plant, checks, report: seconds; not counted;
then divides by the number of workers. Everything is timed with the workers' intra-op thread count
(`bench.app.runner.worker_threads`): on a busy CPU more threads can time a small model's step a
hundred times slower than the one thread a worker then uses. While the jobs run, the ETA rescales
the estimate of the jobs left by the elapsed time over the estimate of the jobs this run has
finished (so it learns how far the upper bound is from this suite's models), and each progress
line gives the jobs done out of the total and the mean time per job.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn as nn

from bench.app.perf_train import StepLoop, timed
from bench.app.plan import run_spec
from bench.core.attack import EvalContext
from bench.core.data import Dataset, load_dataset
from bench.core.models import build_model
from bench.core.rng import fork_rng
from bench.engine.curves import CurveSettings, default_eps_grid
from bench.engine.evaluation import CLEAN, AttackSpec, auto_batch_size, run_attack
from bench.engine.fastpath import FastPath
from bench.engine.runspec import RunSpec
from bench.store import Store
from bench.store.schema import Job

COUNT_SAMPLES = 2   # samples an attack's passes are counted on
CPU_BATCH = 128     # the largest batch pass rates are timed at on the CPU
MARGIN = 1e4        # the stand-in's lead of class 0: more than any linear term over the pixel cube


def duration(seconds: float) -> str:
    """"2h05m", "7m30s", "12s"."""
    seconds = max(0.0, seconds)
    if seconds >= 3600:
        return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"
    if seconds >= 60:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{seconds:.0f}s"


class Unfoolable(nn.Module):
    """Logits leading with class 0 by MARGIN plus a linear term bounded by 1 on [0, 1]^d: no
    perturbation inside the pixel cube changes its prediction, and its input gradient is not zero,
    so an attack run on it with labels 0 spends its whole budget on every sample."""

    def __init__(self, input_shape, num_classes: int):
        super().__init__()
        d = math.prod(input_shape)
        self.linear = nn.Linear(d, num_classes)
        with torch.no_grad():
            self.linear.weight.uniform_(-1 / d, 1 / d)
            self.linear.bias.zero_()
            self.linear.bias[0] = MARGIN

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


@dataclass
class Rates:
    """Seconds per forward and per backward sample-pass of one architecture at one batch."""

    model: str
    forward: float
    backward: float
    batch: int


@dataclass
class Estimate:
    """Seconds per job (by job id) and what they came from."""

    seconds: dict[int, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    workers: int = 1

    def total(self, ids: Sequence[int] | None = None) -> float:
        return sum(self.seconds.get(i, 0.0) for i in (self.seconds if ids is None else ids))


class Estimator:
    """Measures what the estimate needs on `device`, once per model, defense and attack."""

    def __init__(self, data: Dataset, device: torch.device, fast: FastPath):
        self.data, self.device, self.fast = data, device, fast
        self._models: dict[str, nn.Module] = {}
        self._rates: dict[str, Rates] = {}
        self._passes: dict[str, tuple[float, float]] = {}

    def rates(self, run: RunSpec, batch: int | str) -> Rates:
        """The forward and backward sample-pass times of the run's architecture (random weights, eval
        mode) at `batch` ("auto" resolved as the evaluation resolves it), measured once per batch."""
        name = repr((run.model, sorted(run.model_params.items())))
        if name not in self._models:
            torch.manual_seed(0)
            model = build_model(run.model, num_classes=self.data.num_classes, input_shape=self.data.input_shape,
                                mean=self.data.mean, std=self.data.std, **run.model_params).to(self.device).eval()
            if self.fast.channels_last:
                model.to(memory_format=torch.channels_last)
            self._models[name] = model
        model = self._models[name]
        size = auto_batch_size(model, self.data.input_shape, self.device) if batch == "auto" else batch
        size = min(size, CPU_BATCH) if self.device.type == "cpu" else size  # per-sample cost ~flat there
        key = f"{name} {size}"
        if key not in self._rates:
            x = torch.rand(size, *self.data.input_shape, device=self.device)
            with self.fast.backends(self.device):
                forward = self._time(lambda: model(x), no_grad=True) / size
                both = self._time(lambda: torch.autograd.grad(model(x.requires_grad_(True)).sum(), x)) / size
            self._rates[key] = Rates(run.model, forward, max(both - forward, 0.0), size)
        return self._rates[key]

    def _time(self, work: Callable, no_grad: bool = False, repeats: int = 3) -> float:
        """The fastest of `repeats` calls after a warm-up call."""
        best = math.inf
        with torch.set_grad_enabled(not no_grad):
            for k in range(repeats + 1):
                self._sync()
                start = time.perf_counter()
                work()
                self._sync()
                best = min(best, time.perf_counter() - start) if k else best
        return best

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step_seconds(self, run: RunSpec) -> float:
        """Seconds of one optimization step of the run's defense on this device."""
        shape_data = load_dataset("synthetic", n_train=4 * run.train.batch_size, n_val=1, n_test=1,
                                  num_classes=self.data.num_classes, shape=list(self.data.input_shape))
        loop = StepLoop("estimate", run.defense, run.defense_params, run.model, run.model_params, shape_data,
                        run.train.batch_size, self.device, self.fast, threat=run.threat, train=run.train,
                        amp=run.train.amp and self.device.type == "cuda", pretrained_train=run.pretrained_train)
        loop.prepare()
        with self.fast.backends(self.device):
            timed(loop, 0, 1)
            return min(timed(loop, i, 1) for i in range(1, 4))  # the fastest of 3 steps after a warm-up

    def attack_passes(self, spec: AttackSpec) -> tuple[float, float]:
        """Forward and backward passes per sample of the attack when no sample is ever fooled."""
        key = repr((spec.attack, sorted(spec.params.items(), key=str)))
        if key not in self._passes:
            if spec.attack == CLEAN:
                self._passes[key] = (1.0, 0.0)
            else:
                standin = Unfoolable(self.data.input_shape, self.data.num_classes)
                attack = spec.build()
                attack.prepare(EvalContext(self.data, torch.device("cpu"), lambda *args, **kwargs: standin))
                x = torch.rand(COUNT_SAMPLES, *self.data.input_shape)
                y = torch.zeros(COUNT_SAMPLES, dtype=torch.long)
                threads = torch.get_num_threads()
                torch.set_num_threads(1)  # tiny tensors: one thread is fastest (RayS' 40,000 queries in seconds)
                try:
                    result = run_attack(standin, attack, x, y, COUNT_SAMPLES, seed=0)
                finally:
                    torch.set_num_threads(threads)
                self._passes[key] = (result.forward / COUNT_SAMPLES, result.backward / COUNT_SAMPLES)
        return self._passes[key]

    def curve_passes(self, settings: CurveSettings, run: RunSpec) -> tuple[float, float]:
        """Forward and backward passes per sample of every curve, when no sample is ever fooled."""
        grid = len(settings.eps) or len(default_eps_grid(run.threat, self.data.input_shape))
        top_steps, top_restarts = max(settings.steps), max(settings.restarts)
        forward = 1 + grid * 2 + grid * (settings.eps_steps + 1) + top_steps + len(settings.steps) + 1 \
            + top_restarts * (settings.restart_steps + 1) + len(settings.restarts)
        backward = grid + grid * settings.eps_steps + top_steps + top_restarts * settings.restart_steps
        return float(forward), float(backward)


def estimate(jobs: Sequence[Job], data: Dataset, store: Store, device: torch.device, fast: FastPath,
             workers: int = 1, threads: int | None = None) -> Estimate:
    """Seconds per job still to do (see the module docstring), timed with each worker's intra-op
    `threads` (None: this process' setting); a job that cannot be estimated counts 0 s, with a note."""
    runs = {spec.run_id: spec for spec in (run_spec(j.payload["run"]) for j in jobs if j.kind == "train")}
    estimator, out = Estimator(data, device, fast), Estimate(workers=workers)
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        _estimate_jobs(jobs, runs, estimator, store, device, out)
    finally:
        torch.set_num_threads(previous)
    out.notes[:0] = [f"{r.model}: {1 / max(r.forward, 1e-12):,.0f} forward and {1 / max(r.forward + r.backward, 1e-12):,.0f} "
                     f"forward+backward sample-passes/s at batch {r.batch}" for r in estimator._rates.values()]
    return out


def _estimate_jobs(jobs: Sequence[Job], runs: dict[str, RunSpec], estimator: Estimator, store: Store,
                   device: torch.device, out: Estimate) -> None:
    with fork_rng(device):
        for job in jobs:
            if job.state == "done":
                continue
            try:
                seconds = _job_seconds(job, runs, estimator, store)
            except Exception as exc:  # an estimate must never stop the suite
                out.notes.append(f"no estimate for job {job.key}: {type(exc).__name__}: {str(exc)[:120]}")
                seconds = 0.0
            if seconds is not None:
                out.seconds[job.job_id] = seconds


def _job_seconds(job: Job, runs: dict[str, RunSpec], estimator: Estimator, store: Store) -> float | None:
    data, p = estimator.data, job.payload
    n_test = len(data.test_x)
    if job.kind == "train":
        run = run_spec(p["run"])
        record = store.run(run.run_id)
        left = max(run.train.epochs - ((record.epochs_done or 0) if record else 0), 0)
        rates = estimator.rates(run, 512)
        val = min(run.train.val_samples or len(data.val_x), len(data.val_x))
        validation = val * (run.train.val_steps * (rates.forward + rates.backward) + 2 * rates.forward)
        steps = math.ceil(len(data.train_x) / run.train.batch_size)
        return left * (steps * estimator.step_seconds(run) + validation) if left else 0.0
    if job.kind not in ("evaluate", "curves") or p["run_id"] not in runs:
        return None
    run = runs[p["run_id"]]
    rates = estimator.rates(run, p["batch_size"])
    n = min(p["n_samples"] or n_test, n_test)
    if job.kind == "evaluate":
        forward, backward = estimator.attack_passes(AttackSpec(p["label"], p["attack"], p["params"]))
    else:
        settings = CurveSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in p["curves"].items()})
        n = min(settings.n_samples or n, n)
        forward, backward = estimator.curve_passes(settings, run)
    return n * (forward * rates.forward + backward * rates.backward)


def describe(name: str, jobs: Sequence[Job], plan: Estimate) -> list[str]:
    """The lines printed before the work starts."""
    pending = [j for j in jobs if j.state != "done"]
    kinds: dict[str, list[int]] = {}
    for job in pending:
        kinds.setdefault(job.kind, []).append(job.job_id)
    lines = [(f"[{name}] estimated wall time: {duration(plan.total() / plan.workers)} for {len(pending)} jobs on "
              f"{plan.workers} worker(s) (training measured; evaluation an upper bound: every sample resisting every "
              "attack)")]
    for kind, ids in kinds.items():
        lines.append(f"  {kind:<9} {len(ids):4d} jobs  {duration(plan.total(ids)):>7}")
    lines += [f"  measured: {note}" for note in plan.notes]
    lines.append("  how: training = seconds per step timed here x steps (+ validation); evaluation = each attack's passes "
                 "when no sample is fooled x seconds per pass timed here; then divided among the workers, and while it "
                 "runs the ETA is rescaled by the measured time of the jobs done")
    return lines


class Progress:
    """A thread that polls the job table every `interval` seconds and prints a line whenever jobs
    finished: done / total, the mean time per job of this run, the elapsed time and the ETA."""

    def __init__(self, store: Store, among: Sequence[int], name: str, plan: Estimate, interval: float = 10.0,
                 log: Callable[[str], None] = print):
        self.store, self.among, self.name, self.plan = store, list(among), name, plan
        self.interval, self.log = interval, log
        self.before = {job.job_id for job in store.jobs(self.among) if job.state == "done"}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="progress", daemon=True)
        self.start_time = time.monotonic()
        self._reported = 0

    def __enter__(self) -> "Progress":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.report()

    def report(self) -> str | None:
        """Print (and return) a progress line when more jobs are done than at the last one."""
        jobs = self.store.jobs(self.among)
        done = {job.job_id for job in jobs if job.state in ("done", "failed")}
        now = done - self.before
        if len(now) <= self._reported:
            return None
        self._reported = len(now)
        elapsed = time.monotonic() - self.start_time
        left = [job.job_id for job in jobs if job.job_id not in done]
        spent = self.plan.total(list(now))
        remaining = self.plan.total(left)
        eta = remaining * elapsed / spent if spent > 0 else remaining / self.plan.workers
        line = (f"[{self.name}] {len(done)}/{len(jobs)} jobs done ({len(now)} in this run, "
                f"{duration(elapsed / len(now))} per job) · elapsed {duration(elapsed)} · ETA {duration(eta)}")
        self.log(line)
        return line
