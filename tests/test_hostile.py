"""Hostile input, as a careful user would try it: every case ends in a one-line `error: ...` on
stderr with exit status 2, and leaves the store and the checkpoints exactly as they were.

The cases are data (CASES), so that `python tests/test_hostile.py REPO` can replay them against
any checkout of the command line (it prints each case's exit status and first line)."""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TINY_SUITE = """name = "hostile"
dataset = "synthetic"
seed = 0
[dataset_options]
n_train = 64
n_val = 16
n_test = 16
[threat]
norm = "Linf"
eps = 0.1
[model]
name = "small_cnn"
width = 4
hidden = 8
[training]
epochs = 1
batch_size = 64
optimizer = "adam"
lr = 0.003
weight_decay = 0.0
val_steps = 1
[evaluation]
checkpoints = ["best"]
sanity = false
curves = false
[defenses.natural]
[attacks.fgsm]
"""


def suite(ws: Path, replace: tuple[str, str] = ("", ""), append: str = "") -> str:
    """A variant of the tiny suite written into the workspace: one text replaced, text appended."""
    path = ws / "variant.toml"
    path.write_text(TINY_SUITE.replace(*replace) + append)
    return str(path)


def checkpoint(ws: Path) -> Path:
    (run_dir,) = [p for p in (ws / "checkpoints").iterdir() if (p / "best.pt").exists()]
    return run_dir / "best.pt"


def crafted(ws: Path, change) -> str:
    """A copy of the trained checkpoint with `change(obj)` applied to its contents (plain torch.save)."""
    obj = torch.load(checkpoint(ws), weights_only=True)
    change(obj)
    path = ws / "crafted.pt"
    torch.save(obj, path)
    return str(path)


def _nan_weights(obj):
    for value in obj["state_dict"].values():
        if value.is_floating_point():
            value.fill_(float("nan"))


def _huge_mlp(obj):
    obj["model_spec"] = {**obj["model_spec"], "name": "mlp", "kwargs": {"hidden": 30000, "depth": 2, "head": "linear"}}
    obj["state_dict"] = {k: v for k, v in list(obj["state_dict"].items())[:2]}


def _bit_flip(ws: Path) -> list[str]:
    """Flip one byte inside the weights of the completed run's best.pt (still a valid zip), then run the suite."""
    path = checkpoint(ws)
    data = bytearray(path.read_bytes())
    offset = data.find(b"data/0") + 200
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    return ["run", "--suite", str(ws / "suite.toml"), "--no-report"]


def _corrupt_db(ws: Path) -> list[str]:
    db = ws / "results.db"
    data = bytearray(db.read_bytes())
    data[4096:8192] = b"\xff" * 4096  # the second page
    db.write_bytes(bytes(data))
    return ["eval", str(checkpoint(ws)), "--attack", "fgsm", "--no-curves"]


def _foreign_db(ws: Path) -> list[str]:
    with sqlite3.connect(ws / "other.db") as con:
        con.execute("create table runs (id integer primary key, name text)")
        con.execute("insert into runs (name) values ('theirs')")
    return ["eval", str(checkpoint(ws)), "--attack", "fgsm", "--no-curves", "--db", str(ws / "other.db")]


def _report_into_a_file(ws: Path) -> list[str]:
    (ws / "out.html").write_text("x")
    return ["report", "--out", str(ws / "out.html")]


TRAIN = ["train", "--defense", "natural", "--dataset", "synthetic", "--epochs", "1", "--model-param", "width=4",
         "--model-param", "hidden=8", "--train", "batch_size=64", "--dataset-option", "n_train=64",
         "--dataset-option", "n_val=16", "--dataset-option", "n_test=16"]

