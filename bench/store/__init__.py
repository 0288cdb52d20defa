"""Results store: the one persistence boundary. Every query of the harness is a method of `Store`;
the tables are in `bench.store.schema`, their history in the Alembic migrations of
`bench/store/migrations` (`bench.store.migrate`).

SQLite file (`results.db`) by default, any SQLAlchemy URL via `--db`. All access goes through
`Store.session()`, one transaction that commits or rolls back as a whole.

An evaluation's `role` is "attack" (asked for by a suite or `bench eval`: it is a leaderboard
column), "curve" (computed only as a point of a curve) or "adaptive" (run by a remedy of a flagged
check: part of the adaptive worst case). A curve point that coincides with an attack evaluation
shares its row.
"""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
from sqlalchemy import and_, delete, or_, select
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from bench.core.errors import BenchError
from bench.store.engine import BUSY_TIMEOUT_S, enable_wal, make_engine
from bench.store.migrate import prepare_schema
from bench.store.schema import (AdversarialExample, Checkpoint, Curve, CurvePoint, Evaluation, Job, JobDependency,
                                RemedyOutcome, Run,
                                RunCheckpoint, SampleResult, SanityCheck, TrainEpoch, utcnow)


def database_url(db: str) -> str:
    """A plain path means a SQLite file; anything with '://' is an SQLAlchemy URL."""
    return db if "://" in db else f"sqlite:///{os.path.abspath(db)}"


@dataclass
class SampleMatrix:
    """Per-sample results of several evaluations on the samples all of them cover: `index` the
    sample indices (sorted), `correct` and `loss` of shape (samples, evaluations), columns in the
    order the evaluations were asked for."""

    index: np.ndarray
    correct: np.ndarray
    loss: np.ndarray

    def worst_case(self) -> tuple[float, int]:
        """(accuracy, n) of the per-sample AND over the evaluations: the robust accuracy under all
        of them, never the minimum of their accuracies."""
        n = len(self.index)
        return (float(self.correct.all(axis=1).mean()) if n else float("nan")), n


@dataclass(frozen=True)
class JobSpec:
    """A job as a plan describes it: a unique `key` (its identity), its `kind`, `priority`, the
    `payload` its executor reads, and the keys of the jobs it `depends_on`."""

    key: str
    kind: str
    priority: int
    payload: dict
    depends_on: tuple[str, ...] = ()


def widest_per_label(rows: Sequence[Evaluation]) -> list[Evaluation]:
    """Per label, the evaluation on the most samples, then the newest; in evaluation-id order. The
    rule by which the checks and the report pick a leaderboard column's evaluation, so that a
    narrower command never replaces a wider result."""
    best: dict[str, Evaluation] = {}
    for row in sorted(rows, key=lambda r: (r.n_samples, r.created_at, r.evaluation_id)):
        best[row.label] = row
    return sorted(best.values(), key=lambda r: r.evaluation_id)


