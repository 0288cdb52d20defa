"""Checkpoint keys: one `checkpoints` row per distinct weights file (unique sha256) that
evaluations, curves and sanity checks reference by foreign key instead of a sha256 string;
`run_checkpoints` says which checkpoint is a run's best, last or planted one; threat models are
keyed by their exact text ("Linf:0.2") instead of a float in a unique key; curve points are
keyed by position; sanity checks record the check's revision and a digest of their inputs;
free-text columns (labels, device, implementation) are unbounded; `schema_info` is replaced by
Alembic's own record.

Only legacy SQLite databases run this revision (earlier releases shipped no PostgreSQL driver):
tables are rebuilt under new names, filled with INSERT ... SELECT, and renamed, keeping every id.
A sha256 that evaluations refer to without a checkpoint row (`bench eval` of a file trained
elsewhere) gets one, its path taken from the evaluation's recorded config.

Revision ID: 0002
Revises: 0001
"""

import json

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

metadata = sa.MetaData()
# referenced, not rebuilt: declared so that the foreign keys below compile
sa.Table("runs", metadata, sa.Column("run_id", sa.String(64), primary_key=True))


def _provenance() -> list[sa.Column]:
    return [sa.Column("git_commit", sa.String(64)), sa.Column("versions", sa.JSON, nullable=False),
            sa.Column("device", sa.Text), sa.Column("created_at", sa.DateTime, nullable=False),
            sa.Column("config", sa.JSON, nullable=False), sa.Column("seed", sa.Integer, nullable=False)]


TABLES = [
    sa.Table("checkpoints", metadata,
             sa.Column("checkpoint_id", sa.Integer, primary_key=True),
             sa.Column("sha256", sa.String(64), nullable=False, unique=True),
             sa.Column("path", sa.Text, nullable=False),
             sa.Column("run_id", sa.String(64), sa.ForeignKey("runs.run_id")),
             sa.Column("epoch", sa.Integer), *_provenance()),
    sa.Table("run_checkpoints", metadata,
             sa.Column("run_id", sa.String(64), sa.ForeignKey("runs.run_id"), primary_key=True),
             sa.Column("kind", sa.String(100), primary_key=True),
             sa.Column("checkpoint_id", sa.Integer, sa.ForeignKey("checkpoints.checkpoint_id"), nullable=False)),
    sa.Table("evaluations", metadata,
             sa.Column("evaluation_id", sa.Integer, primary_key=True),
             sa.Column("checkpoint_id", sa.Integer, sa.ForeignKey("checkpoints.checkpoint_id"), nullable=False),
             sa.Column("label", sa.Text, nullable=False), sa.Column("attack", sa.String(100), nullable=False),
             sa.Column("norm", sa.String(8)), sa.Column("eps", sa.Float), sa.Column("threat", sa.String(64)),
             sa.Column("config_hash", sa.String(64), nullable=False),
             sa.Column("indices_hash", sa.String(64), nullable=False),
             sa.Column("dataset", sa.String(100), nullable=False), sa.Column("n_samples", sa.Integer, nullable=False),
             sa.Column("n_correct", sa.Integer, nullable=False), sa.Column("robust_acc", sa.Float, nullable=False),
             sa.Column("forward_passes", sa.Integer, nullable=False),
             sa.Column("backward_passes", sa.Integer, nullable=False),
             sa.Column("seconds", sa.Float, nullable=False), sa.Column("implementation", sa.Text, nullable=False),
             sa.Column("role", sa.String(10), nullable=False, server_default="attack"),
             sa.Column("mean_loss", sa.Float), sa.Column("diagnostics", sa.JSON), *_provenance(),
             sa.UniqueConstraint("checkpoint_id", "attack", "config_hash", "indices_hash", "seed")),
    sa.Table("curves", metadata,
             sa.Column("curve_id", sa.Integer, primary_key=True),
             sa.Column("checkpoint_id", sa.Integer, sa.ForeignKey("checkpoints.checkpoint_id"), nullable=False),
             sa.Column("name", sa.String(100), nullable=False), sa.Column("x_label", sa.String(100), nullable=False),
             sa.Column("indices_hash", sa.String(64), nullable=False), *_provenance(),
             sa.UniqueConstraint("checkpoint_id", "name", "indices_hash", "seed")),
    sa.Table("curve_points", metadata,
             sa.Column("curve_id", sa.Integer, sa.ForeignKey("curves.curve_id"), primary_key=True),
             sa.Column("position", sa.Integer, primary_key=True), sa.Column("x", sa.Float, nullable=False),
             sa.Column("evaluation_id", sa.Integer, sa.ForeignKey("evaluations.evaluation_id"), nullable=False)),
    sa.Table("sanity_checks", metadata,
             sa.Column("sanity_check_id", sa.Integer, primary_key=True),
             sa.Column("checkpoint_id", sa.Integer, sa.ForeignKey("checkpoints.checkpoint_id"), nullable=False),
             sa.Column("threat", sa.String(64), nullable=False), sa.Column("norm", sa.String(8), nullable=False),
             sa.Column("eps", sa.Float, nullable=False), sa.Column("name", sa.String(100), nullable=False),
             sa.Column("revision", sa.Integer, nullable=False), sa.Column("inputs_hash", sa.String(64), nullable=False),
             sa.Column("status", sa.String(10), nullable=False), sa.Column("value", sa.Float),
             sa.Column("threshold", sa.Float), sa.Column("summary", sa.Text), sa.Column("evidence", sa.JSON, nullable=False),
             *_provenance(), sa.UniqueConstraint("checkpoint_id", "threat", "name")),
]
INDEXES = [("checkpoints", "run_id"), ("run_checkpoints", "checkpoint_id"), ("evaluations", "checkpoint_id"),
           ("evaluations", "threat"), ("evaluations", "role"), ("curves", "checkpoint_id"),
           ("curve_points", "evaluation_id"), ("sanity_checks", "checkpoint_id")]
