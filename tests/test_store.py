"""bench.store: round trip through a SQLite file, identity constraints, replacement of an
evaluation, transactions that roll back, the recorded schema version, URL form."""

from __future__ import annotations

import datetime as dt
import sqlite3

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from bench.errors import BenchError
from bench.store import (SCHEMA_VERSION, Checkpoint, Curve, Evaluation, Run, SampleResult, SanityCheck, SchemaInfo, Store,
                         TrainEpoch, database_url)

SHA = "ab" * 32
PROV = {"git_commit": "0123abcd-dirty", "versions": {"torch": "2.13.0", "python": "3.11.0"},
        "device": "cpu (x86_64, 1 threads)", "seed": 7}
CONFIG = {"defense": "pgd_at", "defense_params": {"steps": 10, "step_ratio": 0.25}, "eps": 0.1,
          "train": {"epochs": 3, "milestones": [0.5, 0.75]}, "nested": {"list": [1, 2.5, "x", None, True]}}


def _run(run_id="run-1", **kw):
    values = dict(run_id=run_id, label="PGD-AT <b>", defense="pgd_at", dataset="synthetic", model="small_cnn",
                  norm="Linf", eps=0.1, epochs=3, status="completed", epochs_done=3, best_epoch=2,
                  train_seconds=12.5, forward_per_sample=33.0, backward_per_sample=30.0, config=CONFIG, **PROV)
    values.update(kw)
    return Run(**values)


def _evaluation(attack="pgd", config_hash="cfg1", indices_hash="idx1", seed=0, robust_acc=0.5, label="pgd20",
                sha=SHA):
    return Evaluation(checkpoint_sha256=sha, label=label, attack=attack, norm="Linf", eps=0.1,
                      config_hash=config_hash, indices_hash=indices_hash, dataset="synthetic", n_samples=4,
                      n_correct=int(robust_acc * 4), robust_acc=robust_acc, forward_passes=84, backward_passes=80,
                      seconds=0.25, implementation="atbench", role="attack",
                      **{**PROV, "seed": seed}, config={"attack": attack, "params": {"steps": 20}})


def _count(store, table) -> int:
    with store.session() as s:
        return s.scalar(select(func.count()).select_from(table))


def _columns(row) -> dict:
    return {c.key: getattr(row, c.key) for c in row.__table__.columns}


@pytest.fixture
def db(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return str(tmp_path / "results.db")


def test_round_trip_through_the_file(db):
    store = Store(db)
    with store.session() as s:
        run = _run()
        run.epoch_rows = [TrainEpoch(epoch=e, loss=1.0 / e, clean_acc=0.5 + 0.1 * e, robust_acc=0.25 + 0.05 * e,
                                     lr=0.1 * 0.1 ** (e - 1), seconds=1.5 * e) for e in (1, 2, 3)]
        s.add(run)
        s.flush()
        store.set_checkpoint(s, "run-1", "best", "checkpoints/run-1/best.pt", SHA, 2,
                             config={"checkpoint": "best"}, **PROV)
        s.add(SanityCheck(checkpoint_sha256=SHA, norm="Linf", eps=0.1, name="zero_gradients", status="warn", value=1e-9, threshold=1e-8,
                          evidence={"fraction": 0.25, "samples": [3, 5]}, config={"check": "zero_gradients"}, **PROV))
    evaluation = _evaluation()
    store.save_evaluation(evaluation, [10, 3, 7, 42], [True, False, True, False], [0.1, 0.0999, 0.05, 0.1])
    assert evaluation.evaluation_id is not None

    # a second Store over the same file (a new process would see the same)
    again = Store(db)
    assert again.url == store.url == f"sqlite:///{db}"
    with again.session() as s:
        run = s.get(Run, "run-1")
        got = _columns(run)
        assert got["config"] == CONFIG  # JSON survives, nested lists and None included
        for key, value in PROV.items():
            assert got[key] == value, key
        assert isinstance(got["created_at"], dt.datetime) and isinstance(got["updated_at"], dt.datetime)
        assert abs(got["created_at"] - dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)) < dt.timedelta(minutes=5)
        assert (got["label"], got["defense"], got["dataset"], got["model"], got["norm"], got["eps"]) == \
            ("PGD-AT <b>", "pgd_at", "synthetic", "small_cnn", "Linf", 0.1)
        assert (got["status"], got["epochs"], got["epochs_done"], got["best_epoch"]) == ("completed", 3, 3, 2)
        assert (got["train_seconds"], got["forward_per_sample"], got["backward_per_sample"]) == (12.5, 33.0, 30.0)
        assert got["error"] is None
        assert [(r.epoch, r.loss, r.clean_acc, r.robust_acc, r.lr, r.seconds) for r in run.epoch_rows] == \
            [(e, 1.0 / e, 0.5 + 0.1 * e, 0.25 + 0.05 * e, 0.1 * 0.1 ** (e - 1), 1.5 * e) for e in (1, 2, 3)]
        assert all(r.run_id == "run-1" for r in run.epoch_rows)

        ck = s.scalars(select(Checkpoint)).all()
        assert len(ck) == 1
        assert (ck[0].run_id, ck[0].kind, ck[0].path, ck[0].sha256, ck[0].epoch) == \
            ("run-1", "best", "checkpoints/run-1/best.pt", SHA, 2)
        assert ck[0].config == {"checkpoint": "best"}
        assert (ck[0].git_commit, ck[0].versions, ck[0].device, ck[0].seed) == \
            (PROV["git_commit"], PROV["versions"], PROV["device"], PROV["seed"])
        assert ck[0].created_at is not None

        ev = s.scalars(select(Evaluation)).one()
        got = _columns(ev)
        want = _columns(_evaluation())
        for key in want:
            if key not in ("evaluation_id", "created_at"):
                assert got[key] == want[key], key
        assert got["created_at"] is not None
        assert [(r.sample_index, r.correct, r.perturbation_norm) for r in ev.samples] == \
            [(3, False, 0.0999), (7, True, 0.05), (10, True, 0.1), (42, False, 0.1)]  # ordered by index

        sc = s.scalars(select(SanityCheck)).one()
        assert (sc.checkpoint_sha256, sc.name, sc.status, sc.value, sc.threshold) == \
            (SHA, "zero_gradients", "warn", 1e-9, 1e-8)
        assert sc.evidence == {"fraction": 0.25, "samples": [3, 5]}
        assert sc.config == {"check": "zero_gradients"} and sc.git_commit == PROV["git_commit"]
        assert sc.created_at is not None


