"""bench.engine.curves: every point equals the separate evaluation it stands for (trajectory and restarts
shortcuts included, across batches), points are stored once and reused, the eps grid."""

from __future__ import annotations

import math

import pytest
import torch
from sqlalchemy import select

from bench.core.data import load_dataset
from bench.core.errors import BenchError
from bench.core.threat import ThreatModel
from bench.engine.curves import CurveSettings, _convergence, default_eps_grid
from bench.engine.evaluation import AttackSpec, SampleSet
from bench.engine.runspec import RunSpec, build_train_config
from bench.engine.stage import evaluate_checkpoint
from bench.engine.trainer import train
from bench.store import Store
from bench.store.schema import Curve, Evaluation, SampleResult

OPTIONS = {"n_train": 128, "n_val": 32, "n_test": 40}
EPS = 0.05
BATCH = 16  # 40 samples: batches of 16, 16 and 8, so per-batch seeding is exercised
SETTINGS = CurveSettings(n_samples=None, eps=(0.05, 0.1, 0.3), eps_steps=3, steps=(1, 3, 7), restarts=(1, 2, 4),
                         restart_steps=1)


def quiet(_):
    pass


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", **OPTIONS)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("curves")
    spec = RunSpec(defense="natural", dataset="synthetic", model="small_cnn", threat=ThreatModel("Linf", EPS),
                   train=build_train_config({"epochs": 3, "batch_size": 16, "optimizer": "adam", "lr": 0.003,
                                             "weight_decay": 0.0, "val_steps": 2}),
                   model_params={"width": 8, "hidden": 32}, dataset_options=OPTIONS, seed=0)
    return train(spec, data, store=Store(str(root / "t.db")), checkpoint_root=root / "ck", progress=False).directory / "best.pt"


def per_sample(store: Store, evaluation_id: int) -> tuple[list[bool], list[float]]:
    with store.session() as s:
        rows = s.scalars(select(SampleResult).where(SampleResult.evaluation_id == evaluation_id)
                         .order_by(SampleResult.sample_index)).all()
        return [r.correct for r in rows], [r.loss for r in rows]


def curve_points(store: Store, name: str) -> dict[float, int]:
    with store.session() as s:
        curve = s.scalar(select(Curve).where(Curve.name == name))
        return {p.x: p.evaluation_id for p in curve.points}


def test_every_point_equals_its_separate_evaluation(tmp_path, checkpoint, data):
    """The steps curve comes from one 7-step trajectory and the restarts curve from one run of 4
    restarts (of 1 step, so that restarts from other random starts fool other samples); each point must hold exactly what a separate run of that PGD gives (same seed and
    batches), sample by sample, loss included."""
    joint = Store(str(tmp_path / "joint.db"))
    evaluate_checkpoint(joint, checkpoint, data, [], batch_size=BATCH, curves=SETTINGS, log=quiet)
    separate = Store(str(tmp_path / "separate.db"))
    cases = [("steps:pgd", t, {"steps": t, "step_size": 0.025 * EPS}) for t in SETTINGS.steps] + \
            [("restarts:pgd", r, {"steps": 1, "restarts": r}) for r in SETTINGS.restarts] + \
            [("eps:pgd", e, {"eps": e, "steps": 3}) for e in SETTINGS.eps]
    accuracies = set()
    for curve, x, params in cases:
        spec = AttackSpec(f"{curve}{x}", "pgd", {"norm": "Linf", "eps": EPS, **params})
        outcome = evaluate_checkpoint(separate, checkpoint, data, [spec], batch_size=BATCH, log=quiet).outcomes[1]
        got = per_sample(joint, curve_points(joint, curve)[x])
        want = per_sample(separate, outcome.evaluation_id)
        assert got[0] == want[0], (curve, x)
        assert got[1] == pytest.approx(want[1], rel=1e-6, abs=1e-6), (curve, x)
        accuracies.add((curve, sum(want[0])))
    # the points differ from each other (the comparison is not between constant results)
    assert len({a for c, a in accuracies if c == "steps:pgd"}) >= 2
    assert len({a for c, a in accuracies if c == "restarts:pgd"}) >= 2


