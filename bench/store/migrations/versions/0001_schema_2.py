"""Schema 2 of the releases before Alembic: a schema-1 database gains evaluations.role, mean_loss
and diagnostics, sample_results.loss, the curve tables, and sanity checks keyed by threat model
(schema 1 keyed them by checkpoint alone; no release of it wrote any). A schema-2 database is
left as it is. Only such legacy databases ever run this revision: a new one is created at head.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

PROVENANCE = """git_commit VARCHAR(64), versions JSON NOT NULL, device VARCHAR(200), created_at DATETIME NOT NULL,
    config JSON NOT NULL, seed INTEGER NOT NULL"""

SCHEMA_2_TABLES = {
    "curves": f"""CREATE TABLE curves (curve_id INTEGER NOT NULL, checkpoint_sha256 VARCHAR(64) NOT NULL,
        name VARCHAR(100) NOT NULL, x_label VARCHAR(100) NOT NULL, indices_hash VARCHAR(64) NOT NULL, {PROVENANCE},
        PRIMARY KEY (curve_id), UNIQUE (checkpoint_sha256, name, indices_hash, seed))""",
    "curve_points": """CREATE TABLE curve_points (curve_id INTEGER NOT NULL, x FLOAT NOT NULL,
        evaluation_id INTEGER NOT NULL, PRIMARY KEY (curve_id, x), FOREIGN KEY(curve_id) REFERENCES curves (curve_id),
        FOREIGN KEY(evaluation_id) REFERENCES evaluations (evaluation_id))""",
    "sanity_checks": f"""CREATE TABLE sanity_checks (sanity_check_id INTEGER NOT NULL,
        checkpoint_sha256 VARCHAR(64) NOT NULL, norm VARCHAR(8) NOT NULL, eps FLOAT NOT NULL, name VARCHAR(100) NOT NULL,
        status VARCHAR(10) NOT NULL, value FLOAT, threshold FLOAT, summary TEXT, evidence JSON NOT NULL, {PROVENANCE},
        PRIMARY KEY (sanity_check_id), UNIQUE (checkpoint_sha256, norm, eps, name))""",
}
NEW_COLUMNS = {
    "evaluations": [("role", "VARCHAR(10) DEFAULT 'attack' NOT NULL"), ("mean_loss", "FLOAT"), ("diagnostics", "JSON")],
    "sample_results": [("loss", "FLOAT")],
}


def upgrade() -> None:
    con = op.get_bind()
    inspector = sa.inspect(con)
    tables = set(inspector.get_table_names())
    if "sanity_checks" in tables and "norm" not in {c["name"] for c in inspector.get_columns("sanity_checks")}:
        op.execute("DROP TABLE sanity_checks")
        tables.discard("sanity_checks")
    for name, ddl in SCHEMA_2_TABLES.items():
        if name not in tables:
            op.execute(ddl)
    for table, columns in NEW_COLUMNS.items():
        present = {c["name"] for c in inspector.get_columns(table)}
        for column, kind in columns:
            if column not in present:
                op.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
    op.execute("CREATE INDEX IF NOT EXISTS ix_evaluations_role ON evaluations (role)")
    op.execute("CREATE INDEX IF NOT EXISTS ix_curves_checkpoint_sha256 ON curves (checkpoint_sha256)")
    op.execute("CREATE INDEX IF NOT EXISTS ix_sanity_checks_checkpoint_sha256 ON sanity_checks (checkpoint_sha256)")
