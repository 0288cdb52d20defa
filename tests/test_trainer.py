"""bench.engine.trainer: a killed run resumes to the same weights (also when it wrote its checkpoints
in the background), finished runs are skipped, a diverged loss fails cleanly (also when checked
every few steps), LR schedules, config validation, run ids, best.pt selection, the fast path's CPU
options leave every bit unchanged, an interrupted epoch's writes are finished or dropped."""

from __future__ import annotations

import hashlib
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sqlalchemy import select

from bench.app.cli import main
from bench.core.data import load_dataset
from bench.core.defense import DEFENSES, Defense
from bench.core.errors import BenchError
from bench.core.threat import ThreatModel
from bench.engine.checkpoint import MODEL_FORMAT, STATE_FORMAT, atomic_save, safe_load, sha256_file
from bench.engine.fastpath import FastPath
from bench.engine.runspec import OPTIMIZERS, SCHEDULES, RunSpec, TrainConfig, build_train_config, lr_at
from bench.engine.trainer import STAGED_BEST, recover, train, verify_checkpoints
from bench.store import Store
from bench.store.schema import Run, TrainEpoch

OPTIONS = {"n_train": 128, "n_val": 32, "n_test": 48}
FAST = {"epochs": 3, "batch_size": 32, "optimizer": "adam", "lr": 0.003, "weight_decay": 0.0, "val_steps": 3}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", **OPTIONS)


def spec_for(defense: str, defense_params=None, **train) -> RunSpec:
    return RunSpec(defense=defense, dataset="synthetic", model="small_cnn", threat=ThreatModel("Linf", 0.1),
                   train=build_train_config({**FAST, **train}), defense_params=dict(defense_params or {}),
                   dataset_options=OPTIONS, seed=0, label=defense)


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def digest_tree(*folders: Path) -> dict[str, tuple[str, int]]:
    out = {}
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                out[str(p)] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
    return out


# --------------------------------------------------------------------------- (a) kill and resume

TRAIN_CMD = [sys.executable, "-m", "bench", "train", "--defense", "pgd_at", "--dataset", "synthetic", "--epochs", "4",
             "--seed", "3", "--device", "cpu", "--train", "batch_size=64"]


