"""Workers: claim jobs from the store (`Store.claim_job`), run them with the engine, record the
outcome. Any number of workers, on one machine or many, share one store; a worker holds a lease
on the job it runs and renews it while it works, so a worker that dies (kill -9, a lost node)
loses its job to another once the lease expires. Every job is idempotent: training resumes from
its last epoch, an evaluation already stored is found, not recomputed.

A job that fails for a reason in its input (a `BenchError`: bad config, diverging loss) is marked
failed with its one-line error and not retried; any other exception releases it for another try
(three in all). Jobs that depend on a failed one are never run; unrelated ones go on.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from bench.app.plan import describe, run_spec
from bench.app.report import render_report
from bench.core.config import build_config
from bench.core.check import CHECKS
from bench.core.data import Dataset, eval_indices, load_dataset
from bench.core.errors import BenchError
from bench.core.planted import PLANTS
from bench.core.threat import ThreatModel
from bench.engine.adaptive import AdaptiveSettings, run_adaptive
from bench.engine.adaptive import revisions as remedy_revisions
from bench.engine.checkpoint import load_model, plant, sha256_file, stored_path
from bench.engine.curves import CurveSettings, compute_curves
from bench.engine.evaluation import CLEAN, AttackSpec, Evaluator, sample_digest, verdict_draws
from bench.engine.fastpath import FastPath
from bench.engine.provenance import provenance
from bench.engine.sanity import run_checks
from bench.engine.trainer import train
from bench.store import Store
from bench.store.schema import Job

LEASE_SECONDS = 60.0
MAX_ATTEMPTS = 3


@dataclass
class Worker:
    """Where a worker finds things: the store, the checkpoint root (a shared filesystem for workers
    on several hosts: checkpoints are found by run id under it), the device and the data folder."""

    store: Store
    checkpoint_root: Path
    device: torch.device
    data_dir: str | None = None
    progress: bool = True
    lease_seconds: float = LEASE_SECONDS
    log: Callable[[str], None] = print
    fast: FastPath | None = None  # None: the device's defaults
    owner: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}")
    _datasets: dict = field(default_factory=dict)
    _draws: dict = field(default_factory=dict)

    def dataset(self, name: str, options: dict) -> Dataset:
        """The dataset, loaded once per worker."""
        key = json.dumps([name, options], sort_keys=True)
        if key not in self._datasets:
            self._datasets[key] = load_dataset(name, data_dir=self.data_dir, **options)
        return self._datasets[key]

    def remember(self, data: Dataset) -> None:
        """Use this loaded dataset instead of loading it again."""
        self._datasets[json.dumps([data.name, data.options], sort_keys=True)] = data

    def checkpoint(self, run_id: str, kind: str) -> Path:
        return self.checkpoint_root / run_id / f"{kind}.pt"

    def verdict_draws(self, path: Path, data: Dataset) -> int:
        """`bench.engine.evaluation.verdict_draws` of a checkpoint, measured once per worker."""
        key = (str(path), json.dumps([data.name, data.options], sort_keys=True))
        if key not in self._draws:
            model, _ = load_model(path)
            fast = FastPath.default(self.device) if self.fast is None else self.fast
            with fast.backends(self.device):
                self._draws[key] = verdict_draws(model.to(self.device), data, self.device)
        return self._draws[key]

    def evaluator(self, job: Job) -> Evaluator:
        p = job.payload
        return Evaluator(self.store, self.checkpoint(p["run_id"], p["kind"]), self.dataset(p["dataset"], p["dataset_options"]),
                         seed=p["seed"], batch_size=p["batch_size"], device=self.device, force=job.force,
                         checkpoint_root=self.checkpoint_root, log=self.log if self.progress else lambda _: None,
                         fast=self.fast, draws=self.verdict_draws(self.checkpoint(p["run_id"], p["kind"]),
                                                                  self.dataset(p["dataset"], p["dataset_options"])))

    # ------------------------------------------------------------------ running jobs

    def run(self, among: Sequence[int] | None = None, poll_seconds: float = 1.0,
            on_done: Callable[[Job, str], None] | None = None) -> int:
        """Claim and run jobs (of `among`, or any) until none is left that could still run: all done,
        failed or waiting on a failed one. Waits while others run jobs that may unblock more.
        Returns how many jobs this worker ran."""
        ran = 0
        while True:
            job = self.store.claim_job(self.owner, self.lease_seconds, among, MAX_ATTEMPTS)
            if job is None:
                if not self.store.runnable_jobs_left(among):
                    return ran
                time.sleep(poll_seconds)
                continue
            state = self.execute(job)
            ran += 1
            if on_done is not None:
                on_done(job, state)

    def execute(self, job: Job) -> str:
        """Run one claimed job under a renewed lease and record its outcome; returns its new state."""
        if self.progress:
            self.log(f"[job {job.job_id}] {describe(job)}")
        stop = threading.Event()
        heartbeat = threading.Thread(target=self._renew, args=(job.job_id, stop), daemon=True)
        heartbeat.start()
        try:
            did_work = EXECUTORS[job.kind](self, job)
            state, error = "done", None
        except BenchError as exc:
            state, error = "failed", str(exc)
        except KeyboardInterrupt:
            stop.set()
            self.store.finish_job(job.job_id, self.owner, state="pending")
            raise
        except Exception as exc:  # a crash, not bad input: another try, up to MAX_ATTEMPTS
            error = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"
            state = "pending" if job.attempts < MAX_ATTEMPTS else "failed"
        finally:
            stop.set()
            heartbeat.join()
        self.store.finish_job(job.job_id, self.owner, state=state, did_work=state == "done" and did_work, error=error)
        if state != "done":
            self.log(f"  {describe(job)}: {'failed' if state == 'failed' else 'will be retried'}: {error}")
        return state

    def _renew(self, job_id: int, stop: threading.Event) -> None:
        while not stop.wait(self.lease_seconds / 4):
            if not self.store.renew_lease(job_id, self.owner, self.lease_seconds):
                return


# ---------------------------------------------------------------------- executors: job -> did it compute anything

def _train(w: Worker, job: Job) -> bool:
    spec = run_spec(job.payload["run"])
    result = train(spec, w.dataset(spec.dataset, spec.dataset_options), store=w.store, checkpoint_root=w.checkpoint_root,
                   device=w.device, force=job.force, progress=w.progress, fast=w.fast)
    return result.trained_now


def _plant(w: Worker, job: Job) -> bool:
    p = job.payload
    if p["plant"] not in PLANTS:
        raise BenchError(f"unknown plant {p['plant']!r}; accepted: {', '.join(PLANTS)}")
    source, path = w.checkpoint(p["run_id"], p["from"]), w.checkpoint(p["run_id"], f"planted-{p['plant']}")
    planted_now = job.force or not path.exists()
    if planted_now:
        plant(source, p["plant"], path)
    w.store.register_checkpoint(sha256_file(path), stored_path(path, w.checkpoint_root), provenance(w.device, {"plant": p["plant"], "from": p["from"]}, 0),
                                run_id=p["run_id"], epoch=load_model(path)[1]["epoch"], kind=f"planted-{p['plant']}")
    return planted_now


def _evaluate(w: Worker, job: Job) -> bool:
    p = job.payload
    evaluator = w.evaluator(job)
    attack = None if p["attack"] == CLEAN else AttackSpec(p["label"], p["attack"], p["params"]).build()
    if attack is not None:
        attack.threat.check_for(evaluator.data.input_shape)
    return not evaluator.evaluate(p["label"], p["attack"], attack, evaluator.samples(p["n_samples"])).cached


def _curves(w: Worker, job: Job) -> bool:
    evaluator = w.evaluator(job)
    compute_curves(evaluator, build_config(CurveSettings, job.payload["curves"], "curves"))
    return evaluator.computed > 0


def _checks(w: Worker, job: Job) -> bool:
    evaluator = w.evaluator(job)
    return run_checks(evaluator, evaluator.samples(job.payload["n_samples"])) is not None


def _adaptive(w: Worker, job: Job) -> bool:
    evaluator = w.evaluator(job)
    settings = build_config(AdaptiveSettings, job.payload["adaptive"], "adaptive")
    return run_adaptive(evaluator, evaluator.samples(job.payload["n_samples"]), settings) is not None


def _report(w: Worker, job: Job) -> bool:
    render_report(w.store, job.payload["out"])
    return True


EXECUTORS: dict[str, Callable[[Worker, Job], bool]] = {
    "train": _train, "plant": _plant, "evaluate": _evaluate, "curves": _curves, "checks": _checks,
    "adaptive": _adaptive, "report": _report}


# ---------------------------------------------------------------------- is a job's work already in the store?

def _train_stored(w: Worker, job: Job) -> bool:
    run_id = run_spec(job.payload["run"]).run_id
    run = w.store.run(run_id)
    return bool(run and run.status == "completed" and w.checkpoint(run_id, "best").exists()
                and w.checkpoint(run_id, "last").exists())


def _slot(w: Worker, job: Job):
    return w.store.run_checkpoints(job.payload["run_id"]).get(job.payload["kind"])


def _plant_stored(w: Worker, job: Job) -> bool:
    p = job.payload
    return f"planted-{p['plant']}" in w.store.run_checkpoints(p["run_id"]) and \
        w.checkpoint(p["run_id"], f"planted-{p['plant']}").exists()


def _evaluate_stored(w: Worker, job: Job) -> bool:
    p, slot = job.payload, _slot(w, job)
    if slot is None:
        return False
    attack = None if p["attack"] == CLEAN else AttackSpec(p["label"], p["attack"], p["params"]).build()
    data = w.dataset(p["dataset"], p["dataset_options"])
    draws = w.verdict_draws(w.checkpoint(p["run_id"], p["kind"]), data)
    row = w.store.find_evaluation(
        slot.checkpoint_id, p["attack"],
        Evaluator.config_hash(p["attack"], attack.params() if attack else {},
                              attack.implementation_id if attack else "atbench", draws),
        sample_digest(data, eval_indices(len(data.test_x), p["n_samples"])), p["seed"])
    return row is not None and row.role == "attack" and row.label == p["label"]


def _curves_stored(w: Worker, job: Job) -> bool:
    p, slot = job.payload, _slot(w, job)
    if slot is None:
        return False
    settings = build_config(CurveSettings, p["curves"], "curves")
    data = w.dataset(p["dataset"], p["dataset_options"])
    digest = sample_digest(data, eval_indices(len(data.test_x), settings.n_samples))
    curves = w.store.curves_on(slot.checkpoint_id, digest, p["seed"])
    sizes = {"steps:pgd": len(set(settings.steps)), "restarts:pgd": len(set(settings.restarts))}
    draws = w.verdict_draws(w.checkpoint(p["run_id"], p["kind"]), data)
    return len(curves) == 4 and all(len(curves[name][0]) == n for name, n in sizes.items()) \
        and all(c.get("code") == p["code"] and c.get("verdict_draws", 1) == draws for _, c in curves.values())


def _checks_stored(w: Worker, job: Job) -> bool:
    slot = _slot(w, job)
    if slot is None:
        return False
    _, meta = load_model(w.checkpoint(job.payload["run_id"], job.payload["kind"]))
    stored = {row.name: row.revision for row in w.store.stored_checks(slot.checkpoint_id,
                                                                      ThreatModel(meta["norm"], meta["eps"]).key)}
    return all(stored.get(name) == CHECKS.get(name).revision for name in CHECKS.names())


def _adaptive_stored(w: Worker, job: Job) -> bool:
    """Stored outcomes for exactly the flags that call for remedies, made with these settings and
    the remedies registered now, at their revisions."""
    slot = _slot(w, job)
    if slot is None:
        return False
    _, meta = load_model(w.checkpoint(job.payload["run_id"], job.payload["kind"]))
    threat = ThreatModel(meta["norm"], meta["eps"]).key
    warned = job.payload["adaptive"]["warned"]
    flags = sorted(row.name for row in w.store.stored_checks(slot.checkpoint_id, threat)
                   if row.status == "fail" or (warned and row.status == "warn"))
    stored = w.store.remedy_outcomes(slot.checkpoint_id, threat)
    return [r.check for r in stored] == flags and all(r.config.get("settings") == job.payload["adaptive"]
                                                      and r.config.get("revisions") == remedy_revisions()
                                                      for r in stored)


STORED: dict[str, Callable[[Worker, Job], bool]] = {
    "train": _train_stored, "plant": _plant_stored, "evaluate": _evaluate_stored, "curves": _curves_stored,
    "checks": _checks_stored, "adaptive": _adaptive_stored, "report": lambda w, job: False}


def mark_stored_jobs_done(w: Worker, jobs: Sequence[Job]) -> int:
    """Mark done the pending jobs (in dependency order, not forced) whose work the store already
    holds, once their dependencies are done; returns how many."""
    state = {job.job_id: job.state for job in jobs}
    marked = 0
    for job in jobs:
        if job.state == "pending" and not job.force and all(state.get(d) == "done" for d in job.depends) \
                and STORED[job.kind](w, job):
            w.store.finish_job(job.job_id, w.owner, state="done")
            state[job.job_id] = "done"
            marked += 1
    return marked


def work(db: str, checkpoint_root: str, device: str, *, among: Sequence[int] | None = None, threads: int | None = None,
         data_dir: str | None = None, lease_seconds: float = LEASE_SECONDS, progress: bool = True, tag: str = "",
         fast: dict | None = None) -> int:
    """One worker process (what `bench worker`, the local pool, Ray tasks and Slurm array jobs run):
    its own store connection, `threads` intra-op threads, an owner name starting with `tag`, the
    device's fast path with the `fast` overrides; returns how many jobs it ran."""
    if threads is not None:
        torch.set_num_threads(threads)
    worker = Worker(Store(db), Path(checkpoint_root), torch.device(device), data_dir, progress, lease_seconds,
                    fast=FastPath.default(device, fast))
    worker.owner = tag + worker.owner
    return worker.run(among)
