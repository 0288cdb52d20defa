"""Results store: SQLAlchemy 2.x ORM over SQLite (`results.db`) or any SQLAlchemy URL.

Tables: `runs`, `train_epochs`, `checkpoints`, `evaluations`, `sample_results`, `curves`,
`curve_points`, `sanity_checks`, `schema_info`. Runs, checkpoints, evaluations, curves and sanity
checks carry provenance (git commit, package versions, device, UTC time, config JSON, seed);
epochs, per-sample results and curve points inherit it. All access goes through
`Store.session()`, one transaction that commits or rolls back as a whole.

An evaluation's `role` is "attack" (asked for by a suite or `bench eval`: it is a leaderboard
column) or "curve" (computed only as a point of a curve). A curve point that coincides with an
attack evaluation shares its row.

Schema history: 1 (first release); 2 adds evaluations.role/mean_loss/diagnostics,
sample_results.loss, the curve tables, and keys sanity checks by threat model. Opening an older
database adds what is missing (`_migrate`); rows already stored are kept.
"""

from __future__ import annotations

import datetime as dt
import os
from contextlib import contextmanager
from typing import Iterator, Sequence

from sqlalchemy import (JSON, Boolean, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint,
                        create_engine, delete, event, select)
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker

from bench.errors import BenchError

SCHEMA_VERSION = 2


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Provenance:
    """Columns every top-level row carries."""

    git_commit: Mapped[str | None] = mapped_column(String(64))
    versions: Mapped[dict] = mapped_column(JSON, default=dict)
    device: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    config: Mapped[dict] = mapped_column(JSON, default=dict)
    seed: Mapped[int] = mapped_column(Integer, default=0)


class SchemaInfo(Base):
    __tablename__ = "schema_info"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(200))


class Run(Provenance, Base):
    __tablename__ = "runs"
    run_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    label: Mapped[str] = mapped_column(String(200))
    defense: Mapped[str] = mapped_column(String(100), index=True)
    dataset: Mapped[str] = mapped_column(String(100), index=True)
    model: Mapped[str] = mapped_column(String(100))
    norm: Mapped[str] = mapped_column(String(8))
    eps: Mapped[float] = mapped_column(Float)
    epochs: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(20), default="running")  # running | completed | failed
    error: Mapped[str | None] = mapped_column(Text)
    epochs_done: Mapped[int] = mapped_column(Integer, default=0)
    best_epoch: Mapped[int | None] = mapped_column(Integer)
    train_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    forward_per_sample: Mapped[float | None] = mapped_column(Float)
    backward_per_sample: Mapped[float | None] = mapped_column(Float)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)
    epoch_rows: Mapped[list["TrainEpoch"]] = relationship(back_populates="run", cascade="all, delete-orphan",
                                                          order_by="TrainEpoch.epoch")


class TrainEpoch(Base):
    __tablename__ = "train_epochs"
    __table_args__ = (UniqueConstraint("run_id", "epoch"),)
    train_epoch_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.run_id"), index=True)
    epoch: Mapped[int] = mapped_column(Integer)
    loss: Mapped[float] = mapped_column(Float)
    clean_acc: Mapped[float] = mapped_column(Float)
    robust_acc: Mapped[float] = mapped_column(Float)
    lr: Mapped[float] = mapped_column(Float)
    seconds: Mapped[float] = mapped_column(Float)
    run: Mapped[Run] = relationship(back_populates="epoch_rows")


class Checkpoint(Provenance, Base):
    """A model checkpoint file; `run_id` is None for a checkpoint trained elsewhere."""

    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("run_id", "kind"),)
    checkpoint_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str | None] = mapped_column(ForeignKey("runs.run_id"), index=True)
    kind: Mapped[str] = mapped_column(String(20))  # best | last | external
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    epoch: Mapped[int | None] = mapped_column(Integer)


