"""Running a suite's job graph with a backend. The engines place the workers; the job table in the
store is the only scheduler:

- `local`: N worker processes on this machine (in-process when N = 1); on a GPU box one per
  visible GPU by default, on a CPU the cores divided between them;
- `ray`: N Ray tasks, each a worker (`num_gpus` per task, fractional for small evaluations);
  a local Ray by default, a cluster by `ray_address`;
- `slurm`: an array of N Slurm jobs through submitit, each a worker (`--gres=gpu:1`, partition,
  time, account); submitit's local executor where no Slurm is reachable (tests).

Every worker runs `bench.app.worker.work` on the same database URL and checkpoint root (a shared
filesystem across hosts), so the results do not depend on the backend or on the number of workers,
given the same device, CPU instruction set and intra-op thread count (`threads`).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.app.plan import plan_suite, run_spec
from bench.app.progress import Progress
from bench.app.suite import Suite
from bench.app.worker import Worker, mark_stored_jobs_done, work
from bench.core.data import Dataset
from bench.core.errors import BenchError
from bench.engine.fastpath import FastPath
from bench.engine.trainer import verify_checkpoints
from bench.store import Store

BACKENDS = ("local", "ray", "slurm")


@dataclass
class Options:
    """How a suite runs: where, on what, with how many workers."""

    db: str
    checkpoint_root: str = "checkpoints"
    device: str = "cpu"
    data_dir: str | None = None
    workers: int = 1
    threads: int | None = None  # intra-op threads per worker (None: the cores divided among the local workers)
    backend: str = "local"
    lease_seconds: float = 60.0
    ray_address: str | None = None
    gpus_per_worker: float = 1.0
    slurm: dict = field(default_factory=dict)  # partition, time (minutes), account, gres, folder
    fast: dict = field(default_factory=dict)  # fast-path overrides of each worker's device defaults


@dataclass
class Outcome:
    """What a run of the suite's jobs did."""

    jobs: int
    done_before: int
    ran: dict[str, int]        # kind -> jobs that computed something in this run
    failed: list[tuple[str, str]]  # (job key, error)
    blocked: int


def prepare(suite: Suite, data: Dataset, store: Store, options: Options, reports: str | None,
            force: bool) -> list[int]:
    """Plan the suite, check the checkpoints of its trained runs are the files training wrote (before
    anything is written), add its jobs to the store, and mark done those whose work the store
    already holds; returns the job ids."""
    specs = plan_suite(suite, data, reports)
    if not force:
        for spec in specs:
            if spec.kind == "train":
                verify_checkpoints(run_spec(spec.payload["run"]), options.checkpoint_root)
    ids = store.add_jobs(specs, force=force)
    worker = Worker(store, Path(options.checkpoint_root), torch.device(options.device), options.data_dir,
                    progress=False)
    worker.remember(data)
    mark_stored_jobs_done(worker, store.jobs(list(ids.values())))
    return list(ids.values())


def execute(store: Store, among: list[int], options: Options, progress: bool = True,
            monitor: Progress | None = None) -> Outcome:
    """Run the jobs with the chosen backend until none can run any more, `monitor` printing the
    suite's progress meanwhile; returns what happened."""
    if options.backend not in BACKENDS:
        raise BenchError(f"unknown backend {options.backend!r}; accepted: {', '.join(BACKENDS)}")
    before = store.jobs(among)
    tag = f"run-{uuid.uuid4().hex[:8]}:"  # the owner names of this run's workers start with it
    with monitor or contextlib.nullcontext():
        _run_backend(store, among, options, progress, tag)
    after = store.jobs(among)
    ran: dict[str, int] = {}
    for job in after:
        if job.did_work and (job.done_by or "").startswith(tag):
            ran[job.kind] = ran.get(job.kind, 0) + 1
    failed = [(job.key, job.error or "") for job in after if job.state == "failed"]
    return Outcome(len(after), sum(job.state == "done" for job in before), ran, failed,
                   sum(job.state == "pending" for job in after))