def _run_to_completion(cwd: Path, extra: list[str] = ()) -> str:
    done = subprocess.run(TRAIN_CMD + list(extra), cwd=cwd, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.parametrize("fast", [[], ["--fast", "background_checkpoints=true", "--fast", "sync_every=3"]],
                         ids=["plain", "background-writes"])
def test_killed_training_resumes_to_the_same_weights(tmp_path, fast):
    """Killed as soon as its first state.pt exists (with background writes: while epoch 2 trains or
    epoch 1's files are written), then resumed by the same command: the weights, optimizer state,
    log and counters equal those of an uninterrupted run of the plain loop."""
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    killed.mkdir()
    straight.mkdir()

    log = open(killed / "first.log", "w")
    proc = subprocess.Popen(TRAIN_CMD + fast, cwd=killed, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        states: list[Path] = []
        while not states and time.monotonic() < deadline and proc.poll() is None:
            states = list(killed.glob("checkpoints/*/state.pt"))
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        log.close()
    assert states, "no state.pt appeared: " + (killed / "first.log").read_text()[-2000:]
    assert proc.returncode == -signal.SIGKILL, "training finished before it could be killed"
    state_path = states[0]
    run_id = state_path.parent.name
    epoch_at_kill = safe_load(state_path, STATE_FORMAT)["progress"]["epoch"]
    assert 1 <= epoch_at_kill < 4

    out = _run_to_completion(killed, fast)  # the same command resumes ...
    assert f"run {run_id} trained" in out
    for epoch in range(1, 5):  # ... after the last saved epoch, without redoing earlier ones
        assert (f"epoch {epoch}/4" in out) == (epoch > epoch_at_kill), out
    out_straight = _run_to_completion(straight)
    assert f"run {run_id} trained" in out_straight and all(f"epoch {e}/4" in out_straight for e in range(1, 5))

    a = safe_load(killed / "checkpoints" / run_id / "last.pt", MODEL_FORMAT)
    b = safe_load(straight / "checkpoints" / run_id / "last.pt", MODEL_FORMAT)
    assert a["epoch"] == b["epoch"] == 4
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key

    sa = safe_load(killed / "checkpoints" / run_id / "state.pt", STATE_FORMAT)
    sb = safe_load(straight / "checkpoints" / run_id / "state.pt", STATE_FORMAT)
    for pa, pb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        for key in pa:
            assert torch.equal(torch.as_tensor(pa[key]), torch.as_tensor(pb[key])), key
    metrics = ("epoch", "loss", "clean_acc", "robust_acc", "lr")
    assert [[e[m] for m in metrics] for e in sa["progress"]["log"]] == \
        [[e[m] for m in metrics] for e in sb["progress"]["log"]]
    for key in ("epoch", "best_epoch", "best_score", "forward", "backward", "samples"):
        assert sa["progress"][key] == sb["progress"][key], key

    with Store(str(killed / "results.db")).session() as s:
        run = s.get(Run, run_id)
        assert (run.status, run.epochs_done, run.best_epoch) == ("completed", 4, sb["progress"]["best_epoch"])
        assert [r.epoch for r in run.epoch_rows] == [1, 2, 3, 4]


# --------------------------------------------------------------------------- (b) finished runs

def test_second_train_of_a_finished_run_does_no_work(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--defense", "natural", "--dataset", "synthetic", "--epochs", "2", "--device", "cpu",
            "--train", "batch_size=128", "--model-param", "width=8", "--model-param", "hidden=32"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert " trained:" in first and "epoch 2/2" in first
    run_id = first.split("run ", 1)[1].split()[0]
    before = digest_tree(tmp_path / "checkpoints")
    with Store("results.db").session() as s:
        epochs_before = [(r.epoch, r.loss, r.clean_acc, r.robust_acc) for r in s.scalars(select(TrainEpoch))]

    def no_training(*args, **kwargs):
        raise AssertionError("training_step called for a finished run")

    monkeypatch.setattr(DEFENSES.get("natural"), "training_step", no_training)
    assert main(argv) == 0
    second = capsys.readouterr().out
    assert f"run {run_id} already trained (use --force to retrain)" in second
    assert "epoch" not in second.replace("(best.pt, last.pt)", "")
    assert digest_tree(tmp_path / "checkpoints") == before
    with Store("results.db").session() as s:
        assert [(r.epoch, r.loss, r.clean_acc, r.robust_acc) for r in s.scalars(select(TrainEpoch))] == epochs_before
        assert s.get(Run, run_id).status == "completed"


# --------------------------------------------------------------------------- (c) diverged loss

def test_nan_loss_fails_cleanly_and_keeps_the_last_good_checkpoint(tmp_path, data, registered):
    root = tmp_path / "checkpoints"
    snapshot: dict[str, bytes] = {}

    class NaNAtEpoch2(Defense):
        @dataclass(frozen=True)
        class Config:
            pass

        def on_epoch_start(self, epoch, ctx):
            if epoch == 2:  # what epoch 1 left on disk
                snapshot.update(files(root / run_id))

        def training_step(self, model, x, y, ctx):
            loss = F.cross_entropy(model(x), y)
            return loss * float("nan") if ctx.epoch == 2 else loss

    registered(DEFENSES, "test_nan_at_epoch_2", NaNAtEpoch2)
    spec = spec_for("test_nan_at_epoch_2")
    run_id = spec.run_id
    store = Store(str(tmp_path / "results.db"))
    with pytest.raises(BenchError, match=r"diverged: loss became nan at epoch 2, step 1") as info:
        train(spec, data, store=store, checkpoint_root=root, progress=False)
    assert "epoch 1" in str(info.value) and str(root / run_id) in str(info.value)
    assert sorted(snapshot) == ["best.pt", "last.pt", "state.pt"]
    assert files(root / run_id) == snapshot  # byte-identical, no temporary files left
    assert safe_load(root / run_id / "state.pt", STATE_FORMAT)["progress"]["epoch"] == 1
    with Store(str(tmp_path / "results.db")).session() as s:
        run = s.get(Run, run_id)
        assert run.status == "failed"
        assert "loss became nan at epoch 2" in run.error
        assert run.epochs_done == 1 and [r.epoch for r in run.epoch_rows] == [1]


# --------------------------------------------------------------------------- (d) LR schedules

@pytest.mark.parametrize("schedule, expected", [
    ("constant", {0: 0.1, 37: 0.1, 99: 0.1}),
    ("piecewise", {0: 0.1, 49: 0.1, 50: 0.1 * 0.1, 74: 0.1 * 0.1, 75: 0.1 * 0.1 ** 2, 99: 0.1 * 0.1 ** 2}),
    ("cosine", {0: 0.1, 25: 0.05 * (1 + math.cos(math.pi / 4)), 50: 0.05, 75: 0.05 * (1 - math.cos(math.pi / 4)),
                100: 0.0}),
    ("cyclic", {0: 0.0, 20: 0.05, 40: 0.1, 70: 0.05, 100: 0.0}),
])
def test_lr_schedules(schedule, expected):
    cfg = TrainConfig(schedule=schedule, lr=0.1)
    for step, lr in expected.items():
        assert lr_at(cfg, step, 100) == pytest.approx(lr, rel=1e-12, abs=1e-15), (schedule, step)


def test_piecewise_milestones_and_gamma():
    cfg = TrainConfig(schedule="piecewise", lr=0.2, milestones=(0.25,), gamma=0.5)
    assert [lr_at(cfg, s, 8) for s in range(8)] == [0.2, 0.2, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]
    assert lr_at(TrainConfig(schedule="constant", lr=0.3), 5, 0) == 0.3  # no division by zero


# --------------------------------------------------------------------------- (e) config validation

def test_train_config_validation():
    with pytest.raises(BenchError, match="unknown optimizer 'adamw'. Did you mean 'adam'. Accepted: "
                                         + ", ".join(OPTIMIZERS)):
        build_train_config({"optimizer": "adamw"})
    with pytest.raises(BenchError, match="unknown LR schedule 'linear'.* Accepted: " + ", ".join(SCHEDULES)):
        build_train_config({"schedule": "linear"})
    with pytest.raises(BenchError, match="unknown parameter 'epoch' for training. Did you mean 'epochs'"):
        build_train_config({"epoch": 3})
    with pytest.raises(BenchError, match="epochs must be >= 1, got 0"):
        build_train_config({"epochs": 0})
    with pytest.raises(BenchError, match="batch_size must be >= 1, got -1"):
        build_train_config({"batch_size": -1})
    with pytest.raises(BenchError, match="lr must be > 0, got -0.1"):
        build_train_config({"lr": -0.1})
    with pytest.raises(BenchError, match="'lr' must be a number"):
        build_train_config({"lr": float("nan")})
    with pytest.raises(BenchError, match="must be an integer"):
        build_train_config({"epochs": "3"})
    assert build_train_config({"lr": "1/10", "milestones": [0.3]}) == TrainConfig(lr=0.1, milestones=(0.3,))


# --------------------------------------------------------------------------- (f) run ids

def test_run_id_identity():
    base = spec_for("pgd_at")
    assert base.run_id == spec_for("pgd_at").run_id
    assert len(base.run_id) == 16 and int(base.run_id, 16) >= 0
    assert spec_for("pgd_at", {"steps": 5}).run_id != base.run_id
    assert spec_for("pgd_at", {"steps": 10, "step_ratio": 0.25}).run_id == base.run_id  # explicit defaults
    assert spec_for("pgd_at", {"step_ratio": "1/4"}).run_id == base.run_id              # same value, other spelling
    relabeled = RunSpec(**{**base.__dict__, "label": "another label"})
    assert relabeled.run_id == base.run_id                                               # a label is display only
    for change in ({"seed": 1}, {"dataset_options": {**OPTIONS, "n_train": 64}},
                   {"threat": ThreatModel("Linf", 0.2)}, {"model_params": {"width": 8}}):
        assert RunSpec(**{**base.__dict__, **change}).run_id != base.run_id, change
    assert spec_for("pgd_at", epochs=4).run_id != base.run_id
    assert spec_for("trades").run_id != base.run_id
    with pytest.raises(BenchError, match="unknown parameter 'stpes' for defense 'pgd_at'. Did you mean 'steps'"):
        spec_for("pgd_at", {"stpes": 5}).run_id


@pytest.mark.parametrize("change", [
    {"model_params": {"width": 32, "hidden": 200}},  # small_cnn's defaults
    {"dataset_options": {"n_train": 256, "n_val": 64, "n_test": 128, "num_classes": 4, "seed": 0}},  # synthetic's
], ids=["model_params", "dataset_options"])
def test_run_id_explicit_defaults_equal_omitted(change):
    """Naming a default builds the same model on the same data, so it is the same run (as for
    defense parameters): `train --dataset synthetic` and a suite spelling out the defaults must
    share checkpoints."""
    base = RunSpec(**{**spec_for("pgd_at").__dict__, "dataset_options": {}})
    explicit = RunSpec(**{**base.__dict__, **change})
    assert explicit.run_id == base.run_id


# --------------------------------------------------------------------------- (g) best.pt

def _epochs(store: Store, run_id: str) -> list[TrainEpoch]:
    with store.session() as s:
        return list(s.scalars(select(TrainEpoch).where(TrainEpoch.run_id == run_id).order_by(TrainEpoch.epoch)))


def _check_best(store: Store, directory: Path, run_id: str, best_epoch: int) -> None:
    with store.session() as s:
        assert s.get(Run, run_id).best_epoch == best_epoch
        rows = store.run_checkpoints(run_id)
    assert rows["best"].epoch == best_epoch and rows["best"].sha256 == sha256_file(directory / "best.pt")
    assert rows["last"].sha256 == sha256_file(directory / "last.pt")
    assert safe_load(directory / "best.pt", MODEL_FORMAT)["epoch"] == best_epoch
    assert safe_load(directory / "state.pt", STATE_FORMAT)["progress"]["best_epoch"] == best_epoch


def test_best_checkpoint_is_the_best_robust_validation_epoch(tmp_path, data):
    store = Store(str(tmp_path / "results.db"))
    spec = spec_for("pgd_at", {"steps": 3}, epochs=3, batch_size=16)
    result = train(spec, data, store=store, checkpoint_root=tmp_path, progress=False)
    log = _epochs(store, result.run_id)
    assert [r.epoch for r in log] == [1, 2, 3]
    robust = [r.robust_acc for r in log]
    best = int(np.argmax(robust)) + 1  # the first epoch with the highest robust accuracy
    _check_best(store, result.directory, result.run_id, best)


def test_best_checkpoint_of_clean_selection_is_an_earlier_epoch(tmp_path, data, registered):
    """Epochs 1-2 learn the labels, epoch 3 learns wrong ones: best.pt must hold an earlier
    epoch's weights (byte-identical to that epoch's last.pt), chosen by clean accuracy."""
    root = tmp_path / "checkpoints"
    last_after: dict[int, bytes] = {}

    class Unlearn(Defense):
        selection_metric = "clean"

        @dataclass(frozen=True)
        class Config:
            pass

        def on_epoch_start(self, epoch, ctx):
            if epoch > 1:
                last_after[epoch - 1] = (root / run_id / "last.pt").read_bytes()

        def training_step(self, model, x, y, ctx):
            target = (y + 1) % ctx.num_classes if ctx.epoch == 3 else y
            return F.cross_entropy(model(x), target)

    registered(DEFENSES, "test_unlearn_at_epoch_3", Unlearn)
    spec = spec_for("test_unlearn_at_epoch_3", epochs=3, batch_size=16)
    run_id = spec.run_id
    store = Store(str(tmp_path / "results.db"))
    train(spec, data, store=store, checkpoint_root=root, progress=False)
    log = _epochs(store, run_id)
    clean = [r.clean_acc for r in log]
    best = int(np.argmax(clean)) + 1
    assert best < 3 and clean[2] < clean[best - 1], clean  # the set-up works: the last epoch is worse
    _check_best(store, root / run_id, run_id, best)
    assert (root / run_id / "best.pt").read_bytes() == last_after[best]
    assert sha256_file(root / run_id / "best.pt") != sha256_file(root / run_id / "last.pt")


# --------------------------------------------------------------------------- (h) the fast path on the CPU

def _state(directory: Path) -> dict:
    return safe_load(directory / "state.pt", STATE_FORMAT)


def test_cpu_fast_path_options_change_no_bit(tmp_path, data):
    """Deferred finiteness checks (one sync every 3 of 8 steps) and background checkpoint writes:
    the checkpoint files are byte-identical to the plain loop's, and so are the optimizer state,
    the per-epoch log and the counters in state.pt; the run's provenance records the options."""
    spec = spec_for("pgd_at", {"steps": 2}, epochs=3, batch_size=16)
    fast = FastPath(sync_every=3, background_checkpoints=True)
    dirs = {}
    for name, options in (("plain", None), ("fast", fast)):
        store = Store(str(tmp_path / f"{name}.db"))
        dirs[name] = train(spec, data, store=store, checkpoint_root=tmp_path / name, progress=False,
                           fast=options).directory
        with store.session() as s:
            assert s.get(Run, spec.run_id).config["fast_path"] == (options or FastPath()).record()
    for kind in ("last.pt", "best.pt"):
        assert (dirs["plain"] / kind).read_bytes() == (dirs["fast"] / kind).read_bytes(), kind
    a, b = _state(dirs["plain"]), _state(dirs["fast"])
    assert a["files"] == b["files"] and a["progress"]["best_epoch"] == b["progress"]["best_epoch"]
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(torch.as_tensor(pa[k]), torch.as_tensor(pb[k])) for k in pa)
    timeless = [{k: v for k, v in e.items() if k != "seconds"} for e in a["progress"]["log"]]
    assert timeless == [{k: v for k, v in e.items() if k != "seconds"} for e in b["progress"]["log"]]
    for key in ("forward", "backward", "samples"):
        assert a["progress"][key] == b["progress"][key]


@pytest.mark.parametrize("raise_after_nan", [False, True], ids=["nan", "nan-then-a-crash"])
def test_a_deferred_check_still_names_the_first_diverged_step(tmp_path, data, registered, raise_after_nan):
    """A finiteness check every 4 steps and background writes: a NaN at step 3 of epoch 2 fails the
    run naming step 3 (not the step of the check), epoch 1's files are kept complete and consistent,
    and a defense that crashes on the weights the NaN left (step 4) still ends in the divergence error."""
    root = tmp_path / "checkpoints"

    class NaNAtStep3(Defense):
        @dataclass(frozen=True)
        class Config:
            pass

        def training_step(self, model, x, y, ctx):
            step = ctx.step - ctx.steps_per_epoch
            if raise_after_nan and step == 3:
                raise RuntimeError("weights are NaN")
            loss = F.cross_entropy(model(x), y)
            return loss * float("nan") if step == 2 else loss

    registered(DEFENSES, "test_nan_at_step_3", NaNAtStep3)
    spec = spec_for("test_nan_at_step_3", batch_size=16)  # 8 steps per epoch
    run_id = spec.run_id
    store = Store(str(tmp_path / "results.db"))
    with pytest.raises(BenchError, match=r"diverged: loss became nan at epoch 2, step 3; the last good checkpoint "
                                         r"\(epoch 1\)"):
        train(spec, data, store=store, checkpoint_root=root, progress=False,
              fast=FastPath(sync_every=4, background_checkpoints=True))
    assert sorted(files(root / run_id)) == ["best.pt", "last.pt", "state.pt"]  # no temporary or staged file
    state = _state(root / run_id)
    assert state["progress"]["epoch"] == 1 and safe_load(root / run_id / "last.pt", MODEL_FORMAT)["epoch"] == 1
    assert state["files"] == {kind: sha256_file(root / run_id / f"{kind}.pt") for kind in ("last", "best")}
    with store.session() as s:
        run = s.get(Run, run_id)
        assert (run.status, run.epochs_done) == ("failed", 1) and "epoch 2, step 3" in run.error


def test_a_failed_background_write_fails_the_run_and_keeps_the_previous_file(tmp_path, data, monkeypatch):
    spec = spec_for("natural", epochs=2, batch_size=64)
    root = tmp_path / "checkpoints"
    real_save, calls = torch.save, []

    def full_disk(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) > 2:  # epoch 1's last.pt and state.pt are written; epoch 2's last.pt is not
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr("bench.engine.checkpoint.torch.save", full_disk)
    with pytest.raises(BenchError, match="cannot write .*last.pt.*No space left on device"):
        train(spec, data, store=Store(str(tmp_path / "r.db")), checkpoint_root=root, progress=False,
              fast=FastPath(background_checkpoints=True))
    assert safe_load(root / spec.run_id / "last.pt", MODEL_FORMAT)["epoch"] == 1
    assert sorted(p.name for p in (root / spec.run_id).iterdir()) == ["best.pt", "last.pt", "state.pt"]


def test_an_interrupted_epochs_staged_best_is_finished_or_dropped(tmp_path, data):
    """state.pt is the commit point of an epoch's files: a best.pt staged before a kill is moved in
    place when state.pt records it (the kill fell after the commit) and removed when it does not;
    `verify_checkpoints` accepts a recorded staged file and changes nothing."""
    spec = spec_for("natural", epochs=2, batch_size=64)
    root = tmp_path / "checkpoints"
    train(spec, data, store=Store(str(tmp_path / "r.db")), checkpoint_root=root, progress=False)
    directory = root / spec.run_id
    saved = _state(directory)
    new_best = safe_load(directory / "last.pt", MODEL_FORMAT)
    atomic_save({**new_best, "epoch": 99}, directory / STAGED_BEST)
    recover(directory, saved)  # not recorded: written before the kill reached state.pt
    assert not (directory / STAGED_BEST).exists() and sha256_file(directory / "best.pt") == saved["files"]["best"]

    atomic_save({**new_best, "epoch": 99}, directory / STAGED_BEST)
    committed = {**saved, "files": {**saved["files"], "best": sha256_file(directory / STAGED_BEST)}}
    atomic_save(committed, directory / "state.pt")  # the kill fell between state.pt and the move
    before = files(directory)
    verify_checkpoints(spec, root)
    assert files(directory) == before
    train(spec, data, store=Store(str(tmp_path / "r.db")), checkpoint_root=root, progress=False)  # complete: recovers
    assert not (directory / STAGED_BEST).exists()
    assert safe_load(directory / "best.pt", MODEL_FORMAT)["epoch"] == 99
    verify_checkpoints(spec, root)


def test_compile_is_off_for_a_double_backward_defense(tmp_path, data, capsys):
    spec = spec_for("jacobian_reg", epochs=1, batch_size=64)
    store = Store(str(tmp_path / "r.db"))
    train(spec, data, store=store, checkpoint_root=tmp_path, fast=FastPath(compile=True))
    assert "torch.compile off" in capsys.readouterr().out
    with store.session() as s:
        assert s.get(Run, spec.run_id).config["fast_path"]["compile"] is False


@pytest.mark.slow
def test_compiled_model_trains_and_resumes(tmp_path, data):
    """torch.compile (CPU inductor; minutes to compile): a run trains with finite losses, its
    checkpoints hold the plain state_dict keys, and the weights stay within float rounding of the
    eager run's."""
    spec = spec_for("pgd_at", {"steps": 2}, epochs=2, batch_size=64)
    eager = train(spec, data, store=Store(str(tmp_path / "e.db")), checkpoint_root=tmp_path / "e", progress=False)
    compiled = train(spec, data, store=Store(str(tmp_path / "c.db")), checkpoint_root=tmp_path / "c", progress=False,
                     fast=FastPath(compile=True))
    a = safe_load(eager.directory / "last.pt", MODEL_FORMAT)["state_dict"]
    b = safe_load(compiled.directory / "last.pt", MODEL_FORMAT)["state_dict"]
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k].float(), b[k].float(), rtol=1e-3, atol=1e-4) for k in a)