PROVENANCE = "git_commit, versions, device, created_at, config, seed"


def threat_key(norm: str, eps: float) -> str:
    """As `bench.core.threat.threat_key` at this revision (frozen here)."""
    return f"{norm}:{float(eps)!r}"


def upgrade() -> None:
    con = op.get_bind()
    for table in TABLES:
        ddl = str(sa.schema.CreateTable(table).compile(dialect=con.dialect))
        op.execute(ddl.replace(f"CREATE TABLE {table.name} (", f"CREATE TABLE {table.name}_new (", 1))

    # one checkpoint per sha256: the old rows first (in id order), then shas known only to results
    old = con.execute(sa.text(f"SELECT run_id, kind, path, sha256, epoch, {PROVENANCE} FROM checkpoints "
                              "ORDER BY checkpoint_id")).mappings().all()
    ids: dict[str, int] = {}
    for row in old:
        if row["sha256"] not in ids:
            ids[row["sha256"]] = len(ids) + 1
            con.execute(sa.text(f"INSERT INTO checkpoints_new (checkpoint_id, sha256, path, run_id, epoch, {PROVENANCE}) "
                                f"VALUES (:id, :sha256, :path, :run_id, :epoch, :git_commit, :versions, :device, "
                                f":created_at, :config, :seed)"), {**row, "id": ids[row["sha256"]]})
    for table in ("evaluations", "curves", "sanity_checks"):
        rows = con.execute(sa.text(f"SELECT checkpoint_sha256, {PROVENANCE} FROM {table} "
                                   f"ORDER BY {table[:-1]}_id")).mappings().all()
        for row in rows:
            sha = row["checkpoint_sha256"]
            if sha in ids:
                continue
            ids[sha] = len(ids) + 1
            config = row["config"]
            config = json.loads(config) if isinstance(config, str) else (config or {})
            con.execute(sa.text(f"INSERT INTO checkpoints_new (checkpoint_id, sha256, path, run_id, epoch, {PROVENANCE}) "
                                f"VALUES (:id, :sha, :path, NULL, NULL, :git_commit, :versions, :device, :created_at, "
                                f":config, :seed)"),
                        {**row, "id": ids[sha], "sha": sha, "path": str(config.get("checkpoint", ""))})
    con.execute(sa.text("INSERT INTO run_checkpoints_new (run_id, kind, checkpoint_id) SELECT o.run_id, o.kind, "
                        "n.checkpoint_id FROM checkpoints o JOIN checkpoints_new n ON n.sha256 = o.sha256 "
                        "WHERE o.run_id IS NOT NULL"))

    join = "JOIN checkpoints_new c ON c.sha256 = t.checkpoint_sha256"
    op.execute(f"""INSERT INTO evaluations_new (evaluation_id, checkpoint_id, label, attack, norm, eps, threat, config_hash,
        indices_hash, dataset, n_samples, n_correct, robust_acc, forward_passes, backward_passes, seconds,
        implementation, role, mean_loss, diagnostics, {PROVENANCE})
        SELECT t.evaluation_id, c.checkpoint_id, t.label, t.attack, t.norm, t.eps, NULL, t.config_hash, t.indices_hash,
        t.dataset, t.n_samples, t.n_correct, t.robust_acc, t.forward_passes, t.backward_passes, t.seconds,
        t.implementation, t.role, t.mean_loss, t.diagnostics, {_prefixed('t')} FROM evaluations t {join}""")
    op.execute(f"""INSERT INTO curves_new (curve_id, checkpoint_id, name, x_label, indices_hash, {PROVENANCE})
        SELECT t.curve_id, c.checkpoint_id, t.name, t.x_label, t.indices_hash, {_prefixed('t')} FROM curves t {join}""")
    op.execute("""INSERT INTO curve_points_new (curve_id, position, x, evaluation_id)
        SELECT curve_id, ROW_NUMBER() OVER (PARTITION BY curve_id ORDER BY x) - 1, x, evaluation_id FROM curve_points""")
    op.execute(f"""INSERT INTO sanity_checks_new (sanity_check_id, checkpoint_id, threat, norm, eps, name, revision,
        inputs_hash, status, value, threshold, summary, evidence, {PROVENANCE})
        SELECT t.sanity_check_id, c.checkpoint_id, '', t.norm, t.eps, t.name, 1, '', t.status, t.value, t.threshold,
        t.summary, t.evidence, {_prefixed('t')} FROM sanity_checks t {join}""")
    for table in ("evaluations_new", "sanity_checks_new"):
        pairs = con.execute(sa.text(f"SELECT DISTINCT norm, eps FROM {table} WHERE norm IS NOT NULL")).all()
        for norm, eps in pairs:
            con.execute(sa.text(f"UPDATE {table} SET threat = :key WHERE norm = :norm AND eps = :eps"),
                        {"key": threat_key(norm, eps), "norm": norm, "eps": eps})

    for name in ("curve_points", "curves", "sanity_checks", "evaluations", "checkpoints", "schema_info"):
        op.execute(f"DROP TABLE {name}")
    for table in TABLES:
        op.execute(f"ALTER TABLE {table.name}_new RENAME TO {table.name}")
    for table, column in INDEXES:
        op.execute(f"CREATE INDEX ix_{table}_{column} ON {table} ({column})")


def _prefixed(alias: str) -> str:
    return ", ".join(f"{alias}.{c.strip()}" for c in PROVENANCE.split(","))