class Store:
    """The results database. `readonly` opens it for reading only (`bench report` of an archived,
    read-only database or folder); otherwise a database that cannot be written is refused at once,
    before any work. A SQLite file that fails SQLite's quick check, or that is not an atbench
    store, is refused and never written into."""

    def __init__(self, db: str = "results.db", readonly: bool = False):
        self.name, self.readonly = db, readonly
        self.url = database_url(db)
        if self.url.startswith("sqlite:///"):
            _check_sqlite_file(self.url[len("sqlite:///"):], db, readonly)
            if readonly:
                self.url = _readonly_url(self.url[len("sqlite:///"):])
        try:
            self.engine = make_engine(self.url, readonly=readonly, writing=False)
            self._write_engine = self.engine if readonly else make_engine(self.url)
        except (SQLAlchemyError, ImportError, ValueError) as exc:
            raise BenchError(f"cannot open database {db!r}: {_first_line(exc)}") from None
        try:
            prepare_schema(self.url, db, readonly)
            if self.url.startswith("sqlite:///") and not readonly:
                enable_wal(self.url[len("sqlite:///"):])
        except SQLAlchemyError as exc:
            raise BenchError(f"cannot open database {db!r}: {exc.__class__.__name__}: "
                             f"{exc.orig if hasattr(exc, 'orig') else exc}") from None
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._write_sessions = sessionmaker(self._write_engine, expire_on_commit=False)

    @contextmanager
    def session(self, write: bool = False) -> Iterator[Session]:
        """One transaction: committed at the end of the block, rolled back on any error. A database
        that fails underneath (disk full, locked too long) is a BenchError; nothing is half-written.
        `write` takes SQLite's write lock at the start (every Store method that writes does), so
        that concurrent writers queue instead of failing; a plain session writes too, alone."""
        s = (self._write_sessions if write else self._sessions)()
        try:
            yield s
            s.commit()
        except OperationalError as exc:
            s.rollback()
            raise BenchError(f"database {self.name!r}: {str(exc.orig).splitlines()[0]}; nothing of this "
                             "transaction was written") from None
        except BaseException:
            s.rollback()
            raise
        finally:
            s.close()

    # ------------------------------------------------------------------ runs

    def sync_run(self, run_id: str, fields: dict, epochs: Sequence[dict], checkpoints: dict[str, tuple],
                 provenance: dict) -> None:
        """Write the run `run_id` as its state on disk says: its columns (`fields`; an empty label
        keeps the stored one, else the defense's name), its epoch log and its checkpoints ({kind:
        (path, sha256, epoch)}), so a lost or new database is rebuilt from the checkpoint folder."""
        with self.session(write=True) as s:
            run = s.get(Run, run_id) or Run(run_id=run_id)
            s.add(run)
            fields = {**fields, "label": fields.get("label") or run.label or fields["defense"]}
            for key, value in {**fields, **provenance}.items():
                setattr(run, key, value)
            rows = {r.epoch: r for r in run.epoch_rows}
            for log in epochs:
                row = rows.get(log["epoch"])
                if row is None:
                    row = TrainEpoch(epoch=log["epoch"])
                    run.epoch_rows.append(row)
                for key, value in log.items():
                    setattr(row, key, value)
            s.flush()
            for kind, (path, sha256, epoch) in checkpoints.items():
                checkpoint = self._checkpoint(s, sha256, path, provenance, run_id=run_id, epoch=epoch)
                self._slot(s, run_id, kind, checkpoint.checkpoint_id)

    def fail_run(self, run_id: str, message: str) -> None:
        with self.session(write=True) as s:
            run = s.get(Run, run_id)
            run.status, run.error = "failed", message

    def run(self, run_id: str) -> Run | None:
        with self.session() as s:
            return s.get(Run, run_id)

    # ------------------------------------------------------------------ checkpoints

    def register_checkpoint(self, sha256: str, path: str, provenance: dict, *, run_id: str | None = None,
                            epoch: int | None = None, kind: str | None = None) -> int:
        """The id of the checkpoint with this sha256 (created if new; its path updated); with
        `run_id` and `kind`, it becomes that run's `kind` checkpoint."""
        with self.session(write=True) as s:
            checkpoint = self._checkpoint(s, sha256, path, provenance, run_id=run_id, epoch=epoch)
            if run_id is not None and kind is not None:
                self._slot(s, run_id, kind, checkpoint.checkpoint_id)
            return checkpoint.checkpoint_id

    @staticmethod
    def _checkpoint(s: Session, sha256: str, path: str, provenance: dict, *, run_id: str | None,
                    epoch: int | None) -> Checkpoint:
        row = s.scalar(select(Checkpoint).where(Checkpoint.sha256 == sha256))
        if row is None:
            row = Checkpoint(sha256=sha256, run_id=run_id, epoch=epoch, **provenance)
            s.add(row)
        row.path = path
        if run_id is not None:
            row.run_id, row.epoch = run_id, epoch
        s.flush()
        return row

    @staticmethod
    def _slot(s: Session, run_id: str, kind: str, checkpoint_id: int) -> None:
        """Make the checkpoint the run's `kind`; the one it replaces is forgotten when nothing refers
        to it (an epoch's last.pt overwritten by the next), kept when it has results."""
        slot = s.get(RunCheckpoint, (run_id, kind))
        if slot is None:
            s.add(RunCheckpoint(run_id=run_id, kind=kind, checkpoint_id=checkpoint_id))
            return
        old, slot.checkpoint_id = slot.checkpoint_id, checkpoint_id
        s.flush()
        if old != checkpoint_id and not any(s.scalar(select(table).where(table.checkpoint_id == old).limit(1))
                                            for table in (RunCheckpoint, Evaluation, Curve, SanityCheck)):
            s.execute(delete(Checkpoint).where(Checkpoint.checkpoint_id == old))

    def checkpoint(self, checkpoint_id: int) -> Checkpoint | None:
        with self.session() as s:
            return s.get(Checkpoint, checkpoint_id)

    def checkpoint_by_sha(self, sha256: str) -> Checkpoint | None:
        with self.session() as s:
            return s.scalar(select(Checkpoint).where(Checkpoint.sha256 == sha256))

    def run_checkpoints(self, run_id: str) -> dict[str, Checkpoint]:
        """{kind: checkpoint} of a run."""
        with self.session() as s:
            rows = s.execute(select(RunCheckpoint.kind, Checkpoint).join(
                Checkpoint, Checkpoint.checkpoint_id == RunCheckpoint.checkpoint_id).where(
                RunCheckpoint.run_id == run_id)).all()
        return {kind: checkpoint for kind, checkpoint in rows}

    # ------------------------------------------------------------------ evaluations

    def find_evaluation(self, checkpoint_id: int, attack: str, config_hash: str, indices_hash: str,
                        seed: int) -> Evaluation | None:
        with self.session() as s:
            return self._find(s, checkpoint_id, attack, config_hash, indices_hash, seed)

    @staticmethod
    def _find(s: Session, checkpoint_id: int, attack: str, config_hash: str, indices_hash: str,
              seed: int) -> Evaluation | None:
        return s.scalar(select(Evaluation).where(
            Evaluation.checkpoint_id == checkpoint_id, Evaluation.attack == attack,
            Evaluation.config_hash == config_hash, Evaluation.indices_hash == indices_hash, Evaluation.seed == seed))

    def save_evaluation(self, evaluation: Evaluation, indices: Sequence[int], correct: Sequence[bool],
                        norms: Sequence[float] | None = None, losses: Sequence[float] | None = None,
                        examples: Sequence[AdversarialExample] = ()) -> int:
        """Insert an evaluation with its per-sample rows (and the adversarial `examples` it keeps),
        replacing an older one with the same identity in the same transaction (so a failure keeps
        the old one); returns its id. The new row keeps the old one's id, so the curve points that
        referred to the old row refer to the new one, and so does an id another worker holds: two
        workers that compute one evaluation at once (the curves of a run's best.pt and last.pt when
        they are one file) never leave each other a dangling id. An old leaderboard column stays one."""
        with self.session(write=True) as s:
            old = self._find(s, evaluation.checkpoint_id, evaluation.attack, evaluation.config_hash,
                             evaluation.indices_hash, evaluation.seed)
            points = []
            if old is not None:
                points = [(p.curve_id, p.position, p.x) for p in
                          s.scalars(select(CurvePoint).where(CurvePoint.evaluation_id == old.evaluation_id))]
                if old.role == "attack":
                    evaluation.role = "attack"
                evaluation.evaluation_id = old.evaluation_id
                s.execute(delete(CurvePoint).where(CurvePoint.evaluation_id == old.evaluation_id))
                s.delete(old)
                s.flush()
            evaluation.samples = [
                SampleResult(sample_index=int(i), correct=bool(c),
                             perturbation_norm=None if norms is None or norms[k] != norms[k] else float(norms[k]),
                             loss=None if losses is None else float(losses[k]))
                for k, (i, c) in enumerate(zip(indices, correct))]
            evaluation.examples = list(examples)
            s.add(evaluation)
            s.flush()
            s.add_all([CurvePoint(curve_id=curve_id, position=position, x=x, evaluation_id=evaluation.evaluation_id)
                       for curve_id, position, x in points])
            return evaluation.evaluation_id

    def mark_attack(self, evaluation_id: int, label: str) -> None:
        """Make a stored evaluation a leaderboard column named `label`."""
        with self.session(write=True) as s:
            row = s.get(Evaluation, evaluation_id)
            row.role, row.label = "attack", label

    def evaluations(self, evaluation_ids: Sequence[int]) -> dict[int, Evaluation]:
        with self.session() as s:
            return {e.evaluation_id: e for e in s.scalars(select(Evaluation).where(
                Evaluation.evaluation_id.in_(list(evaluation_ids))))}

    def attack_evaluations(self, checkpoint_id: int, threat: str, role: str = "attack") -> list[Evaluation]:
        """Every leaderboard evaluation (or every one of another `role`: "adaptive") of the
        checkpoint at the threat model (by `ThreatModel.key`): per label the one on the most
        samples, then the newest (`widest_per_label`), in id order."""
        with self.session() as s:
            rows = s.scalars(select(Evaluation).where(
                Evaluation.checkpoint_id == checkpoint_id, Evaluation.role == role,
                Evaluation.threat == threat)).all()
        return widest_per_label(rows)

    def clean_evaluation(self, checkpoint_id: int) -> Evaluation | None:
        """The checkpoint's clean leaderboard evaluation on the most samples, then the newest."""
        with self.session() as s:
            rows = s.scalars(select(Evaluation).where(Evaluation.checkpoint_id == checkpoint_id,
                                                      Evaluation.role == "attack", Evaluation.threat.is_(None))).all()
        return next(iter(widest_per_label(rows)), None)

    def sample_results(self, evaluation_ids: Sequence[int]) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """{evaluation id: (sample indices, correct, loss)}, each ordered by sample index (a missing
        loss is NaN)."""
        ids = list(evaluation_ids)
        with self.session() as s:
            rows = s.execute(select(SampleResult.evaluation_id, SampleResult.sample_index, SampleResult.correct,
                                    SampleResult.loss).where(SampleResult.evaluation_id.in_(ids))
                             .order_by(SampleResult.evaluation_id, SampleResult.sample_index)).all()
        per: dict[int, list] = {eid: [] for eid in ids}
        for eid, index, correct, loss in rows:
            per[eid].append((index, bool(correct), float("nan") if loss is None else loss))
        return {eid: (np.array([v[0] for v in values], dtype=np.int64), np.array([v[1] for v in values], bool),
                      np.array([v[2] for v in values], float)) for eid, values in per.items()}

    def sample_matrix(self, evaluation_ids: Sequence[int]) -> SampleMatrix:
        """The evaluations' per-sample results on the samples all of them cover (see `SampleMatrix`):
        what the worst case, the checks and the report all read."""
        ids = list(dict.fromkeys(evaluation_ids))
        results = self.sample_results(ids)
        common = None
        for index, _, _ in results.values():
            common = index if common is None else np.intersect1d(common, index)
        common = np.array([], dtype=np.int64) if common is None else common
        correct = np.ones((len(common), len(evaluation_ids)), bool)
        loss = np.full((len(common), len(evaluation_ids)), np.nan)
        for k, eid in enumerate(evaluation_ids):
            index, c, l = results[eid]
            where = np.searchsorted(index, common)
            correct[:, k], loss[:, k] = c[where], l[where]
        return SampleMatrix(common, correct, loss)

    def adversarial_examples(self, evaluation_ids: Sequence[int],
                             sample_indices: Sequence[int]) -> list[AdversarialExample]:
        """The stored adversarial examples of these evaluations on these samples, by evaluation
        then sample index."""
        with self.session() as s:
            return list(s.scalars(select(AdversarialExample).where(
                AdversarialExample.evaluation_id.in_(list(evaluation_ids)),
                AdversarialExample.sample_index.in_([int(i) for i in sample_indices]))
                .order_by(AdversarialExample.evaluation_id, AdversarialExample.sample_index)))

    # ------------------------------------------------------------------ curves

    def save_curve(self, checkpoint_id: int, name: str, x_label: str, indices_hash: str, seed: int,
                   points: dict[float, int], provenance: dict) -> int:
        """Create or update the curve and point it at these evaluations ({x: evaluation id})."""
        with self.session(write=True) as s:
            curve = s.scalar(select(Curve).where(Curve.checkpoint_id == checkpoint_id, Curve.name == name,
                                                 Curve.indices_hash == indices_hash, Curve.seed == seed))
            if curve is None:
                curve = Curve(checkpoint_id=checkpoint_id, name=name, indices_hash=indices_hash, x_label=x_label)
                s.add(curve)
            for key, value in {**provenance, "seed": seed}.items():
                setattr(curve, key, value)
            curve.points = []
            s.flush()
            curve.points = [CurvePoint(position=k, x=float(x), evaluation_id=eid)
                            for k, (x, eid) in enumerate(sorted(points.items()))]
            s.flush()
            return curve.curve_id

    def curves(self, checkpoint_id: int, seed: int) -> dict[str, list[tuple[float, int]]]:
        """{curve name: [(x, evaluation id)]} of the checkpoint's widest set of curves for `seed`:
        the sample set with the most samples, then the newest (the rule of `widest_per_label`)."""
        with self.session() as s:
            rows = s.execute(select(Curve.indices_hash, Evaluation.n_samples, Curve.created_at)
                             .join(CurvePoint, CurvePoint.curve_id == Curve.curve_id)
                             .join(Evaluation, Evaluation.evaluation_id == CurvePoint.evaluation_id)
                             .where(Curve.checkpoint_id == checkpoint_id, Curve.seed == seed)).all()
            if not rows:
                return {}
            widest = max(rows, key=lambda r: (r.n_samples, r.created_at)).indices_hash
            return {c.name: [(p.x, p.evaluation_id) for p in c.points] for c in s.scalars(select(Curve).where(
                Curve.checkpoint_id == checkpoint_id, Curve.seed == seed, Curve.indices_hash == widest))}

    def curves_on(self, checkpoint_id: int, indices_hash: str, seed: int
                  ) -> dict[str, tuple[list[tuple[float, int]], dict]]:
        """{curve name: ([(x, evaluation id)], its stored config)} of the checkpoint on one sample
        set and seed."""
        with self.session() as s:
            return {c.name: ([(p.x, p.evaluation_id) for p in c.points], c.config or {}) for c in s.scalars(
                select(Curve).where(Curve.checkpoint_id == checkpoint_id, Curve.seed == seed,
                                    Curve.indices_hash == indices_hash))}

    # ------------------------------------------------------------------ sanity checks

    def stored_checks(self, checkpoint_id: int, threat: str) -> list[SanityCheck]:
        """The stored checks of a checkpoint under a threat model (by `ThreatModel.key`), failures first."""
        with self.session() as s:
            rows = list(s.scalars(select(SanityCheck).where(SanityCheck.checkpoint_id == checkpoint_id,
                                                            SanityCheck.threat == threat)))
        order = ("fail", "warn", "pass", "not-run")
        return sorted(rows, key=lambda r: (order.index(r.status), r.name))

    def replace_checks(self, checkpoint_id: int, threat: str, rows: Sequence[SanityCheck]) -> None:
        """Store these checks of the checkpoint under the threat model, replacing those of the same names."""
        with self.session(write=True) as s:
            s.execute(delete(SanityCheck).where(SanityCheck.checkpoint_id == checkpoint_id,
                                                SanityCheck.threat == threat,
                                                SanityCheck.name.in_([r.name for r in rows])))
            for row in rows:
                row.checkpoint_id, row.threat = checkpoint_id, threat
                s.add(row)

    # ------------------------------------------------------------------ remedies

    def remedy_outcomes(self, checkpoint_id: int, threat: str) -> list[RemedyOutcome]:
        """The adaptive stage's outcomes for a checkpoint under a threat model, by check name."""
        with self.session() as s:
            return list(s.scalars(select(RemedyOutcome).where(
                RemedyOutcome.checkpoint_id == checkpoint_id, RemedyOutcome.threat == threat)
                .order_by(RemedyOutcome.check)))

    def replace_remedy_outcomes(self, checkpoint_id: int, threat: str, rows: Sequence[RemedyOutcome]) -> None:
        """Store these outcomes as all the checkpoint has under the threat model (older ones go)."""
        with self.session(write=True) as s:
            s.execute(delete(RemedyOutcome).where(RemedyOutcome.checkpoint_id == checkpoint_id,
                                                  RemedyOutcome.threat == threat))
            for row in rows:
                row.checkpoint_id, row.threat = checkpoint_id, threat
                s.add(row)

    # ------------------------------------------------------------------ jobs

    def add_jobs(self, specs: Sequence["JobSpec"], force: bool = False) -> dict[str, int]:
        """Insert the jobs that are not stored yet (pending) with their dependencies, and return
        {key: job id} for all of them. Stored ones keep their state, except failed ones, which go
        back to pending (the cause may be fixed), and with `force` every one (its work is redone)."""
        ids: dict[str, int] = {}
        with self.session(write=True) as s:
            stored = {j.key: j for j in s.scalars(select(Job).where(Job.key.in_([spec.key for spec in specs])))}
            for spec in specs:
                job = stored.get(spec.key)
                if job is None:
                    job = Job(key=spec.key, kind=spec.kind, priority=spec.priority, payload=spec.payload,
                              state="pending", force=force, attempts=0, did_work=False)
                    s.add(job)
                elif force or job.state == "failed":
                    job.state, job.force, job.attempts, job.error = "pending", force or job.force, 0, None
                    job.lease_owner = job.lease_expires = job.finished_at = None
                s.flush()
                ids[spec.key] = job.job_id
            for spec in specs:
                known = set(s.scalars(select(JobDependency.depends_on).where(JobDependency.job_id == ids[spec.key])))
                s.add_all([JobDependency(job_id=ids[spec.key], depends_on=ids[dep])
                           for dep in dict.fromkeys(spec.depends_on) if ids[dep] not in known])
        return ids

    def claim_job(self, owner: str, lease_seconds: float, among: Sequence[int] | None = None,
                  max_attempts: int = 3) -> Job | None:
        """Atomically claim one job whose dependencies are all done: a pending one, or a running one
        whose worker's lease expired (a lost worker; after `max_attempts` claims it is failed
        instead). Lower priority first, then the order the jobs were added. `among` limits the
        candidates to these job ids. Returns the claimed job, or None."""
        now = utcnow()
        undone = select(JobDependency.job_id).join(Job, Job.job_id == JobDependency.depends_on).where(
            Job.state != "done")
        query = (select(Job).where(or_(Job.state == "pending", and_(Job.state == "running", Job.lease_expires < now)),
                                   Job.job_id.not_in(undone))
                 .order_by(Job.priority, Job.job_id).limit(1))
        if among is not None:
            query = query.where(Job.job_id.in_(list(among)))
        while True:
            with self.session(write=True) as s:
                if s.bind.dialect.name == "postgresql":
                    query = query.with_for_update(skip_locked=True, of=Job)
                job = s.scalars(query).first()
                if job is None:
                    return None
                if job.attempts >= max_attempts:
                    job.state, job.finished_at = "failed", now
                    job.error = f"its worker was lost {job.attempts} times (killed, or the node went away)"
                    continue
                job.state, job.lease_owner, job.attempts = "running", owner, job.attempts + 1
                job.lease_expires = now + dt.timedelta(seconds=lease_seconds)
                job.heartbeat, job.error = now, None
                return job

    def renew_lease(self, job_id: int, owner: str, lease_seconds: float) -> bool:
        """Extend the lease of a job this owner holds; False when it no longer holds it."""
        now = utcnow()
        with self.session(write=True) as s:
            job = s.get(Job, job_id)
            if job is None or job.state != "running" or job.lease_owner != owner:
                return False
            job.heartbeat, job.lease_expires = now, now + dt.timedelta(seconds=lease_seconds)
            return True

    def finish_job(self, job_id: int, owner: str, *, state: str, did_work: bool = False, error: str | None = None) -> None:
        """Record the end of a job's execution: "done", "failed" (with its one-line error) or
        "pending" (released, to be retried). The work is idempotent, so a worker that finishes
        after its lease expired still records it."""
        with self.session(write=True) as s:
            job = s.get(Job, job_id)
            job.state, job.error, job.lease_owner, job.lease_expires = state, error, None, None
            if state != "pending":
                job.finished_at, job.did_work, job.force, job.done_by = utcnow(), did_work, False, owner

    def runnable_jobs_left(self, among: Sequence[int] | None = None) -> bool:
        """Whether any job (of `among`) is running or may still run: pending and not waiting, at
        any depth, on a failed one."""
        jobs = {job.job_id: job for job in self.jobs(among)}
        states = {job.job_id: job.state for job in self.jobs()} if among is not None else \
            {i: job.state for i, job in jobs.items()}
        blocked: dict[int, bool] = {}

        def is_blocked(job_id: int) -> bool:
            if job_id not in blocked:
                job = jobs.get(job_id)
                deps = job.depends if job is not None else []
                blocked[job_id] = states.get(job_id) == "failed" or any(is_blocked(d) for d in deps)
            return blocked[job_id]

        return any(job.state == "running" or (job.state == "pending" and not is_blocked(i)) for i, job in jobs.items())

    def jobs(self, among: Sequence[int] | None = None) -> list[Job]:
        """The jobs (these ids, or all) in the order they were added, each with its dependency ids
        in `depends`."""
        with self.session() as s:
            query = select(Job).order_by(Job.job_id)
            if among is not None:
                query = query.where(Job.job_id.in_(list(among)))
            jobs = list(s.scalars(query))
            deps = s.execute(select(JobDependency.job_id, JobDependency.depends_on)).all()
        per: dict[int, list[int]] = {}
        for job_id, depends_on in deps:
            per.setdefault(job_id, []).append(depends_on)
        for job in jobs:
            job.depends = sorted(per.get(job.job_id, []))
        return jobs

    # ------------------------------------------------------------------ the report's bulk reads

    def tables(self) -> dict[str, pd.DataFrame]:
        """Every table as a DataFrame, for the report (which sorts and formats with pandas)."""
        tables = {"runs": Run, "epochs": TrainEpoch, "checkpoints": Checkpoint, "run_checkpoints": RunCheckpoint,
                  "evaluations": Evaluation, "sanity": SanityCheck, "curves": Curve, "curve_points": CurvePoint,
                  "remedies": RemedyOutcome}
        with self.engine.connect() as con:
            return {name: pd.read_sql(select(cls.__table__), con) for name, cls in tables.items()}