class Evaluation(Provenance, Base):
    """One attack on one checkpoint over one recorded sample set. `norm`/`eps` are None for `clean`."""

    __tablename__ = "evaluations"
    __table_args__ = (UniqueConstraint("checkpoint_sha256", "attack", "config_hash", "indices_hash", "seed"),)
    evaluation_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    checkpoint_sha256: Mapped[str] = mapped_column(String(64), index=True)
    label: Mapped[str] = mapped_column(String(100))
    attack: Mapped[str] = mapped_column(String(100))
    norm: Mapped[str | None] = mapped_column(String(8))
    eps: Mapped[float | None] = mapped_column(Float)
    config_hash: Mapped[str] = mapped_column(String(64))
    indices_hash: Mapped[str] = mapped_column(String(64))
    dataset: Mapped[str] = mapped_column(String(100))
    n_samples: Mapped[int] = mapped_column(Integer)
    n_correct: Mapped[int] = mapped_column(Integer)
    robust_acc: Mapped[float] = mapped_column(Float)
    forward_passes: Mapped[int] = mapped_column(Integer)
    backward_passes: Mapped[int] = mapped_column(Integer)
    seconds: Mapped[float] = mapped_column(Float)
    implementation: Mapped[str] = mapped_column(String(100))
    role: Mapped[str] = mapped_column(String(10), default="attack", server_default="attack", index=True)
    mean_loss: Mapped[float | None] = mapped_column(Float)  # cross-entropy at the returned points
    diagnostics: Mapped[dict | None] = mapped_column(JSON)  # loss trace, silent successes, attack stats
    samples: Mapped[list["SampleResult"]] = relationship(back_populates="evaluation", cascade="all, delete-orphan",
                                                          order_by="SampleResult.sample_index")


class SampleResult(Base):
    __tablename__ = "sample_results"
    evaluation_id: Mapped[int] = mapped_column(ForeignKey("evaluations.evaluation_id"), primary_key=True)
    sample_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    correct: Mapped[bool] = mapped_column(Boolean)
    perturbation_norm: Mapped[float | None] = mapped_column(Float)
    loss: Mapped[float | None] = mapped_column(Float)
    evaluation: Mapped[Evaluation] = relationship(back_populates="samples")


class Curve(Provenance, Base):
    """A curve of one checkpoint, e.g. accuracy and loss against eps for PGD: its points are
    evaluations (`curve_points`), so every point keeps its per-sample results."""

    __tablename__ = "curves"
    __table_args__ = (UniqueConstraint("checkpoint_sha256", "name", "indices_hash", "seed"),)
    curve_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    checkpoint_sha256: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(100))      # e.g. "eps:pgd", "steps:pgd", "restarts:pgd"
    x_label: Mapped[str] = mapped_column(String(100))   # "eps", "steps", "restarts"
    indices_hash: Mapped[str] = mapped_column(String(64))
    points: Mapped[list["CurvePoint"]] = relationship(back_populates="curve", cascade="all, delete-orphan",
                                                      order_by="CurvePoint.x")


class CurvePoint(Base):
    __tablename__ = "curve_points"
    curve_id: Mapped[int] = mapped_column(ForeignKey("curves.curve_id"), primary_key=True)
    x: Mapped[float] = mapped_column(Float, primary_key=True)
    evaluation_id: Mapped[int] = mapped_column(ForeignKey("evaluations.evaluation_id"))
    curve: Mapped[Curve] = relationship(back_populates="points")


class SanityCheck(Provenance, Base):
    """One sanity check of one checkpoint under one threat model (the leaderboard's flags)."""

    __tablename__ = "sanity_checks"
    __table_args__ = (UniqueConstraint("checkpoint_sha256", "norm", "eps", "name"),)
    sanity_check_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    checkpoint_sha256: Mapped[str] = mapped_column(String(64), index=True)
    norm: Mapped[str] = mapped_column(String(8))
    eps: Mapped[float] = mapped_column(Float)
    name: Mapped[str] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(10))  # pass | warn | fail | not-run
    value: Mapped[float | None] = mapped_column(Float)
    threshold: Mapped[float | None] = mapped_column(Float)
    summary: Mapped[str | None] = mapped_column(Text)  # one line: what was measured, what it means
    evidence: Mapped[dict] = mapped_column(JSON, default=dict)


def database_url(db: str) -> str:
    """A plain path means a SQLite file; anything with '://' is an SQLAlchemy URL."""
    return db if "://" in db else f"sqlite:///{os.path.abspath(db)}"


