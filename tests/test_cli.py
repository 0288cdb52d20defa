"""The command line, in-process (`bench.app.cli.main`): list, an end-to-end suite run that is
cached and then forced, `eval`'s worst-case line, and bad input: exit status 2, one line on
stderr, and nothing written."""

from __future__ import annotations

import hashlib
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from bench.app.cli import main
from bench.core.check import CHECKS
from bench.core.defense import DEFENSES
from bench.store.schema import EXAMPLES_PER_EVALUATION

TINY = (Path(__file__).resolve().parent / "suites" / "tiny.toml").resolve()
TINY_RUNS = ("natural", "pgd_at", "trades")
TABLES = ("runs", "train_epochs", "checkpoints", "run_checkpoints", "evaluations", "sample_results",
          "adversarial_examples", "curves", "curve_points", "sanity_checks", "alembic_version")


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def counts(db: Path) -> dict[str, int]:
    with sqlite3.connect(db) as con:
        return {t: con.execute(f"select count(*) from {t}").fetchone()[0] for t in TABLES}


def rows(db: Path, table: str, exclude: tuple[str, ...] = ()) -> list[tuple]:
    with sqlite3.connect(db) as con:
        cols = [r[1] for r in con.execute(f"pragma table_info({table})") if r[1] not in exclude]
        return sorted(con.execute(f"select {', '.join(cols)} from {table}").fetchall(), key=repr)


def dump(db: Path) -> list[str]:
    with sqlite3.connect(db) as con:  # reads the WAL too: what any reader sees
        return list(con.iterdump())