def worker_threads(options: Options) -> int | None:
    """Intra-op threads of each worker: `threads` when given; else torch's default for the one local
    worker (None), the cores divided among local worker processes (at least 1), 1 for Ray and Slurm."""
    if options.threads is not None or (options.backend == "local" and options.workers == 1):
        return options.threads
    if options.backend == "local":
        return max(1, (os.cpu_count() or 1) // options.workers)
    return 1


def _run_backend(store: Store, among: list[int], options: Options, progress: bool, tag: str) -> None:
    if options.backend == "local" and options.workers == 1:
        if options.threads is not None:
            torch.set_num_threads(options.threads)
        worker = Worker(store, Path(options.checkpoint_root), torch.device(options.device), options.data_dir, progress,
                        options.lease_seconds, fast=FastPath.default(options.device, options.fast))
        worker.owner = tag + worker.owner
        worker.run(among)
    elif options.backend == "local":
        _local_pool(among, options, progress, tag)
    elif options.backend == "ray":
        _ray(among, options, progress, tag)
    else:
        _slurm(among, options, progress, tag)


def _worker_args(among: list[int], options: Options, progress: bool, threads: int | None, device: str,
                 tag: str) -> tuple:
    return (options.db, options.checkpoint_root, device), dict(
        among=among, threads=threads, data_dir=options.data_dir, lease_seconds=options.lease_seconds, progress=progress,
        tag=tag, fast=options.fast)


def _local_pool(among: list[int], options: Options, progress: bool, tag: str) -> None:
    """N worker processes; on CUDA worker i uses GPU i mod the device count, on CPU each gets
    `threads` (default: the cores divided among them, at least 1)."""
    gpus = torch.cuda.device_count() if options.device.startswith("cuda") else 0
    threads = worker_threads(options)
    context = multiprocessing.get_context("spawn")
    processes = []
    for i in range(options.workers):
        device = f"cuda:{i % gpus}" if gpus else options.device
        args, kwargs = _worker_args(among, options, progress, threads, device, tag)
        processes.append(context.Process(target=_process_main, args=(args, kwargs), daemon=False))
    for p in processes:
        p.start()
    for p in processes:
        p.join()


def _process_main(args, kwargs) -> None:
    work(*args, **kwargs)


def _ray(among: list[int], options: Options, progress: bool, tag: str) -> None:
    try:
        import ray
    except ImportError:
        raise BenchError("the ray backend needs Ray: pip install 'atbench[ray]'") from None
    ray.init(address=options.ray_address, ignore_reinit_error=True, include_dashboard=False, log_to_driver=progress,
             **({} if options.ray_address else {"num_cpus": max(options.workers, os.cpu_count() or 1)}))
    gpus = options.gpus_per_worker if options.device.startswith("cuda") else 0
    remote = ray.remote(num_gpus=gpus, num_cpus=1, max_retries=0)(_ray_main)
    args, kwargs = _worker_args(among, options, progress, worker_threads(options),
                                "cuda" if options.device.startswith("cuda") else options.device, tag)
    try:
        ray.get([remote.remote(args, kwargs) for _ in range(options.workers)])
    finally:
        if options.ray_address is None:
            ray.shutdown()


def _ray_main(args, kwargs) -> int:
    return work(*args, **kwargs)


def _slurm(among: list[int], options: Options, progress: bool, tag: str) -> None:
    try:
        import submitit
    except ImportError:
        raise BenchError("the slurm backend needs submitit: pip install 'atbench[slurm]'") from None
    s = options.slurm
    folder = Path(s.get("folder", "slurm_logs"))
    executor = submitit.AutoExecutor(folder=folder, cluster=s.get("cluster"))
    parameters = {"timeout_min": int(s.get("time", 24 * 60)), "slurm_array_parallelism": options.workers}
    if executor.cluster == "slurm":
        parameters.update({f"slurm_{k}": v for k, v in (("partition", s.get("partition")),
                                                         ("account", s.get("account"))) if v})
        if options.device.startswith("cuda"):
            parameters["slurm_gres"] = s.get("gres", "gpu:1")
    else:  # submitit's local executor: no slurm_* parameters
        parameters = {"timeout_min": parameters["timeout_min"]}
    executor.update_parameters(**parameters)
    args, kwargs = _worker_args(among, options, progress, worker_threads(options),
                                "cuda" if options.device.startswith("cuda") else options.device, tag)
    jobs = executor.map_array(_slurm_main, [args] * options.workers, [kwargs] * options.workers)
    for job in jobs:
        job.result()


def _slurm_main(args, kwargs) -> int:
    return work(*args, **kwargs)

