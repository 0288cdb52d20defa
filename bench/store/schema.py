"""The tables of the results store (SQLAlchemy 2.x ORM). Schema changes go through the Alembic
migrations in `bench/store/migrations`.

- `runs`, `train_epochs`: a training run (its id is the hash of its config and revisions) and its
  per-epoch log;
- `checkpoints`: one row per distinct weights file (by sha256), trained here or elsewhere;
  `run_checkpoints` says which checkpoint is a run's `best`, `last` or planted variant;
- `evaluations` (+ `sample_results`): one attack (or `clean`) on one checkpoint over one recorded
  sample set, per sample; `role` is "attack" (a leaderboard column) or "curve" (only a curve
  point) or "adaptive" (an attack a remedy ran: part of the adaptive worst case);
- `curves` (+ `curve_points`): a curve of one checkpoint whose points are evaluations;
- `sanity_checks`: one check of one checkpoint under one threat model, with the revision of the
  check and a digest of the evaluations it read;
- `remedy_outcomes`: what the adaptive stage did about one flagged check of one checkpoint under
  one threat model: the remedies it tried, their adaptive evaluations (role "adaptive"), whether
  the re-run check passes (closed) and the adaptive worst case after them;
- `jobs` (+ `job_dependencies`): a suite's work as a graph (train, plant, evaluate, curves, checks,
  report), claimed by workers under a lease;
- `adversarial_examples`: a few samples an attack evaluation fooled (at most
  `EXAMPLES_PER_EVALUATION`), clean and adversarial pixels, for the report's comparisons.

Threat models are keyed by `ThreatModel.key` ("Linf:0.2", the exact repr of eps), never by a
float. Every top-level row carries provenance (git commit, package versions, device, UTC time,
config JSON, seed).
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import (JSON, Boolean, DateTime, Float, ForeignKey, Integer, LargeBinary, String, Text,
                        UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


EXAMPLES_PER_EVALUATION = 12  # fooled samples whose images an attack evaluation keeps


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Provenance:
    """Columns every top-level row carries."""

    git_commit: Mapped[str | None] = mapped_column(String(64))
    versions: Mapped[dict] = mapped_column(JSON, default=dict)
    device: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    config: Mapped[dict] = mapped_column(JSON, default=dict)
    seed: Mapped[int] = mapped_column(Integer, default=0)


class Run(Provenance, Base):
    __tablename__ = "runs"
    run_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    label: Mapped[str] = mapped_column(Text)
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
    """A weights file, identified by its sha256; `run_id` is the run that wrote it (None for a
    checkpoint trained elsewhere), `path` where it was last seen."""

    __tablename__ = "checkpoints"
    checkpoint_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    path: Mapped[str] = mapped_column(Text)
    run_id: Mapped[str | None] = mapped_column(ForeignKey("runs.run_id"), index=True)
    epoch: Mapped[int | None] = mapped_column(Integer)


class RunCheckpoint(Base):
    """Which checkpoint is a run's `best`, `last` or `planted-<kind>` now."""

    __tablename__ = "run_checkpoints"
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.run_id"), primary_key=True)
    kind: Mapped[str] = mapped_column(String(100), primary_key=True)
    checkpoint_id: Mapped[int] = mapped_column(ForeignKey("checkpoints.checkpoint_id"), index=True)


