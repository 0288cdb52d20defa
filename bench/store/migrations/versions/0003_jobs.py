"""Jobs: a suite's work as a graph that workers claim under a lease (`jobs`, `job_dependencies`).

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("job_id", sa.Integer, primary_key=True),
        sa.Column("key", sa.Text, nullable=False, unique=True),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("payload", sa.JSON, nullable=False),
        sa.Column("state", sa.String(10), nullable=False),
        sa.Column("force", sa.Boolean, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("lease_owner", sa.Text),
        sa.Column("lease_expires", sa.DateTime),
        sa.Column("heartbeat", sa.DateTime),
        sa.Column("did_work", sa.Boolean, nullable=False),
        sa.Column("done_by", sa.Text),
        sa.Column("error", sa.Text),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("finished_at", sa.DateTime))
    op.create_index("ix_jobs_state", "jobs", ["state"])
    op.create_table(
        "job_dependencies",
        sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.job_id"), primary_key=True),
        sa.Column("depends_on", sa.Integer, sa.ForeignKey("jobs.job_id"), primary_key=True))
    op.create_index("ix_job_dependencies_depends_on", "job_dependencies", ["depends_on"])
