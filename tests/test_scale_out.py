"""Scale-out with the real engines (slow; CI runs them): Ray's local mode and submitit's local
executor give the per-sample results of local workers; a worker killed with SIGKILL in the middle
of a training job loses it to another once its lease expires, and the weights end up equal to an
uninterrupted run's; many concurrent writers lose and duplicate no row, on SQLite and PostgreSQL."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_jobs import TINY, _per_sample

pytestmark = pytest.mark.slow

KILL_SUITE = """name = "kill"
dataset = "synthetic"
seed = 0
[dataset_options]
n_train = 512
n_val = 32
n_test = 16
[threat]
norm = "Linf"
eps = 0.1
[model]
name = "small_cnn"
width = 8
hidden = 32
[training]
epochs = 6
batch_size = 16
optimizer = "adam"
lr = 0.003
weight_decay = 0.0
val_steps = 2
[evaluation]
checkpoints = ["last"]
curves = false
sanity = false
[defenses.pgd_at]
steps = 5
[attacks.fgsm]
"""


def bench(cwd: Path, *args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bench", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def finished(process: subprocess.Popen, timeout: float = 900) -> str:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, (out[-1500:], err[-1500:])
    return out


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("local")
    finished(bench(folder, "run", "--suite", str(TINY), "--no-report", "--threads", "1"))
    return _per_sample(folder / "results.db")


@pytest.mark.parametrize("backend", ["ray", "slurm"])
def test_ray_and_submitit_give_the_results_of_local_workers(backend, tmp_path, local_reference):
    pytest.importorskip({"ray": "ray", "slurm": "submitit"}[backend])
    out = finished(bench(tmp_path, "run", "--suite", str(TINY), "--no-report", "--backend", backend, "--workers", "2",
                         "--threads", "1", "--slurm-folder", str(tmp_path / "slurm")))
    assert "trained 3 run(s)" in out
    assert _per_sample(tmp_path / "results.db") == local_reference


def test_a_killed_worker_loses_its_training_job_which_resumes_to_the_same_weights(tmp_path):
    suite = tmp_path / "kill.toml"
    suite.write_text(KILL_SUITE)
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    reference.mkdir()
    killed.mkdir()
    finished(bench(reference, "run", "--suite", str(suite), "--no-report", "--threads", "1"))

    finished(bench(killed, "plan", "--suite", str(suite), "--no-report"))
    first = bench(killed, "worker", "--threads", "1", "--lease", "3", start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline:  # kill it after two epochs of the six
        time.sleep(0.2)
        if (killed / "results.db").exists():
            with sqlite3.connect(killed / "results.db") as con:
                if con.execute("select count(*) from train_epochs").fetchone()[0] >= 2:
                    break
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    with sqlite3.connect(killed / "results.db") as con:
        assert con.execute("select state from jobs where kind = 'train'").fetchone() == ("running",)
        epochs_at_kill = con.execute("select count(*) from train_epochs").fetchone()[0]
    assert 2 <= epochs_at_kill < 6
    out = finished(bench(killed, "worker", "--threads", "1", "--lease", "3"))
    assert "none left" in out
    with sqlite3.connect(killed / "results.db") as con:
        assert con.execute("select state, attempts from jobs where kind = 'train'").fetchone() == ("done", 2)
        assert {r[0] for r in con.execute("select state from jobs")} == {"done"}
    (run_dir,) = (reference / "checkpoints").iterdir()
    ours = torch.load(killed / "checkpoints" / run_dir.name / "last.pt", weights_only=True)["state_dict"]
    theirs = torch.load(run_dir / "last.pt", weights_only=True)["state_dict"]
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert _per_sample(killed / "results.db") == _per_sample(reference / "results.db")


def _write_rows(url: str, writer: int, rows: int) -> None:
    from bench.store import Store
    from bench.store.schema import Evaluation

    store = Store(url)
    checkpoint = store.register_checkpoint("ab" * 32, "shared.pt", {"versions": {}, "config": {}, "seed": 0})
    for k in range(rows):
        store.save_evaluation(Evaluation(checkpoint_id=checkpoint, label=f"w{writer}", attack="noise", norm="Linf",
                                         eps=0.1, threat="Linf:0.1", config_hash=f"{writer}-{k}", indices_hash="i",
                                         dataset="d", n_samples=4, n_correct=2, robust_acc=0.5, forward_passes=1,
                                         backward_passes=0, seconds=0.0, implementation="test", versions={},
                                         config={}, seed=0),
                              [0, 1, 2, 3], [True, False, True, False])


def many_writers(url: str, writers: int, rows: int) -> tuple[int, int, float]:
    """`writers` processes each storing `rows` evaluations (4 sample rows each) through one
    checkpoint they all register; returns (evaluations, sample rows, seconds)."""
    from sqlalchemy import func, select

    from bench.store import Store
    from bench.store.schema import Evaluation, SampleResult

    Store(url)
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_write_rows, args=(url, w, rows)) for w in range(writers)]
    start = time.perf_counter()
    for p in processes:
        p.start()
    for p in processes:
        p.join()
    seconds = time.perf_counter() - start
    assert [p.exitcode for p in processes] == [0] * writers
    store = Store(url)
    with store.session() as s:
        return (s.scalar(select(func.count()).select_from(Evaluation)),
                s.scalar(select(func.count()).select_from(SampleResult)), seconds)


def test_eight_concurrent_writers_lose_and_duplicate_nothing(db_url):
    evaluations, samples, _ = many_writers(db_url, 8, 1000)
    assert (evaluations, samples) == (8000, 32000)


if __name__ == "__main__":  # python tests/test_scale_out.py URL WRITERS ROWS: the figures for the notes
    count, rows, seconds = many_writers(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
    print(f"{sys.argv[1].split(':')[0]}: {sys.argv[2]} writers x {sys.argv[3]} rows: {count} evaluations, "
          f"{rows} sample rows in {seconds:.1f} s")
