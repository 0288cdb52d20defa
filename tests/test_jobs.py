"""Jobs in the store and the workers that claim them, on SQLite and PostgreSQL alike: claims are
atomic across processes, a lost worker's lease expires and its job runs again, a job failing on
bad input is failed once and blocks only what depends on it; a suite planned as jobs gives the
same per-sample results with one worker or several, and two `bench run` of one suite at once do
each job once. (Ray, Slurm/submitit, kill -9 and many writers: tests/test_scale_out.py, slow.)"""

from __future__ import annotations

import multiprocessing
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from bench.store import JobSpec, Store

TINY = (Path(__file__).resolve().parent / "suites" / "tiny.toml").resolve()


def graph(n: int = 3) -> list[JobSpec]:
    """a → b → c (and n − 3 independent jobs after them)."""
    jobs = [JobSpec("a", "evaluate", 0, {}), JobSpec("b", "evaluate", 0, {}, ("a",)), JobSpec("c", "evaluate", 0, {}, ("b",))]
    return jobs + [JobSpec(f"x{i}", "evaluate", 0, {}) for i in range(n - 3)]


def test_a_job_runs_once_its_dependencies_are_done(db_url):
    store = Store(db_url)
    ids = store.add_jobs(graph(4))
    first = store.claim_job("w1", 60)
    assert first.key == "a" and first.state == "running" and first.attempts == 1
    second = store.claim_job("w2", 60)
    assert second.key == "x0"  # b waits for a
    assert store.claim_job("w3", 60) is None
    store.finish_job(first.job_id, "w1", state="done", did_work=True)
    assert store.claim_job("w3", 60).key == "b"
    assert store.add_jobs(graph(4)) == ids  # adding the same jobs again changes nothing
    assert {j.key: j.state for j in store.jobs()} == {"a": "done", "b": "running", "c": "pending", "x0": "running"}


def test_a_lost_worker_loses_its_job_when_the_lease_expires(db_url):
    store = Store(db_url)
    store.add_jobs([JobSpec("a", "train", 0, {})])
    job = store.claim_job("dead", 0.3)
    assert store.claim_job("alive", 60) is None  # leased
    time.sleep(0.5)
    again = store.claim_job("alive", 60)
    assert again.job_id == job.job_id and again.attempts == 2 and again.lease_owner == "alive"
    assert not store.renew_lease(job.job_id, "dead", 60)  # the lost worker no longer holds it
    assert store.renew_lease(job.job_id, "alive", 60)
    time.sleep(0.05)
    store.finish_job(job.job_id, "alive", state="done")
    assert store.jobs()[0].state == "done"


def test_a_job_whose_workers_keep_dying_is_failed_after_three_claims(db_url):
    store = Store(db_url)
    store.add_jobs([JobSpec("a", "train", 0, {})])
    for _ in range(3):
        assert store.claim_job("w", 0.05, max_attempts=3) is not None
        time.sleep(0.1)
    assert store.claim_job("w", 60, max_attempts=3) is None
    (job,) = store.jobs()
    assert job.state == "failed" and "lost 3 times" in job.error


def test_a_failed_job_blocks_its_dependents_only_and_is_reset_by_the_next_add(db_url):
    store = Store(db_url)
    store.add_jobs(graph(4))
    a = store.claim_job("w", 60)
    store.finish_job(a.job_id, "w", state="failed", error="bad config")
    x = store.claim_job("w", 60)
    assert x.key == "x0"
    store.finish_job(x.job_id, "w", state="done")
    assert store.claim_job("w", 60) is None
    assert not store.runnable_jobs_left()  # b and c wait on a failed job: nothing can run
    store.add_jobs(graph(4))  # running the suite again retries the failed job
    assert {j.key: j.state for j in store.jobs()} == {"a": "pending", "b": "pending", "c": "pending", "x0": "done"}
    assert store.runnable_jobs_left()


def _claim_all(db_url: str, owner: str, queue) -> None:
    store = Store(db_url)
    got = []
    while (job := store.claim_job(owner, 60)) is not None:
        got.append(job.key)
        store.finish_job(job.job_id, owner, state="done")
    queue.put(got)


def test_concurrent_claims_give_each_job_to_exactly_one_worker(db_url):
    store = Store(db_url)
    store.add_jobs([JobSpec(f"j{i}", "evaluate", 0, {}) for i in range(60)])
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_claim_all, args=(db_url, f"w{k}", queue)) for k in range(4)]
    for w in workers:
        w.start()
    claimed = [key for _ in workers for key in queue.get(timeout=120)]
    for w in workers:
        w.join(timeout=60)
    assert sorted(claimed) == sorted(f"j{i}" for i in range(60))  # none lost, none twice
    assert all(j.state == "done" and j.attempts == 1 for j in store.jobs())


def _run(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.Popen([sys.executable, "-m", "bench", "run", "--suite", str(TINY), "--no-report", *args],
                            cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _per_sample(db: Path) -> dict:
    """Every evaluation's per-sample results, keyed by what it is (run label, checkpoint kind, label, samples)."""
    with sqlite3.connect(db) as con:
        rows = con.execute(
            "select r.label, k.kind, e.label, e.indices_hash, group_concat(s.sample_index || ':' || s.correct || ':' || "
            "coalesce(s.loss, ''), ',') from evaluations e join run_checkpoints k on k.checkpoint_id = e.checkpoint_id "
            "join runs r on r.run_id = k.run_id join sample_results s on s.evaluation_id = e.evaluation_id "
            "group by e.evaluation_id, k.kind").fetchall()
    return {tuple(r[:4]): r[4] for r in rows}


def test_one_or_two_workers_give_identical_per_sample_results(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    for folder, workers in ((one, "1"), (two, "2")):
        folder.mkdir()
        done = _run(folder, "--workers", workers, "--threads", "1")
        out, err = done.communicate(timeout=600)
        assert done.returncode == 0, err[-2000:]
    assert _per_sample(one / "results.db") == _per_sample(two / "results.db")
    assert len(_per_sample(one / "results.db")) > 30


def test_two_runs_of_one_suite_at_once_do_each_job_once(tmp_path):
    runs = [_run(tmp_path, "--threads", "1") for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in runs]
    assert [p.returncode for p in runs] == [0, 0], [err[-2000:] for _, err in outputs]
    with sqlite3.connect(tmp_path / "results.db") as con:
        states = con.execute("select state, attempts, count(*) from jobs group by state, attempts").fetchall()
        epochs = con.execute("select run_id, epoch, count(*) from train_epochs group by run_id, epoch "
                             "having count(*) > 1").fetchall()
    assert states == [("done", 1, states[0][2])]  # every job done, each claimed once
    assert epochs == []