def files(root: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every file under `root` (or of `root` itself)."""
    paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in paths}


def _names(root: Path) -> list[str]:
    """listing() without SQLite's -wal/-shm side files (reading the database creates them)."""
    return [p for p in listing(root) if not p.startswith("results.db-")]


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# --------------------------------------------------------------------------- list and --help

def test_list_prints_every_registry(capsys):
    rc, out, err = cli(capsys, "list")
    assert rc == 0 and err == ""
    lines = dict(line.split(": ", 1) for line in out.strip().splitlines())
    assert list(lines) == ["defenses", "attacks", "models", "datasets", "remedies"]
    expect = {"defenses": {"natural", "fgsm_at", "fast_at", "pgd_at", "trades", "mart"},
              "attacks": {"fgsm", "pgd", "mim"}, "models": {"small_cnn", "preact_resnet18", "wrn"},
              "datasets": {"digits", "synthetic", "mnist", "mnist_t10k", "cifar10", "cifar100"},
              "remedies": {"eot", "logit_recovery", "bpda_ste", "bpda_surrogate", "square"}}
    for kind, names in expect.items():
        listed = lines[kind].split(", ")
        assert names <= set(listed) and listed == sorted(listed), kind
    rc, out, _ = cli(capsys, "list", "attacks")
    assert rc == 0 and out.startswith("attacks: ") and out.count("\n") == 1 and "pgd" in out


def test_help_in_a_subprocess(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bench", "--help"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: bench")
    for command in ("list", "train", "eval", "run", "report"):
        assert command in done.stdout
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- run: end to end, cached, forced

def test_run_suite_end_to_end_then_nothing_to_do_then_force(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "results.db"
    rc, out, err = cli(capsys, "run", "--suite", TINY, "--device", "cpu")
    assert rc == 0, err
    index = tmp_path / "reports" / "index.html"
    assert f"report: {index.resolve()}" in out.splitlines()
    assert "[tiny] trained 3 run(s)" in out
    assert out.index("[tiny] estimated wall time:") < out.index("[job ")  # before any work
    run_dirs = sorted((tmp_path / "checkpoints").iterdir())
    assert len(run_dirs) == 3
    for d in run_dirs:
        assert sorted(p.name for p in d.iterdir()) == ["best.pt", "last.pt", "state.pt"]
    html = index.read_text()
    for label in TINY_RUNS:
        assert label in html
    assert sorted(p.name for p in (tmp_path / "reports" / "runs").iterdir()) == sorted(f"{d.name}.html" for d in run_dirs)

    n = counts(db)
    shas = {hashlib.sha256((d / k).read_bytes()).hexdigest() for d in run_dirs for k in ("best.pt", "last.pt")}
    assert n["runs"] == 3 and n["train_epochs"] == 3 * 2 and n["run_checkpoints"] == 3 * 2
    assert n["checkpoints"] == len(shas)  # one row per distinct file (best.pt may be a copy of last.pt)
    # per distinct checkpoint file: clean, fgsm, pgd on 48 samples; 9 curve points on 24 (tiny.toml)
    assert n["evaluations"] == (3 + 9) * len(shas)
    assert n["sample_results"] == (48 * 3 + 24 * 9) * len(shas)
    assert n["curves"] == 4 * len(shas) and n["sanity_checks"] == len(CHECKS) * len(shas)
    assert n["alembic_version"] == 1
    with sqlite3.connect(db) as con:
        assert con.execute("select distinct status from runs").fetchall() == [("completed",)]
        assert sorted(r[0] for r in con.execute("select label from runs")) == sorted(TINY_RUNS)
        assert {r[0] for r in con.execute("select label from evaluations where role = 'attack'")} == \
            {"clean", "fgsm", "pgd"}
    # fgsm and pgd keep the images of a few samples they fooled; clean and curve points keep none
    assert 0 < n["adversarial_examples"] <= EXAMPLES_PER_EVALUATION * 2 * len(shas)
    rc, out, err = cli(capsys, "report", "--compare", "natural", "trades:last")
    assert rc == 0, err
    page = Path(out.splitlines()[-1].removeprefix("comparison: "))
    assert page.parent == (tmp_path / "reports" / "compare").resolve() and page.is_file()
    assert "McNemar" in page.read_text() and "natural" in page.read_text()

    # the same command again: nothing to do, nothing changed
    before_files = files(tmp_path / "checkpoints")
    before_counts = counts(db)
    before_rows = {t: rows(db, t) for t in ("train_epochs", "checkpoints", "run_checkpoints", "evaluations",
                                            "sample_results")}
    before_runs = rows(db, "runs", exclude=("updated_at",))
    rc, out, err = cli(capsys, "run", "--suite", TINY, "--device", "cpu")
    assert rc == 0, err
    assert "nothing to do" in out and "trained" not in out.replace("already trained", "")
    assert "estimated wall time" not in out
    assert f"report: {index.resolve()}" in out.splitlines()
    assert files(tmp_path / "checkpoints") == before_files
    assert counts(db) == before_counts
    assert {t: rows(db, t) for t in before_rows} == before_rows
    assert rows(db, "runs", exclude=("updated_at",)) == before_runs

    # --force redoes training and evaluation
    with sqlite3.connect(db) as con:
        last_eval = con.execute("select max(created_at) from evaluations").fetchone()[0]
    rc, out, err = cli(capsys, "run", "--suite", TINY, "--device", "cpu", "--force")
    assert rc == 0, err
    assert "[tiny] trained 3 run(s)" in out and "nothing to do" not in out
    for label in TINY_RUNS:
        assert f"{label} epoch 1/2" in out and f"{label} epoch 2/2" in out
    assert counts(db) == before_counts  # redone in place, not duplicated
    with sqlite3.connect(db) as con:
        created = [r[0] for r in con.execute("select created_at from evaluations")]
    assert len(created) == before_counts["evaluations"] and min(created) > last_eval
    after_files = files(tmp_path / "checkpoints")
    for path, (sha, mtime) in before_files.items():
        assert after_files[path][1] > mtime, path  # rewritten
        if not path.endswith("state.pt"):  # state.pt holds wall times; the weights are deterministic
            assert after_files[path][0] == sha, path


def test_a_narrower_eval_never_downgrades_the_suite_checks(tmp_path, monkeypatch, capsys):
    """The hostile-pass sequence: a suite evaluated a checkpoint (checks from all its attacks and
    curves); `bench eval` of that checkpoint with one more attack must add to what the checks see,
    not recompute them from its own two evaluations; the suite run after it has nothing to do."""
    monkeypatch.chdir(tmp_path)
    assert cli(capsys, "run", "--suite", TINY, "--device", "cpu", "--no-report")[0] == 0

    def checks(ckpt):
        with sqlite3.connect(tmp_path / "results.db") as con:
            return dict(con.execute("select s.name, s.status from sanity_checks s join checkpoints c on "
                                    "c.checkpoint_id = s.checkpoint_id where c.sha256 = ?",
                                    (hashlib.sha256((tmp_path / ckpt).read_bytes()).hexdigest(),)).fetchall())

    run_dir = sorted((tmp_path / "checkpoints").iterdir())[1]
    ckpt = str((run_dir / "best.pt").relative_to(tmp_path))
    before = checks(ckpt)
    assert list(before.values()).count("not-run") < len(before) // 2  # the suite ran the curve-based checks
    rc, out, err = cli(capsys, "eval", ckpt, "--attack", "pgd50=pgd:steps=50", "--device", "cpu", "--no-curves")
    assert rc == 0, err
    after = checks(ckpt)
    assert set(after) == set(before)
    assert {n for n, st in after.items() if st == "not-run"} == {n for n, st in before.items() if st == "not-run"}
    assert {n for n, st in after.items() if st in ("warn", "fail")} >= {n for n, st in before.items() if st in ("warn", "fail")}
    rc, out, err = cli(capsys, "run", "--suite", TINY, "--device", "cpu", "--no-report")
    assert rc == 0 and "nothing to do" in out, out
    assert checks(ckpt) == after
    # with curves of its own (on more samples, up to eps 1) the eval adds evidence: nothing that ran is lost
    # (the adaptive stage is left out: what it does about a new flag is test_adaptive.py's)
    assert cli(capsys, "eval", ckpt, "--attack", "pgd50=pgd:steps=50", "--device", "cpu", "--no-adaptive")[0] == 0
    assert {n for n, st in checks(ckpt).items() if st == "not-run"} < {n for n, st in before.items() if st == "not-run"}


# --------------------------------------------------------------------------- eval

@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A folder holding results.db and the checkpoints of one quickly trained run (synthetic
    data, a tiny small_cnn, 1 epoch). Tests copy it (see `copy_workspace`)."""
    ws = tmp_path_factory.mktemp("workspace")
    argv = ["train", "--defense", "natural", "--dataset", "synthetic", "--epochs", "1", "--device", "cpu",
            "--train", "batch_size=128", "--model-param", "width=8", "--model-param", "hidden=32",
            "--db", str(ws / "results.db"), "--checkpoints", str(ws / "checkpoints")]
    assert main(argv) == 0
    with sqlite3.connect(ws / "results.db") as con:
        con.execute("pragma wal_checkpoint(truncate)")
    return ws


def checkpoint_of(ws: Path) -> Path:
    (run_dir,) = (ws / "checkpoints").iterdir()
    return run_dir / "best.pt"


def copy_workspace(ws: Path, dst: Path) -> Path:
    dst.mkdir()
    shutil.copy2(ws / "results.db", dst / "results.db")
    shutil.copytree(ws / "checkpoints", dst / "checkpoints")
    return dst


def test_eval_prints_the_worst_case(tmp_path, monkeypatch, capsys, workspace):
    ws = copy_workspace(workspace, tmp_path / "ws")
    monkeypatch.chdir(ws)
    ckpt = checkpoint_of(ws).relative_to(ws)
    argv = ["eval", ckpt, "--attack", "fgsm", "--attack", "pgd5=pgd:steps=5", "--n-samples", "32", "--device", "cpu",
            "--no-curves"]
    rc, out, err = cli(capsys, *argv)
    assert rc == 0, err
    assert out.splitlines()[0] == f"evaluating {ckpt} (synthetic, trained for Linf eps=0.1)"
    assert re.search(r"^  sanity +\d+ pass, \d+ warn, \d+ fail, \d+ not run", out, re.M)  # curve checks: not run
    line = [l for l in out.splitlines() if "worst case" in l]
    assert len(line) == 1
    m = re.fullmatch(r"\s*worst case\s+(\d+\.\d\d)%\s+\(per-sample AND over 3 evaluations, n=32\)", line[0])
    assert m, line[0]
    db = ws / "results.db"
    with sqlite3.connect(db) as con:
        ids = [r[0] for r in con.execute("select evaluation_id from evaluations")]
        assert sorted(r[0] for r in con.execute("select label from evaluations")) == ["clean", "fgsm", "pgd5"]
        ok = con.execute("select sample_index, min(correct) from sample_results group by sample_index").fetchall()
    assert len(ids) == 3 and len(ok) == 32
    assert float(m.group(1)) == pytest.approx(100 * sum(c for _, c in ok) / 32, abs=0.005)
    accs = [float(x) for x in re.findall(r"^\s+(?:clean|fgsm|pgd5)\s+(\d+\.\d\d)%", out, re.M)]
    assert len(accs) == 3 and float(m.group(1)) <= min(accs)

    before = (counts(db), rows(db, "evaluations"))
    rc, out2, err = cli(capsys, *argv)
    assert rc == 0 and line[0] in out2.splitlines()  # cached: the same worst case, nothing new stored
    assert (counts(db), rows(db, "evaluations")) == before


def test_report_without_a_database(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc, out, err = cli(capsys, "report")
    assert rc == 2 and out == "" and err.startswith("error: database 'results.db' does not exist")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- bad input

class Payload:
    """Unpickling this calls open(marker, "w"): a checkpoint that runs code when loaded unsafely."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _suite(inputs: Path, text: str, name: str = "suite.toml") -> Path:
    path = inputs / name
    path.write_text(text)
    return path


def _tiny_with(old: str, new: str) -> str:
    text = TINY.read_text()
    assert old in text
    return text.replace(old, new, 1)


def _offline(monkeypatch, argv: list) -> list:
    """Make every download fail as it does without internet (bench.core.data calls urllib.request.urlopen)."""

    def urlopen(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return argv


TRAIN = ["train", "--defense", "natural", "--dataset", "synthetic", "--epochs", "1", "--device", "cpu"]

# name -> (setup(inputs, ckpt, monkeypatch) -> argv, pattern the error line must match)
BAD = {
    "unknown defense": (lambda i, c, m: ["train", "--defense", "pgd_a", "--dataset", "synthetic"],
                        r"unknown defense 'pgd_a'\. Did you mean 'pgd_at'\? Known defenses: "
                        + re.escape(", ".join(DEFENSES.names()))),
    "unknown attack": (lambda i, c, m: ["eval", c, "--attack", "pgdd:steps=3"],
                       r"unknown attack 'pgdd'\. Did you mean 'pgd'\? Known attacks: .*fgsm"),
    "unknown model": (lambda i, c, m: TRAIN + ["--model", "small_cn"],
                      r"unknown model 'small_cn'\. Did you mean 'small_cnn'\?"),
    "unknown dataset": (lambda i, c, m: ["train", "--defense", "natural", "--dataset", "synthetc"],
                        r"unknown dataset 'synthetc'\. Did you mean 'synthetic'\?"),
    "negative eps": (lambda i, c, m: TRAIN + ["--eps=-0.1"], r"eps must be >= 0, got -0\.1"),
    "Linf eps 2": (lambda i, c, m: TRAIN + ["--eps", "2"], r"out of range for Linf"),
    "eval negative eps": (lambda i, c, m: ["eval", c, "--attack", "fgsm:eps=-0.1"], r"eps must be >= 0"),
    "eval Linf eps 2": (lambda i, c, m: ["eval", c, "--attack", "pgd:eps=2"], r"out of range for Linf"),
    "suite key typo": (lambda i, c, m: ["run", "--suite", _suite(i, _tiny_with("[training]", "[trainig]"))],
                       r"unknown key 'trainig' in suite .*Did you mean 'training'\?"),
    "suite defense typo": (lambda i, c, m: ["run", "--suite", _suite(i, _tiny_with("[defenses.pgd_at]",
                                                                                   "[defenses.pgd_att]"))],
                           r"unknown defense 'pgd_att'\. Did you mean 'pgd_at'\?"),
    "suite attack typo": (lambda i, c, m: ["run", "--suite", _suite(i, _tiny_with("[attacks.fgsm]",
                                                                                  "[attacks.fgsn]"))],
                          r"unknown attack 'fgsn'\. Did you mean 'fgsm'\?"),
    "suite model typo": (lambda i, c, m: ["run", "--suite", _suite(i, _tiny_with('name = "small_cnn"',
                                                                                 'name = "small_cn"'))],
                         r"unknown model 'small_cn'\. Did you mean 'small_cnn'\?"),
    "suite dataset typo": (lambda i, c, m: ["run", "--suite", _suite(i, _tiny_with('dataset = "synthetic"',
                                                                                   'dataset = "synthetc"'))],
                           r"unknown dataset 'synthetc'\. Did you mean 'synthetic'\?"),
    "suite not TOML": (lambda i, c, m: ["run", "--suite", _suite(i, "name = 'x'\n[training\nepochs = 2\n")],
                       r"suite '.*suite\.toml' is not valid TOML"),
    "missing suite": (lambda i, c, m: ["run", "--suite", i / "nope.toml"], r"suite file '.*nope\.toml' not found"),
    "offline dataset": (lambda i, c, m: _offline(m, ["train", "--defense", "natural", "--dataset", "mnist",
                                                     "--data-dir", i / "empty"]),
                        r"dataset 'mnist': .* not found in .*empty.*the download failed.*--data-dir"),
    "corrupted checkpoint": (lambda i, c, m: ["eval", _write(i / "random.pt", random.Random(0).randbytes(4096))],
                             r"checkpoint '.*random\.pt' is corrupted or not a PyTorch file"),
    "truncated checkpoint": (lambda i, c, m: ["eval", _write(i / "half.pt", c.read_bytes()[:c.stat().st_size // 2])],
                             r"checkpoint '.*half\.pt' is corrupted or not a PyTorch file"),
    "foreign checkpoint": (lambda i, c, m: ["eval", _save(i / "foreign.pt", {"weight": torch.zeros(3)})],
                           r"'.*foreign\.pt' is not an atbench model file"),
    "code in checkpoint": (lambda i, c, m: ["eval", _save(i / "evil.pt", {"format": "atbench-model", "version": 1,
                                                                          "x": Payload(i / "MARKER")})],
                           r"refusing to load '.*evil\.pt': it holds Python objects"),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _save(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


def _bad_call(case, inputs: Path, ckpt: Path, monkeypatch, capsys) -> None:
    setup, pattern = BAD[case]
    argv = setup(inputs, ckpt, monkeypatch)
    rc, out, err = cli(capsys, *argv)
    assert rc == 2, (out, err)
    assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert re.search(pattern, err), err
    assert "Traceback" not in out + err
    assert not (inputs / "MARKER").exists()  # no code from a checkpoint ran


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_leaves_results_and_checkpoints_untouched(case, tmp_path, monkeypatch, capsys, workspace):
    inputs = tmp_path / "inputs"
    (inputs / "empty").mkdir(parents=True)
    ws = copy_workspace(workspace, tmp_path / "ws")
    monkeypatch.chdir(ws)
    before = (files(ws / "results.db"), files(ws / "checkpoints"), dump(ws / "results.db"), _names(ws))
    _bad_call(case, inputs, checkpoint_of(ws), monkeypatch, capsys)
    after = (files(ws / "results.db"), files(ws / "checkpoints"), dump(ws / "results.db"), _names(ws))
    assert after == before  # same bytes, same rows, no reports/ or other new files
    assert listing(inputs / "empty") == []  # a failed download leaves nothing behind


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_creates_nothing_in_a_fresh_folder(case, tmp_path, monkeypatch, capsys, workspace):
    """Everything is checked before the store is opened: a rejected command must not leave an
    empty results.db (or checkpoints/, reports/) behind in the folder it ran in."""
    inputs = tmp_path / "inputs"
    (inputs / "empty").mkdir(parents=True)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    monkeypatch.chdir(fresh)
    ckpt = copy_workspace(workspace, tmp_path / "ws") / checkpoint_of(workspace).relative_to(workspace)
    _bad_call(case, inputs, ckpt, monkeypatch, capsys)
    assert listing(fresh) == []


def test_checkpoint_code_is_never_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "MARKER"
    path = _save(tmp_path / "evil.pt", {"format": "atbench-model", "version": 1, "x": Payload(marker)})
    rc, out, err = cli(capsys, "eval", path)
    assert rc == 2 and err.startswith("error: refusing to load") and err.count("\n") == 1
    assert not marker.exists()
    assert not (tmp_path / "results.db").exists()
    # the payload is real: an unsafe load would have run it
    torch.load(path, weights_only=False)
    assert marker.exists()