class Store:
    def __init__(self, db: str = "results.db"):
        self.url = database_url(db)
        try:
            self.engine = create_engine(self.url)
        except (SQLAlchemyError, ImportError, ValueError) as exc:
            raise BenchError(f"cannot open database {db!r}: {exc}") from None
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        try:
            Base.metadata.create_all(self.engine)
        except SQLAlchemyError as exc:
            raise BenchError(f"cannot open database {db!r}: {exc.__class__.__name__}: {exc.orig if hasattr(exc, 'orig') else exc}") from None
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        with self.session() as s:
            row = s.get(SchemaInfo, "schema_version")
            if row is None:
                s.add(SchemaInfo(key="schema_version", value=str(SCHEMA_VERSION)))
            elif int(row.value) > SCHEMA_VERSION:
                raise BenchError(f"database {db!r} has schema version {row.value}, this atbench writes {SCHEMA_VERSION}: "
                                 "upgrade atbench to read it")
            elif int(row.value) < SCHEMA_VERSION:
                _migrate(self.engine)
                row.value = str(SCHEMA_VERSION)

    @contextmanager
    def session(self) -> Iterator[Session]:
        s = self._sessions()
        try:
            yield s
            s.commit()
        except BaseException:
            s.rollback()
            raise
        finally:
            s.close()

    # ------------------------------------------------------------------ queries used by the harness

    def find_evaluation(self, s: Session, sha256: str, attack: str, config_hash: str, indices_hash: str,
                        seed: int) -> Evaluation | None:
        return s.scalar(select(Evaluation).where(
            Evaluation.checkpoint_sha256 == sha256, Evaluation.attack == attack,
            Evaluation.config_hash == config_hash, Evaluation.indices_hash == indices_hash, Evaluation.seed == seed))

    def save_evaluation(self, evaluation: Evaluation, indices: Sequence[int], correct: Sequence[bool],
                        norms: Sequence[float] | None = None, losses: Sequence[float] | None = None) -> None:
        """Insert an evaluation with its per-sample rows, replacing an older one with the same
        identity in the same transaction (so a failure keeps the old one). The curve points that
        referred to the old row move to the new one."""
        with self.session() as s:
            old = self.find_evaluation(s, evaluation.checkpoint_sha256, evaluation.attack, evaluation.config_hash,
                                       evaluation.indices_hash, evaluation.seed)
            points = []
            if old is not None:
                points = [(p.curve_id, p.x) for p in
                          s.scalars(select(CurvePoint).where(CurvePoint.evaluation_id == old.evaluation_id))]
                if old.role == "attack":
                    evaluation.role = "attack"
                s.execute(delete(CurvePoint).where(CurvePoint.evaluation_id == old.evaluation_id))
                s.delete(old)
                s.flush()
            evaluation.samples = [
                SampleResult(sample_index=int(i), correct=bool(c),
                             perturbation_norm=None if norms is None or norms[k] != norms[k] else float(norms[k]),
                             loss=None if losses is None else float(losses[k]))
                for k, (i, c) in enumerate(zip(indices, correct))]
            s.add(evaluation)
            s.flush()
            s.add_all([CurvePoint(curve_id=curve_id, x=x, evaluation_id=evaluation.evaluation_id)
                       for curve_id, x in points])

    def set_checkpoint(self, s: Session, run_id: str | None, kind: str, path: str, sha256: str,
                       epoch: int | None, **provenance) -> Checkpoint:
        row = None
        if run_id is not None:
            row = s.scalar(select(Checkpoint).where(Checkpoint.run_id == run_id, Checkpoint.kind == kind))
        else:
            row = s.scalar(select(Checkpoint).where(Checkpoint.run_id.is_(None), Checkpoint.sha256 == sha256))
        if row is None:
            row = Checkpoint(run_id=run_id, kind=kind)
            s.add(row)
        row.path, row.sha256, row.epoch = path, sha256, epoch
        for key, value in provenance.items():
            setattr(row, key, value)
        return row


def _migrate(engine) -> None:
    """Bring an older schema up to date: create missing tables (done by create_all) and add the
    missing columns, all nullable or with a server default, so stored rows stay valid."""
    from sqlalchemy import inspect, text

    inspector = inspect(engine)
    with engine.begin() as con:
        if "norm" not in {c["name"] for c in inspector.get_columns("sanity_checks")}:
            # schema 1 keyed checks by checkpoint alone; no release of it wrote any (it had no checks)
            con.execute(text("DROP TABLE sanity_checks"))
            SanityCheck.__table__.create(con)
        inspector = inspect(con)
        for table in Base.metadata.sorted_tables:
            present = {c["name"] for c in inspector.get_columns(table.name)}
            for column in table.columns:
                if column.name in present:
                    continue
                kind = column.type.compile(dialect=engine.dialect)
                default = f" DEFAULT '{column.server_default.arg}'" if column.server_default is not None else ""
                con.execute(text(f"ALTER TABLE {table.name} ADD COLUMN {column.name} {kind}{default}"))
                for index in table.indexes:
                    if column.name in index.columns:
                        index.create(con, checkfirst=True)


def _sqlite_pragmas(dbapi_connection, _record):
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.close()