# id -> workspace -> argv (the workspace holds results.db, checkpoints/ with one trained run, suite.toml)
CASES = {
    "model width=0": lambda ws: TRAIN + ["--model-param", "width=0"],
    "model width=-4": lambda ws: TRAIN + ["--model-param", "width=-4"],
    "model width=abc": lambda ws: TRAIN + ["--model-param", "width=abc"],
    "suite [model] width = 0": lambda ws: ["run", "--suite", suite(ws, ("width = 4", "width = 0"))],
    "train batch_size=0": lambda ws: TRAIN + ["--train", "batch_size=0"],
    "eval --batch-size 0": lambda ws: ["eval", str(checkpoint(ws)), "--batch-size", "0"],
    "eval --batch-size -1": lambda ws: ["eval", str(checkpoint(ws)), "--batch-size", "-1"],
    "suite batch_size = 0": lambda ws: ["run", "--suite", suite(ws, ('checkpoints = ["best"]',
                                                                      'checkpoints = ["best"]\nbatch_size = 0'))],
    "train --fast sync_every=0": lambda ws: TRAIN + ["--fast", "sync_every=0"],
    "eval --fast precision=tf32 on the CPU": lambda ws: ["eval", str(checkpoint(ws)), "--device", "cpu", "--fast",
                                                          "precision=tf32"],
    "run --fast unknown key": lambda ws: ["run", "--suite", suite(ws), "--fast", "channel_last=true"],
    "suite seed = \"abc\"": lambda ws: ["run", "--suite", suite(ws, ("seed = 0", 'seed = "abc"'))],
    "suite seed = 1.5": lambda ws: ["run", "--suite", suite(ws, ("seed = 0", "seed = 1.5"))],
    "suite defenses natural = 5": lambda ws: ["run", "--suite", suite(ws, ("[defenses.natural]", "[defenses]\nnatural = 5"))],
    "suite L2 attack without eps": lambda ws: ["run", "--suite", suite(ws, append='[attacks.pgd_l2]\nattack = "pgd"\nnorm = "L2"\n')],
    "suite L2 eps 1e308": lambda ws: ["run", "--suite", suite(ws, ('norm = "Linf"\neps = 0.1', 'norm = "L2"\neps = 1e308'))],
    "eval L2 eps 1e308": lambda ws: ["eval", str(checkpoint(ws)), "--attack", 'pgd:norm="L2",eps=1e308', "--no-curves"],
    "checkpoint dataset_options = None": lambda ws: ["eval", crafted(ws, lambda o: o.update(dataset_options=None))],
    "checkpoint eps = \"0.2\"": lambda ws: ["eval", crafted(ws, lambda o: o.update(eps="0.2"))],
    "checkpoint with NaN weights": lambda ws: ["eval", crafted(ws, _nan_weights), "--no-curves"],
    "checkpoint spec mlp hidden=30000": lambda ws: ["eval", crafted(ws, _huge_mlp)],
    "bit-flipped best.pt of a trained run": _bit_flip,
    "corrupted results.db": _corrupt_db,
    "foreign SQLite database": _foreign_db,
    "report --out FILE": lambda ws: _report_into_a_file(ws),
}
if not torch.cuda.is_available():  # make bench's DEVICE ?= cuda on a machine without a usable GPU
    CASES["run --device cuda without a usable GPU"] = lambda ws: ["run", "--suite", suite(ws), "--device", "cuda"]



