"""bench.store: round trip through a SQLite file, identity constraints, replacement of an
evaluation, transactions that roll back, checkpoints by sha256, the per-sample matrix, the
recorded schema revision and migrations (a schema-2 database from before Alembic, a schema-1
one), URL form."""

from __future__ import annotations

import datetime as dt
import gzip
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from bench.core.errors import BenchError
from bench.core.threat import threat_key
from bench.store import Store, database_url
from bench.store.migrate import head_revision
from bench.store.schema import (AdversarialExample, Checkpoint, Curve, CurvePoint, Evaluation, Run, RunCheckpoint,
                                SampleResult, SanityCheck, TrainEpoch)

SCHEMA_2_DUMP = Path(__file__).parent / "data" / "results-schema2.sql.gz"

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
                checkpoint_id=1):
    return Evaluation(checkpoint_id=checkpoint_id, label=label, attack=attack, norm="Linf", eps=0.1,
                      threat=threat_key("Linf", 0.1), config_hash=config_hash, indices_hash=indices_hash, dataset="synthetic", n_samples=4,
                      n_correct=int(robust_acc * 4), robust_acc=robust_acc, forward_passes=84, backward_passes=80,
                      seconds=0.25, implementation="atbench", role="attack",
                      **{**PROV, "seed": seed}, config={"attack": attack, "params": {"steps": 20}})


def _count(store, table) -> int:
    with store.session() as s:
        return s.scalar(select(func.count()).select_from(table))


def _columns(row) -> dict:
    return {c.key: getattr(row, c.key) for c in row.__table__.columns}


@pytest.fixture
def db(db_url, tmp_path, monkeypatch):
    """A new database of each backend (SQLite file, PostgreSQL; see conftest.db_url)."""
    monkeypatch.chdir(tmp_path)
    return db_url