def _check_sqlite_file(path: str, name: str, readonly: bool) -> None:
    """Refuse, before any work, a SQLite file that cannot be written (unless `readonly`) or that
    fails SQLite's quick check."""
    if not os.path.exists(path):
        if readonly:
            raise BenchError(f"database {name!r} does not exist")
        return
    folder = os.path.dirname(path) or "."
    if not readonly and not (os.access(path, os.W_OK) and os.access(folder, os.W_OK)):
        raise BenchError(f"database {name!r} is read-only (the file or its folder): results could not be saved; "
                         "give a writable --db (bench report can still render it)")
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro" + ("&immutable=1" if not os.access(folder, os.W_OK) else ""),
                              uri=True, timeout=BUSY_TIMEOUT_S)
        try:
            verdict = con.execute("PRAGMA quick_check").fetchone()[0]
        finally:
            con.close()
    except sqlite3.DatabaseError as exc:
        raise BenchError(f"cannot open database {name!r}: {exc}") from None
    if verdict != "ok":
        raise BenchError(f"database {name!r} is corrupted (SQLite quick_check: {verdict.splitlines()[0][:120]}); "
                         "restore it from a copy, or give a new --db")


def _readonly_url(path: str) -> str:
    """A read-only SQLite URL; immutable when the folder is read-only too (no WAL index can be made)."""
    immutable = "&immutable=1" if not os.access(os.path.dirname(path) or ".", os.W_OK) else ""
    return f"sqlite:///file:{path}?mode=ro{immutable}&uri=true"


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