def test_curves_are_stored_once_and_reused(tmp_path, checkpoint, data):
    store = Store(str(tmp_path / "r.db"))
    first = evaluate_checkpoint(store, checkpoint, data, [], batch_size=BATCH, curves=SETTINGS, log=quiet)
    # clean twice (the evaluation subset and the curves' subset are the same set here: one row), fgsm/pgd
    # at 3 eps each, 3 steps points, 3 restarts points
    assert first.computed == 1 + 2 * 3 + 3 + 3
    with store.session() as s:
        assert {c.name for c in s.scalars(select(Curve))} == {"eps:fgsm", "eps:pgd", "steps:pgd", "restarts:pgd"}
        eps_points = [p.x for p in s.scalar(select(Curve).where(Curve.name == "eps:pgd")).points]
    assert eps_points == [0.0, 0.05, 0.1, 0.3]
    again = evaluate_checkpoint(store, checkpoint, data, [], batch_size=BATCH, curves=SETTINGS, log=quiet)
    assert again.computed == 0
    # an attack identical to a curve point is that point: nothing is computed, the row becomes an attack
    spec = AttackSpec("pgd3_small_step", "pgd", {"norm": "Linf", "eps": EPS, "steps": 3, "step_size": 0.025 * EPS})
    third = evaluate_checkpoint(store, checkpoint, data, [spec], batch_size=BATCH, curves=SETTINGS, log=quiet)
    assert third.computed == 0 and third.outcomes[1].cached
    with store.session() as s:
        row = s.get(Evaluation, third.outcomes[1].evaluation_id)
        assert (row.role, row.label) == ("attack", "pgd3_small_step")
        assert row.evaluation_id == curve_points(store, "steps:pgd")[3]


def test_force_recomputes_and_keeps_the_curve_pointing_at_rows(tmp_path, checkpoint, data):
    store = Store(str(tmp_path / "f.db"))
    evaluate_checkpoint(store, checkpoint, data, [], batch_size=BATCH, curves=SETTINGS, log=quiet)
    before = {name: per_sample(store, eid) for name, eid in curve_points(store, "steps:pgd").items()}
    redo = evaluate_checkpoint(store, checkpoint, data, [], batch_size=BATCH, curves=SETTINGS, force=True, log=quiet)
    assert redo.computed == 1 + 2 * 3 + 3 + 3
    after = {name: per_sample(store, eid) for name, eid in curve_points(store, "steps:pgd").items()}
    assert after == before  # deterministic, and every point refers to an existing row
    with store.session() as s:
        assert s.scalar(select(Evaluation).where(Evaluation.role == "curve").limit(1)) is not None


def test_default_eps_grid_reaches_the_whole_cube():
    assert default_eps_grid(ThreatModel("Linf", 0.1), (1, 8, 8)) == [0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 1.0]
    assert default_eps_grid(ThreatModel("Linf", 0.3), (1, 28, 28))[-3:] == [0.6, 0.9, 1.0]  # 1.2 is beyond the cube
    grid = default_eps_grid(ThreatModel("L2", 0.5), (3, 32, 32))
    assert grid[0] == 0.125 and grid[-2] == 2.0 and grid[-1] == pytest.approx(math.sqrt(3 * 32 * 32))


@pytest.mark.parametrize("params", [{"eps": (0.0,)}, {"steps": ()}, {"steps": (0, 5)}, {"restarts": (0,)},
                                    {"step_fraction": 0.0}, {"eps_steps": 0}])
def test_bad_curve_settings_are_refused(params):
    with pytest.raises(BenchError):
        CurveSettings(**params)


def test_convergence_flags_samples_whose_loss_still_rises():
    """Pintor et al.'s incomplete optimization on hand-made traces of 100 steps: sample 0 flat,
    sample 1 still rising in the last 10 steps, sample 2 rising but already fooled (not counted)."""
    steps = torch.arange(101, dtype=torch.float32)
    trace = torch.stack([torch.ones(101), 1 + steps / 100, 1 + steps / 100], dim=1)
    robust = torch.tensor([True, True, False])
    samples = SampleSet([10, 11, 12], "h", torch.zeros(3, 1), torch.zeros(3))
    out = _convergence(trace, robust, samples)
    assert (out["not_converged"], out["not_converged_indices"], out["robust_at_end"]) == (1, [11], 2)
    assert len(out["loss_trace"]) == 101