def test_set_checkpoint_updates_in_place(db):
    store = Store(db)
    with store.session() as s:
        s.add(_run())
        s.flush()
        first = store.set_checkpoint(s, "run-1", "last", "a/last.pt", "1" * 64, 1, **PROV)
    with store.session() as s:
        second = store.set_checkpoint(s, "run-1", "last", "a/last.pt", "2" * 64, 2, **PROV)
    assert second.checkpoint_id == first.checkpoint_id
    with Store(db).session() as s:
        rows = s.scalars(select(Checkpoint)).all()
        assert [(r.kind, r.sha256, r.epoch) for r in rows] == [("last", "2" * 64, 2)]


def test_evaluation_identity_is_unique(db):
    store = Store(db)
    store.save_evaluation(_evaluation(), [0, 1], [True, False])
    with pytest.raises(IntegrityError):
        with store.session() as s:
            s.add(_evaluation(label="another label, same identity", robust_acc=1.0))
    assert _count(store, Evaluation.__table__) == 1
    # each part of the identity distinguishes: these are all new evaluations
    for kw in ({"attack": "fgsm"}, {"config_hash": "cfg2"}, {"indices_hash": "idx2"}, {"seed": 1}, {"sha": "cd" * 32}):
        with store.session() as s:
            s.add(_evaluation(**kw))
    assert _count(store, Evaluation.__table__) == 6


def test_save_evaluation_replaces_the_same_identity(db):
    store = Store(db)
    store.save_evaluation(_evaluation(robust_acc=0.25), [0, 1, 2, 3], [True, False, False, False])
    other = _evaluation(seed=1)
    store.save_evaluation(other, [0, 1], [False, False])
    newer = _evaluation(robust_acc=0.75)
    store.save_evaluation(newer, [0, 1, 2, 3], [True, True, True, False], [0.0, 0.1, 0.1, 0.1])
    with Store(db).session() as s:
        evs = s.scalars(select(Evaluation).where(Evaluation.seed == 0)).all()
        assert len(evs) == 1
        assert evs[0].evaluation_id == newer.evaluation_id and evs[0].robust_acc == 0.75
        assert [(r.sample_index, r.correct) for r in evs[0].samples] == [(0, True), (1, True), (2, True), (3, False)]
        # the replaced evaluation's per-sample rows are gone, the other evaluation's are kept
        rows = s.execute(select(SampleResult.evaluation_id, func.count()).group_by(SampleResult.evaluation_id)).all()
        assert sorted(rows) == sorted([(newer.evaluation_id, 4), (other.evaluation_id, 2)])


def test_a_failing_save_keeps_the_old_evaluation(db):
    store = Store(db)
    old = _evaluation(robust_acc=0.5)
    store.save_evaluation(old, [0, 1, 2, 3], [True, True, False, False])
    with pytest.raises(IntegrityError):
        store.save_evaluation(_evaluation(robust_acc=1.0), [0, 0], [True, True])  # duplicate sample index
    with Store(db).session() as s:
        ev = s.scalars(select(Evaluation)).one()
        assert ev.evaluation_id == old.evaluation_id and ev.robust_acc == 0.5
        assert [(r.sample_index, r.correct) for r in ev.samples] == [(0, True), (1, True), (2, False), (3, False)]