@pytest.fixture
def sqlite_db(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return str(tmp_path / "results.db")


@pytest.fixture
def store(db):
    """A new store holding checkpoints 1 and 2 (no run)."""
    store = Store(db)
    for sha in (SHA, "cd" * 32):
        store.register_checkpoint(sha, f"{sha[:4]}.pt", PROV)
    return store


def test_round_trip_through_the_file(db):
    store = Store(db)
    with store.session() as s:
        run = _run()
        run.epoch_rows = [TrainEpoch(epoch=e, loss=1.0 / e, clean_acc=0.5 + 0.1 * e, robust_acc=0.25 + 0.05 * e,
                                     lr=0.1 * 0.1 ** (e - 1), seconds=1.5 * e) for e in (1, 2, 3)]
        s.add(run)
    checkpoint_id = store.register_checkpoint(SHA, "checkpoints/run-1/best.pt", {**PROV, "config": {"checkpoint": "best"}},
                                              run_id="run-1", epoch=2, kind="best")
    store.replace_checks(checkpoint_id, threat_key("Linf", 0.1), [
        SanityCheck(norm="Linf", eps=0.1, name="zero_gradients", status="warn", value=1e-9, threshold=1e-8,
                    evidence={"fraction": 0.25, "samples": [3, 5]}, config={"check": "zero_gradients"}, **PROV)])
    evaluation = _evaluation(checkpoint_id=checkpoint_id)
    assert store.save_evaluation(evaluation, [10, 3, 7, 42], [True, False, True, False],
                                 [0.1, 0.0999, 0.05, 0.1]) == evaluation.evaluation_id is not None

    # a second Store over the same file (a new process would see the same)
    again = Store(db)
    assert again.url == store.url == (db if "://" in db else f"sqlite:///{db}")
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
        assert (ck[0].run_id, ck[0].path, ck[0].sha256, ck[0].epoch) == ("run-1", "checkpoints/run-1/best.pt", SHA, 2)
        assert [(r.run_id, r.kind, r.checkpoint_id) for r in s.scalars(select(RunCheckpoint))] == \
            [("run-1", "best", ck[0].checkpoint_id)]
        assert ck[0].config == {"checkpoint": "best"}
        assert (ck[0].git_commit, ck[0].versions, ck[0].device, ck[0].seed) == \
            (PROV["git_commit"], PROV["versions"], PROV["device"], PROV["seed"])
        assert ck[0].created_at is not None

        ev = s.scalars(select(Evaluation)).one()
        got = _columns(ev)
        want = _columns(_evaluation(checkpoint_id=checkpoint_id))
        for key in want:
            if key not in ("evaluation_id", "created_at"):
                assert got[key] == want[key], key
        assert got["created_at"] is not None
        assert [(r.sample_index, r.correct, r.perturbation_norm) for r in ev.samples] == \
            [(3, False, 0.0999), (7, True, 0.05), (10, True, 0.1), (42, False, 0.1)]  # ordered by index

        sc = s.scalars(select(SanityCheck)).one()
        assert (sc.checkpoint_id, sc.threat, sc.name, sc.status, sc.value, sc.threshold) == \
            (checkpoint_id, "Linf:0.1", "zero_gradients", "warn", 1e-9, 1e-8)
        assert sc.evidence == {"fraction": 0.25, "samples": [3, 5]}
        assert sc.config == {"check": "zero_gradients"} and sc.git_commit == PROV["git_commit"]
        assert sc.created_at is not None


def test_a_run_slot_moves_to_the_new_checkpoint_and_forgets_the_old_one_unless_it_has_results(db):
    store = Store(db)
    with store.session() as s:
        s.add(_run())
    first = store.register_checkpoint("1" * 64, "a/last.pt", PROV, run_id="run-1", epoch=1, kind="last")
    second = store.register_checkpoint("2" * 64, "a/last.pt", PROV, run_id="run-1", epoch=2, kind="last")
    assert second != first
    assert {k: (c.sha256, c.epoch) for k, c in Store(db).run_checkpoints("run-1").items()} == {"last": ("2" * 64, 2)}
    assert store.checkpoint(first) is None  # nothing referred to epoch 1's file: forgotten
    store.save_evaluation(_evaluation(checkpoint_id=second), [0], [True])
    third = store.register_checkpoint("3" * 64, "a/last.pt", PROV, run_id="run-1", epoch=3, kind="last")
    assert store.checkpoint(second).sha256 == "2" * 64  # it has results: kept, no longer the run's
    assert store.run_checkpoints("run-1")["last"].checkpoint_id == third
    # one row per file: asking again for a known sha256 gives its id and updates the path
    assert store.register_checkpoint("3" * 64, "moved/last.pt", PROV) == third
    assert store.checkpoint(third).path == "moved/last.pt" and store.checkpoint(third).run_id == "run-1"


def test_evaluation_identity_is_unique(store):
    store.save_evaluation(_evaluation(), [0, 1], [True, False])
    with pytest.raises(IntegrityError):
        with store.session() as s:
            s.add(_evaluation(label="another label, same identity", robust_acc=1.0))
    assert _count(store, Evaluation.__table__) == 1
    # each part of the identity distinguishes: these are all new evaluations
    for kw in ({"attack": "fgsm"}, {"config_hash": "cfg2"}, {"indices_hash": "idx2"}, {"seed": 1}, {"checkpoint_id": 2}):
        with store.session() as s:
            s.add(_evaluation(**kw))
    assert _count(store, Evaluation.__table__) == 6


def test_save_evaluation_replaces_the_same_identity(store, db):
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


def test_an_id_held_across_a_replacement_stays_valid(store, db):
    """Two workers computing one evaluation at once (the curves of a run's best.pt and last.pt when
    they are one file): the first's id, held while the second replaces its row, still names the
    evaluation when the first saves a curve pointing at it."""
    held = store.save_evaluation(_evaluation(robust_acc=0.25), [0, 1], [True, False])
    store.save_evaluation(_evaluation(seed=1), [0, 1], [True, True])  # a later row: the held one is not the last
    assert store.save_evaluation(_evaluation(robust_acc=0.25), [0, 1], [True, False]) == held  # the other worker
    curve = store.save_curve(1, "eps:pgd", "eps", "idx", 0, {0.1: held}, PROV)
    with Store(db).session() as s:
        assert [(p.x, p.evaluation_id) for p in s.scalars(select(CurvePoint).where(CurvePoint.curve_id == curve))] == \
            [(0.1, held)]
        assert s.scalar(select(func.count()).select_from(Evaluation)) == 2


def _example(index, predicted=1):
    return AdversarialExample(sample_index=index, label=0, predicted=predicted, channels=1, height=2, width=2,
                              clean=np.zeros(4, np.float16).tobytes(), adversarial=np.full(4, 0.1, np.float16).tobytes())


def test_adversarial_examples_are_stored_and_replaced_with_their_evaluation(store, db):
    first = store.save_evaluation(_evaluation(), [0, 1, 2, 3], [False, False, True, False],
                                  examples=[_example(0), _example(1)])
    other = store.save_evaluation(_evaluation(seed=1), [0, 1], [False, True], examples=[_example(0, predicted=2)])
    got = Store(db).adversarial_examples([first, other], [0, 1, 3])
    assert [(e.evaluation_id, e.sample_index, e.predicted) for e in got] == [(first, 0, 1), (first, 1, 1), (other, 0, 2)]
    assert np.frombuffer(got[0].adversarial, np.float16).tolist() == [np.float16(0.1)] * 4
    newer = store.save_evaluation(_evaluation(), [0, 1, 2, 3], [True, True, True, False], examples=[_example(3)])
    assert newer == first                                     # the replacement keeps the row's id
    assert [(e.evaluation_id, e.sample_index) for e in store.adversarial_examples([newer, other], range(4))] == \
        [(newer, 3), (other, 0)]                              # the replaced evaluation's examples went with it
    assert _count(store, AdversarialExample.__table__) == 2


def test_a_failing_save_keeps_the_old_evaluation(store, db):
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


def test_schema_revision_is_recorded(sqlite_db):
    Store(sqlite_db)
    with sqlite3.connect(sqlite_db) as con:
        assert con.execute("select version_num from alembic_version").fetchall() == [(head_revision(),)]
        tables = {r[0] for r in con.execute("select name from sqlite_master where type = 'table'")}
    assert {"runs", "train_epochs", "checkpoints", "run_checkpoints", "evaluations", "sample_results", "curves",
            "curve_points", "sanity_checks", "jobs", "job_dependencies", "adversarial_examples", "remedy_outcomes",
            "alembic_version"} == tables
    Store(sqlite_db)  # reopening neither adds a row nor migrates
    with sqlite3.connect(sqlite_db) as con:
        assert con.execute("select version_num from alembic_version").fetchall() == [(head_revision(),)]


def test_no_float_in_a_unique_key():
    for table in (Evaluation, Curve, CurvePoint, SanityCheck, Checkpoint, RunCheckpoint):
        keys = [c for c in table.__table__.primary_key.columns]
        for constraint in table.__table__.constraints:
            keys += list(getattr(constraint, "columns", []))
        assert not any(c.type.python_type is float for c in keys), table.__tablename__


def test_sample_matrix_pairs_the_samples_all_evaluations_cover(store):
    a = store.save_evaluation(_evaluation(config_hash="a"), [0, 1, 2, 3], [True, True, False, True], losses=[1, 2, 3, 4])
    b = store.save_evaluation(_evaluation(config_hash="b"), [1, 2, 3, 9], [False, True, True, True])
    m = store.sample_matrix([b, a])
    assert m.index.tolist() == [1, 2, 3]
    assert m.correct.tolist() == [[False, True], [True, False], [True, True]]
    assert np.isnan(m.loss[:, 0]).all() and m.loss[:, 1].tolist() == [2, 3, 4]
    assert m.worst_case() == (pytest.approx(1 / 3), 3)
    assert store.sample_matrix([]).worst_case()[1] == 0


def _schema_2_database(path: Path) -> None:
    """A results.db written by the last release before Alembic (schema 2): a tiny suite with a
    planted checkpoint, curves and checks, and `bench eval` of a checkpoint trained elsewhere."""
    with sqlite3.connect(path) as con:
        con.executescript(gzip.decompress(SCHEMA_2_DUMP.read_bytes()).decode())


def test_a_schema_2_database_migrates_without_loss(tmp_path):
    path = tmp_path / "old.db"
    _schema_2_database(path)
    with sqlite3.connect(path) as con:
        old = {
            "evaluations": con.execute("select evaluation_id, checkpoint_sha256, label, attack, norm, eps, config_hash, "
                                       "indices_hash, n_correct, robust_acc, role, diagnostics from evaluations").fetchall(),
            "samples": con.execute("select * from sample_results").fetchall(),
            "runs": con.execute("select * from runs").fetchall(),
            "epochs": con.execute("select * from train_epochs").fetchall(),
            "slots": con.execute("select run_id, kind, sha256, path, epoch from checkpoints").fetchall(),
            "curves": con.execute("select c.curve_id, c.checkpoint_sha256, c.name, p.x, p.evaluation_id from curves c "
                                  "join curve_points p on p.curve_id = c.curve_id").fetchall(),
            "checks": con.execute("select checkpoint_sha256, norm, eps, name, status, value, summary from "
                                  "sanity_checks").fetchall(),
        }
    assert len(old["evaluations"]) == 43 and len(old["samples"]) == 396 and len(old["checks"]) == 102
    store = Store(str(path))
    with sqlite3.connect(path) as con:
        assert con.execute("select version_num from alembic_version").fetchall() == [(head_revision(),)]
        sha = dict(con.execute("select checkpoint_id, sha256 from checkpoints").fetchall())
        assert len(sha) == len(set(sha.values())) == 6  # 5 files of the suite's runs, 1 evaluated from elsewhere
        new = {
            "evaluations": [(i, sha[c], label, attack, norm, eps, ch, ih, nc, acc, role, diag) for
                            i, c, label, attack, norm, eps, ch, ih, nc, acc, role, diag in con.execute(
                                "select evaluation_id, checkpoint_id, label, attack, norm, eps, config_hash, "
                                "indices_hash, n_correct, robust_acc, role, diagnostics from evaluations")],
            "samples": con.execute("select * from sample_results").fetchall(),
            "runs": con.execute("select * from runs").fetchall(),
            "epochs": con.execute("select * from train_epochs").fetchall(),
            "slots": [(r, k, sha[c], p, e) for r, k, c, p, e in con.execute(
                "select s.run_id, s.kind, c.checkpoint_id, c.path, c.epoch from run_checkpoints s "
                "join checkpoints c on c.checkpoint_id = s.checkpoint_id")],
            "curves": [(i, sha[c], n, x, e) for i, c, n, x, e in con.execute(
                "select c.curve_id, c.checkpoint_id, c.name, p.x, p.evaluation_id from curves c "
                "join curve_points p on p.curve_id = c.curve_id")],
            "checks": [(sha[c], n, e, name, st, v, sm) for c, n, e, name, st, v, sm in con.execute(
                "select checkpoint_id, norm, eps, name, status, value, summary from sanity_checks")],
        }
        threats = {r[0] for r in con.execute("select threat from evaluations where threat is not null")}
        check_threats = {r[0] for r in con.execute("select threat from sanity_checks")}
        external = con.execute("select path, run_id from checkpoints where sha256 not in "
                               "(select sha256 from checkpoints where run_id is not null)").fetchall()
    for key in old:
        assert sorted(map(repr, new[key])) == sorted(map(repr, old[key])), key
    assert threats == {"Linf:0.1", "Linf:0.4"} and check_threats == {"Linf:0.1"}  # eps 0.4: a curve point
    assert external == [("/tmp/legacy/external2.pt", None)]  # its path from the evaluation's recorded config
    # the migrated store works: the same worst case as the old rows give, and new rows go in
    with store.session() as s:
        ids = [e.evaluation_id for e in s.scalars(select(Evaluation).where(Evaluation.checkpoint_id == 1,
                                                                           Evaluation.role == "attack"))]
    assert store.sample_matrix(ids).worst_case()[1] > 0
    store.save_evaluation(_evaluation(checkpoint_id=1, config_hash="new"), [0], [True])


def test_a_schema_1_database_is_migrated_and_keeps_its_rows(tmp_path):
    """Schema 1 lacked evaluations.role/mean_loss/diagnostics, sample_results.loss,
    sanity_checks.summary and the curve tables: opening it adds them and keeps every row."""
    path = tmp_path / "old.db"
    _schema_2_database(path)
    with sqlite3.connect(path) as con:
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
        n_evaluations = con.execute("select count(*) from evaluations").fetchone()[0]
    store = Store(str(path))
    with store.session() as s:
        evs = s.scalars(select(Evaluation)).all()
        assert len(evs) == n_evaluations and all(e.role == "attack" and e.mean_loss is None for e in evs)
        assert all(r.loss is None for r in evs[0].samples) and len(evs[0].samples) > 0
    assert _count(store, Curve) == 0 and _count(store, SanityCheck) == 0
    with sqlite3.connect(path) as con:
        assert ("ix_evaluations_role",) in con.execute("select name from sqlite_master where type = 'index'").fetchall()


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


def test_a_newer_schema_is_a_bench_error_and_left_alone(sqlite_db):
    Store(sqlite_db)
    with sqlite3.connect(sqlite_db) as con:
        con.execute("update alembic_version set version_num = '9999'")
    with pytest.raises(BenchError, match="schema revision 9999, which this atbench does not know"):
        Store(sqlite_db)
    with sqlite3.connect(sqlite_db) as con:  # and it did not "fix" the recorded revision
        assert con.execute("select version_num from alembic_version").fetchall() == [("9999",)]


def test_a_database_that_is_not_ours_is_refused_and_left_alone(sqlite_db):
    with sqlite3.connect(sqlite_db) as con:
        con.execute("create table runs (id integer primary key, name text)")
    before = Path(sqlite_db).read_bytes()
    with pytest.raises(BenchError, match="is not an atbench results store"):
        Store(sqlite_db)
    assert Path(sqlite_db).read_bytes() == before


def test_unopenable_database_is_a_bench_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BenchError, match="cannot open database"):
        Store(str(tmp_path / "no" / "such" / "folder" / "results.db"))
    with pytest.raises(BenchError, match="cannot open database"):
        Store("nosuchdialect://x/y")
    (tmp_path / "garbage.db").write_bytes(b"this is not a sqlite database" * 100)
    with pytest.raises(BenchError, match="cannot open database"):
        Store(str(tmp_path / "garbage.db"))