def make_workspace(root: Path, python: str = sys.executable, cwd: Path | None = None) -> Path:
    """A workspace with one trained tiny run and the tiny suite, made with the command line."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "suite.toml").write_text(TINY_SUITE)
    done = subprocess.run([python, "-m", "bench", "run", "--suite", str(root / "suite.toml"), "--db",
                           str(root / "results.db"), "--checkpoints", str(root / "checkpoints"), "--no-report"],
                          cwd=cwd or root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    with sqlite3.connect(root / "results.db") as con:
        con.execute("pragma wal_checkpoint(truncate)")
    return root


def snapshot(ws: Path) -> tuple:
    """What must not change: every file's bytes (the store read through SQLite, WAL included)."""
    files = {str(p.relative_to(ws)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(ws.rglob("*")) if p.is_file() and not p.name.startswith("results.db")
             and p.name not in ("variant.toml", "crafted.pt", "other.db", "out.html")}
    try:
        with sqlite3.connect(ws / "results.db") as con:
            dump = list(con.iterdump())
    except sqlite3.DatabaseError:
        dump = hashlib.sha256((ws / "results.db").read_bytes()).hexdigest()
    return files, dump


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return make_workspace(tmp_path_factory.mktemp("hostile") / "ws")


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_input_is_a_one_line_error_and_changes_nothing(case, pristine, tmp_path, monkeypatch, capsys):
    from bench.app.cli import main

    ws = tmp_path / "ws"
    shutil.copytree(pristine, ws)
    monkeypatch.chdir(ws)
    argv = CASES[case](ws)
    before = snapshot(ws)
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse
        rc = exc.code
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2, (case, out[-500:], err[-500:])
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert snapshot(ws) == before


def test_crafted_spec_allocates_nothing(pristine, tmp_path):
    """The spec asks for an MLP of 30,000 hidden units (7 GB of float32 for a 64-pixel input would be
    allocated before the old code noticed the weights do not match): refused before any allocation."""
    import tracemalloc

    from bench.core.errors import BenchError
    from bench.engine.checkpoint import load_model

    ws = tmp_path / "ws"
    shutil.copytree(pristine, ws)
    path = crafted(ws, _huge_mlp)
    tracemalloc.start()
    with pytest.raises(BenchError, match="does not match its model spec"):
        load_model(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 50e6, peak  # torch's own allocations are not traced; a meta-device model holds no data


def test_a_full_disk_leaves_no_partial_file_and_the_old_checkpoint(tmp_path, monkeypatch):
    from bench.core.errors import BenchError
    from bench.engine import checkpoint

    target = tmp_path / "last.pt"
    checkpoint.atomic_save({"a": torch.ones(2)}, target)

    def full(obj, path):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(BenchError, match="No space left on device"):
        checkpoint.atomic_save({"a": torch.zeros(2)}, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    assert torch.load(target, weights_only=True)["a"].tolist() == [1.0, 1.0]


def test_a_failing_database_is_an_error_and_writes_nothing(tmp_path):
    from sqlalchemy.exc import OperationalError

    from bench.core.errors import BenchError
    from bench.store import Store
    from bench.store.schema import Run

    store = Store(str(tmp_path / "results.db"))
    with pytest.raises(BenchError, match="database or disk is full; nothing of this transaction was written"):
        with store.session() as s:
            s.add(Run(run_id="r", label="r", defense="natural", dataset="d", model="m", norm="Linf", eps=0.1, epochs=1))
            s.flush()
            raise OperationalError("INSERT", {}, sqlite3.OperationalError("database or disk is full"))
    assert store.run("r") is None


def _unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.skipif(not _unshare_works(), reason="needs `unshare -m` for a read-only mount (root in CI)")
def test_a_read_only_database_is_refused_before_work_and_still_renders(pristine, tmp_path):
    """The workspace on a read-only mount (root ignores file modes, so a mount it is): `bench eval`
    refuses at once, before computing anything; `bench report` renders the archived database."""
    ws = tmp_path / "ws"
    shutil.copytree(pristine, ws)
    ro = tmp_path / "ro"
    ro.mkdir()
    repo = Path(__file__).resolve().parent.parent
    script = (f"mount --bind -o ro {ws} {ro} && cd {ro} && "
              f"{sys.executable} -m bench eval {checkpoint(ws).relative_to(ws)} --attack fgsm --no-curves; echo rc=$?; "
              f"{sys.executable} -m bench report --out {tmp_path / 'reports'}; echo rc=$?")
    done = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=repo, env={"PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin"})
    eval_err = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.stdout.splitlines()[:1] == ["rc=2"], (done.stdout, done.stderr)
    assert eval_err and "is read-only" in eval_err[0]
    assert "evaluating" not in done.stdout  # refused before any work
    assert done.stdout.strip().splitlines()[-1] == "rc=0", done.stderr
    assert (tmp_path / "reports" / "index.html").is_file()


if __name__ == "__main__":  # replay the cases against a checkout: python tests/test_hostile.py REPO [PYTHON]
    import tempfile

    repo = Path(sys.argv[1]).resolve()
    python = sys.argv[2] if len(sys.argv) > 2 else sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        pristine = make_workspace(Path(tmp) / "ws", python, cwd=repo)
        for case, make in CASES.items():
            ws = Path(tmp) / "case"
            shutil.rmtree(ws, ignore_errors=True)
            shutil.copytree(pristine, ws)
            argv = [str(a) for a in make(ws)]
            before = snapshot(ws)
            done = subprocess.run([python, "-m", "bench", *argv], cwd=ws, capture_output=True, text=True, timeout=600,
                                  env={"PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin", "HOME": tmp})
            text = (done.stderr.strip() or done.stdout.strip()).splitlines()
            first = text[-1] if done.returncode == 0 else next((l for l in text if l.startswith("error")), text[-1] if text else "")
            changed = "changed" if snapshot(ws) != before else "unchanged"
            print(f"| {case} | {done.returncode} | {len(done.stderr.strip().splitlines())} | {changed} | {first[:110]} |")