def test_failing_transaction_rolls_back(db):
    store = Store(db)
    with store.session() as s:
        s.add(_run("kept"))
    with pytest.raises(RuntimeError, match="boom"):
        with store.session() as s:
            s.add(_run("lost"))
            s.flush()  # written inside the transaction ...
            s.get(Run, "kept").status = "failed"
            s.add(TrainEpoch(run_id="lost", epoch=1, loss=1.0, clean_acc=0.5, robust_acc=0.2, lr=0.1, seconds=1.0))
            s.flush()
            raise RuntimeError("boom")  # ... and rolled back here
    with Store(db).session() as s:
        assert s.get(Run, "lost") is None
        assert s.get(Run, "kept").status == "completed"
        assert s.scalar(select(func.count()).select_from(TrainEpoch)) == 0


def test_foreign_keys_are_enforced(db):
    store = Store(db)
    with pytest.raises(IntegrityError):
        with store.session() as s:
            s.add(TrainEpoch(run_id="no-such-run", epoch=1, loss=1.0, clean_acc=0.5, robust_acc=0.2, lr=0.1,
                             seconds=1.0))
    assert _count(store, TrainEpoch.__table__) == 0


def test_schema_version_is_recorded(db):
    Store(db)
    with sqlite3.connect(db) as con:
        assert con.execute("select value from schema_info where key = 'schema_version'").fetchall() == \
            [(str(SCHEMA_VERSION),)]
        tables = {r[0] for r in con.execute("select name from sqlite_master where type = 'table'")}
    assert {"runs", "train_epochs", "checkpoints", "evaluations", "sample_results", "sanity_checks",
            "schema_info"} <= tables
    with Store(db).session() as s:  # reopening does not add a second row
        assert [(r.key, r.value) for r in s.scalars(select(SchemaInfo))] == [("schema_version", str(SCHEMA_VERSION))]


def test_sqlalchemy_url_form(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "via_url.db"
    store = Store(f"sqlite:///{path}")
    assert store.url == f"sqlite:///{path}"
    with store.session() as s:
        s.add(_run())
    assert path.is_file()
    with Store(str(path)).session() as s:  # the plain path opens the same database
        assert s.get(Run, "run-1").label == "PGD-AT <b>"
    assert database_url("results.db") == f"sqlite:///{tmp_path / 'results.db'}"
    assert database_url("postgresql://u@h/db") == "postgresql://u@h/db"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("via_url.db")) == []


def test_a_version_1_database_is_migrated_and_keeps_its_rows(db):
    """Schema 1 lacked evaluations.role/mean_loss/diagnostics, sample_results.loss,
    sanity_checks.summary and the curve tables: opening it adds them and keeps every row."""
    store = Store(db)
    store.save_evaluation(_evaluation(), [0, 1, 2, 3], [True, False, True, False], [0.1, 0.1, 0.1, 0.1])
    store.engine.dispose()
    with sqlite3.connect(db) as con:
        con.execute("drop index ix_evaluations_role")
        for table, column in [("evaluations", "role"), ("evaluations", "mean_loss"), ("evaluations", "diagnostics"),
                              ("sample_results", "loss")]:
            con.execute(f"alter table {table} drop column {column}")
        con.execute("drop table sanity_checks")  # schema 1's, keyed by (checkpoint, name), never written
        con.execute("create table sanity_checks (sanity_check_id integer primary key, checkpoint_sha256 varchar(64), "
                    "name varchar(100), status varchar(10), value float, threshold float, evidence json)")
        con.execute("drop table curve_points")
        con.execute("drop table curves")
        con.execute("update schema_info set value = '1' where key = 'schema_version'")
    store = Store(db)
    with store.session() as s:
        (ev,) = s.scalars(select(Evaluation)).all()
        assert ev.role == "attack" and ev.mean_loss is None and ev.robust_acc == 0.5
        assert [r.correct for r in ev.samples] == [True, False, True, False]
        assert all(r.loss is None for r in ev.samples)
        assert s.get(SchemaInfo, "schema_version").value == str(SCHEMA_VERSION)
    assert _count(store, Curve) == 0 and _count(store, SanityCheck) == 0
    with sqlite3.connect(db) as con:
        assert ("ix_evaluations_role",) in con.execute("select name from sqlite_master where type = 'index'").fetchall()


def test_wrong_schema_version_is_a_bench_error(db):
    Store(db)
    with sqlite3.connect(db) as con:
        con.execute("update schema_info set value = ? where key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    with pytest.raises(BenchError, match=rf"schema version {SCHEMA_VERSION + 1}"):
        Store(db)
    with sqlite3.connect(db) as con:  # and it did not "fix" the recorded version
        assert con.execute("select value from schema_info").fetchall() == [(str(SCHEMA_VERSION + 1),)]


def test_unopenable_database_is_a_bench_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BenchError, match="cannot open database"):
        Store(str(tmp_path / "no" / "such" / "folder" / "results.db"))
    with pytest.raises(BenchError, match="cannot open database"):
        Store("nosuchdialect://x/y")
    (tmp_path / "garbage.db").write_bytes(b"this is not a sqlite database" * 100)
    with pytest.raises(BenchError, match="cannot open database"):
        Store(str(tmp_path / "garbage.db"))