class Evaluation(Provenance, Base):
    """One attack on one checkpoint over one recorded sample set. `norm`, `eps`, `threat` are None
    for `clean`."""

    __tablename__ = "evaluations"
    __table_args__ = (UniqueConstraint("checkpoint_id", "attack", "config_hash", "indices_hash", "seed"),)
    evaluation_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    checkpoint_id: Mapped[int] = mapped_column(ForeignKey("checkpoints.checkpoint_id"), index=True)
    label: Mapped[str] = mapped_column(Text)
    attack: Mapped[str] = mapped_column(String(100))
    norm: Mapped[str | None] = mapped_column(String(8))
    eps: Mapped[float | None] = mapped_column(Float)
    threat: Mapped[str | None] = mapped_column(String(64), index=True)
    config_hash: Mapped[str] = mapped_column(String(64))
    indices_hash: Mapped[str] = mapped_column(String(64))
    dataset: Mapped[str] = mapped_column(String(100))
    n_samples: Mapped[int] = mapped_column(Integer)
    n_correct: Mapped[int] = mapped_column(Integer)
    robust_acc: Mapped[float] = mapped_column(Float)
    forward_passes: Mapped[int] = mapped_column(Integer)
    backward_passes: Mapped[int] = mapped_column(Integer)
    seconds: Mapped[float] = mapped_column(Float)
    implementation: Mapped[str] = mapped_column(Text)
    role: Mapped[str] = mapped_column(String(10), default="attack", server_default="attack", index=True)
    mean_loss: Mapped[float | None] = mapped_column(Float)  # cross-entropy at the returned points
    diagnostics: Mapped[dict | None] = mapped_column(JSON)  # loss trace, silent successes, attack stats
    samples: Mapped[list["SampleResult"]] = relationship(back_populates="evaluation", cascade="all, delete-orphan",
                                                          order_by="SampleResult.sample_index")
    examples: Mapped[list["AdversarialExample"]] = relationship(cascade="all, delete-orphan",
                                                                order_by="AdversarialExample.sample_index")


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
    __table_args__ = (UniqueConstraint("checkpoint_id", "name", "indices_hash", "seed"),)
    curve_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    checkpoint_id: Mapped[int] = mapped_column(ForeignKey("checkpoints.checkpoint_id"), index=True)
    name: Mapped[str] = mapped_column(String(100))      # e.g. "eps:pgd", "steps:pgd", "restarts:pgd"
    x_label: Mapped[str] = mapped_column(String(100))   # "eps", "steps", "restarts"
    indices_hash: Mapped[str] = mapped_column(String(64))
    points: Mapped[list["CurvePoint"]] = relationship(back_populates="curve", cascade="all, delete-orphan",
                                                      order_by="CurvePoint.position")