def test_a_revision_0003_database_gains_the_examples_table_and_keeps_its_rows(sqlite_db):
    """A results.db written before the adversarial examples (Alembic revision 0003) is upgraded in
    place: the new table appears, every row stays."""
    store = Store(sqlite_db)
    checkpoint_id = store.register_checkpoint(SHA, "a.pt", PROV)
    store.save_evaluation(_evaluation(checkpoint_id=checkpoint_id), [0, 1, 2, 3], [True, False, True, False])
    with sqlite3.connect(sqlite_db) as con:
        con.execute("drop table remedy_outcomes")
        con.execute("drop table adversarial_examples")
        con.execute("update alembic_version set version_num = '0003'")
        before = {t: con.execute(f"select * from {t}").fetchall() for t in ("checkpoints", "evaluations", "sample_results")}
    store = Store(sqlite_db)
    with sqlite3.connect(sqlite_db) as con:
        assert con.execute("select version_num from alembic_version").fetchall() == [(head_revision(),)] == [("0005",)]
        assert {t: con.execute(f"select * from {t}").fetchall() for t in before} == before
        assert con.execute("select count(*) from adversarial_examples").fetchone() == (0,)
    evaluation_id = store.save_evaluation(_evaluation(checkpoint_id=checkpoint_id, seed=1), [0, 1], [False, True],
                                          examples=[_example(0)])
    assert [e.sample_index for e in store.adversarial_examples([evaluation_id], [0, 1])] == [0]


def test_a_revision_0004_database_gains_remedy_outcomes_as_a_new_one_has_them(tmp_path):
    """Alembic 0005 adds `remedy_outcomes` to a database at 0004 (adversarial examples): the same columns, types,
    keys and indexes as a database created now, and the older rows stay."""
    def schema(path):
        with sqlite3.connect(path) as con:
            return (con.execute("pragma table_info(remedy_outcomes)").fetchall(),
                    sorted(con.execute("select name from sqlite_master where tbl_name = 'remedy_outcomes'").fetchall()))

    fresh, old = tmp_path / "fresh.db", tmp_path / "old.db"
    Store(str(fresh))
    store = Store(str(old))
    with store.session() as s:
        s.add(_run())
    with sqlite3.connect(old) as con:
        con.execute("drop table remedy_outcomes")
        con.execute("update alembic_version set version_num = '0004'")
    with Store(str(old)).session() as s:
        assert s.get(Run, "run-1") is not None
    assert schema(old) == schema(fresh) and schema(fresh)[0]
    with sqlite3.connect(old) as con:
        assert con.execute("select version_num from alembic_version").fetchall() == [(head_revision(),)]
