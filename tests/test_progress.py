"""bench.app.progress: an attack's passes are counted at its whole budget on a model nothing fools,
every pending job of a suite gets an estimate before any work, progress lines give done / total,
time per job and an ETA rescaled by the measured time."""

from __future__ import annotations

import os

import pytest
import torch

from bench.app.progress import Estimate, Estimator, Progress, Unfoolable, describe, duration, estimate
from bench.app.runner import Options, prepare, worker_threads
from bench.app.suite import load_suite, load_suite_data
from bench.core.data import load_dataset
from bench.engine.evaluation import AttackSpec
from bench.engine.fastpath import FastPath
from bench.store import Store
from test_jobs import TINY


@pytest.fixture(scope="module")
def estimator():
    return Estimator(load_dataset("synthetic", n_train=64, n_val=16, n_test=16, num_classes=10, shape=[3, 8, 8]),
                     torch.device("cpu"), FastPath())


def test_nothing_in_the_pixel_cube_fools_the_stand_in():
    model = Unfoolable((3, 8, 8), 10)
    corners = torch.randint(0, 2, (256, 3, 8, 8)).float()
    assert (model(corners).argmax(1) == 0).all() and (model(torch.rand(64, 3, 8, 8)).argmax(1) == 0).all()


@pytest.mark.parametrize("attack, params, passes", [
    ("fgsm", {}, (2, 1)),                                   # one step, then the evaluation's forward
    ("pgd", {"steps": 5}, (6, 5)),
    ("pgd", {"steps": 5, "restarts": 3}, (19, 15)),         # every restart runs: nothing is ever fooled
    ("rays", {"queries": 100, "early_stop": True}, (101, 0)),
])
def test_attack_passes_are_its_whole_budget(estimator, attack, params, passes):
    spec = AttackSpec(attack, attack, {"norm": "Linf", "eps": 8 / 255, **params})
    assert estimator.attack_passes(spec) == passes


def test_every_pending_job_of_a_suite_is_estimated_before_work(tmp_path):
    suite = load_suite(TINY)
    data = load_suite_data(suite)
    store = Store(str(tmp_path / "r.db"))
    among = prepare(suite, data, store, Options(db=str(tmp_path / "r.db"), checkpoint_root=str(tmp_path)), None, False)
    jobs = store.jobs(among)
    plan = estimate(jobs, data, store, torch.device("cpu"), FastPath(), workers=2)
    for job in jobs:
        if job.kind in ("train", "evaluate", "curves"):
            assert plan.seconds[job.job_id] > 0, job.key
    assert not any(note.startswith("no estimate") for note in plan.notes)
    lines = describe("tiny", jobs, plan)
    assert lines[0].startswith(f"[tiny] estimated wall time: {duration(plan.total() / 2)} for {len(jobs)} jobs on 2")
    assert any(line.startswith("  how:") for line in lines)


def test_the_estimate_is_timed_with_the_workers_threads(tmp_path, monkeypatch):
    """`bench run --threads 1` times its estimate with 1 intra-op thread, as its workers run (on a
    busy CPU, 2 threads time a small CNN's step up to 100x slower), and leaves the process' setting."""
    suite = load_suite(TINY)
    data = load_suite_data(suite)
    store = Store(str(tmp_path / "r.db"))
    among = prepare(suite, data, store, Options(db=str(tmp_path / "r.db"), checkpoint_root=str(tmp_path)), None, False)
    seen = []
    monkeypatch.setattr(Estimator, "step_seconds", lambda self, run: seen.append(torch.get_num_threads()) or 1.0)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        estimate(store.jobs(among), data, store, torch.device("cpu"), FastPath(), threads=1)
        assert seen and set(seen) == {1} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_worker_threads_follow_the_backend():
    assert worker_threads(Options(db="x", checkpoint_root="y")) is None  # one local worker: torch's default
    assert worker_threads(Options(db="x", checkpoint_root="y", threads=3, workers=2)) == 3
    assert worker_threads(Options(db="x", checkpoint_root="y", workers=2)) == max(1, (os.cpu_count() or 1) // 2)
    assert worker_threads(Options(db="x", checkpoint_root="y", workers=4, backend="ray")) == 1


def test_progress_lines_count_jobs_and_rescale_the_eta(tmp_path):
    suite = load_suite(TINY)
    store = Store(str(tmp_path / "r.db"))
    among = prepare(suite, load_suite_data(suite), store, Options(db=str(tmp_path / "r.db"),
                                                                   checkpoint_root=str(tmp_path)), None, False)
    plan = Estimate({job_id: 10.0 for job_id in among})
    lines = []
    progress = Progress(store, among, "tiny", plan, log=lines.append)
    assert progress.report() is None  # nothing finished yet
    progress.start_time -= 30  # 30 s spent on the first two jobs, estimated 10 s each
    for job_id in among[:2]:
        store.finish_job(job_id, "test", state="done")
    line = progress.report()
    assert line.startswith(f"[tiny] 2/{len(among)} jobs done (2 in this run, 15s per job) · elapsed 30s")
    assert line.endswith(f"ETA {duration(10.0 * (len(among) - 2) * 30 / 20)}")
    assert progress.report() is None and lines == [line]


def test_durations_read_well():
    assert [duration(s) for s in (12, 450, 7500)] == ["12s", "7m30s", "2h05m"]