class CurvePoint(Base):
    __tablename__ = "curve_points"
    curve_id: Mapped[int] = mapped_column(ForeignKey("curves.curve_id"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)  # 0, 1, ... in increasing x
    x: Mapped[float] = mapped_column(Float)
    evaluation_id: Mapped[int] = mapped_column(ForeignKey("evaluations.evaluation_id"), index=True)
    curve: Mapped[Curve] = relationship(back_populates="points")


class SanityCheck(Provenance, Base):
    """One sanity check of one checkpoint under one threat model (the leaderboard's flags)."""

    __tablename__ = "sanity_checks"
    __table_args__ = (UniqueConstraint("checkpoint_id", "threat", "name"),)
    sanity_check_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    checkpoint_id: Mapped[int] = mapped_column(ForeignKey("checkpoints.checkpoint_id"), index=True)
    threat: Mapped[str] = mapped_column(String(64))
    norm: Mapped[str] = mapped_column(String(8))
    eps: Mapped[float] = mapped_column(Float)
    name: Mapped[str] = mapped_column(String(100))
    revision: Mapped[int] = mapped_column(Integer, default=1)
    inputs_hash: Mapped[str] = mapped_column(String(64), default="")  # digest of the evaluations it read
    status: Mapped[str] = mapped_column(String(10))  # pass | warn | fail | not-run
    value: Mapped[float | None] = mapped_column(Float)
    threshold: Mapped[float | None] = mapped_column(Float)
    summary: Mapped[str | None] = mapped_column(Text)  # one line: what was measured, what it means
    evidence: Mapped[dict] = mapped_column(JSON, default=dict)


class RemedyOutcome(Provenance, Base):
    """The adaptive stage's answer to one flagged check (`check`, flagged `check_status`) of one
    checkpoint under one threat model. `status`: "closed" (a remedy's results make the re-run
    check pass: `closed_by`), "open" (none did) or "none" (no remedy answers or applies);
    `worst_case` over `n_samples`: the per-sample AND over the suite's attacks and every adaptive
    evaluation run up to then; `remedies`: each remedy tried, in order, with its evaluation ids,
    cost, re-run status and worst case; `inputs_hash`: a digest of what the stage read."""

    __tablename__ = "remedy_outcomes"
    __table_args__ = (UniqueConstraint("checkpoint_id", "threat", "check"),)
    remedy_outcome_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    checkpoint_id: Mapped[int] = mapped_column(ForeignKey("checkpoints.checkpoint_id"), index=True)
    threat: Mapped[str] = mapped_column(String(64))
    norm: Mapped[str] = mapped_column(String(8))
    eps: Mapped[float] = mapped_column(Float)
    check: Mapped[str] = mapped_column(String(100))
    check_status: Mapped[str] = mapped_column(String(10))
    status: Mapped[str] = mapped_column(String(10))  # closed | open | none
    closed_by: Mapped[str | None] = mapped_column(String(100))
    worst_case: Mapped[float | None] = mapped_column(Float)
    n_samples: Mapped[int | None] = mapped_column(Integer)
    recheck_status: Mapped[str | None] = mapped_column(String(10))
    recheck_summary: Mapped[str | None] = mapped_column(Text)
    remedies: Mapped[list] = mapped_column(JSON, default=list)
    inputs_hash: Mapped[str] = mapped_column(String(64), default="")


class Job(Base):
    """One unit of a suite's work. `state`: pending → running (claimed by `lease_owner` until
    `lease_expires`, renewed while it works) → done | failed (`error`: the one-line reason). A job
    runs once its dependencies are done; a running job whose lease expired is claimable again."""

    __tablename__ = "jobs"
    job_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(Text, unique=True)
    kind: Mapped[str] = mapped_column(String(20))  # train | plant | evaluate | curves | checks | adaptive | report
    priority: Mapped[int] = mapped_column(Integer, default=0)  # lower first among claimable jobs
    payload: Mapped[dict] = mapped_column(JSON, default=dict)
    state: Mapped[str] = mapped_column(String(10), default="pending", index=True)
    force: Mapped[bool] = mapped_column(Boolean, default=False)  # redo the work even if stored
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(Text)
    lease_expires: Mapped[dt.datetime | None] = mapped_column(DateTime)
    heartbeat: Mapped[dt.datetime | None] = mapped_column(DateTime)
    did_work: Mapped[bool] = mapped_column(Boolean, default=False)  # the last execution computed something
    done_by: Mapped[str | None] = mapped_column(Text)  # the worker that ended it last
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime)


class JobDependency(Base):
    __tablename__ = "job_dependencies"
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.job_id"), primary_key=True)
    depends_on: Mapped[int] = mapped_column(ForeignKey("jobs.job_id"), primary_key=True, index=True)


class AdversarialExample(Base):
    """A sample an attack evaluation fooled: its clean and adversarial pixels (float16 bytes in
    [0, 1], C×H×W), true label and the adversarial prediction. The evaluation stage keeps the first
    `EXAMPLES_PER_EVALUATION` fooled samples of each attack evaluation, in sample-set order."""

    __tablename__ = "adversarial_examples"
    evaluation_id: Mapped[int] = mapped_column(ForeignKey("evaluations.evaluation_id"), primary_key=True)
    sample_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    label: Mapped[int] = mapped_column(Integer)
    predicted: Mapped[int] = mapped_column(Integer)
    channels: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    width: Mapped[int] = mapped_column(Integer)
    clean: Mapped[bytes] = mapped_column(LargeBinary)
    adversarial: Mapped[bytes] = mapped_column(LargeBinary)
