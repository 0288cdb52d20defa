"""Remedy outcomes: what the adaptive stage did about each flagged check of a checkpoint
(`remedy_outcomes`); the adaptive evaluations themselves are ordinary `evaluations` rows with
role "adaptive".

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "remedy_outcomes",
        sa.Column("remedy_outcome_id", sa.Integer, primary_key=True),
        sa.Column("checkpoint_id", sa.Integer, sa.ForeignKey("checkpoints.checkpoint_id"), nullable=False),
        sa.Column("threat", sa.String(64), nullable=False),
        sa.Column("norm", sa.String(8), nullable=False),
        sa.Column("eps", sa.Float, nullable=False),
        sa.Column("check", sa.String(100), nullable=False),
        sa.Column("check_status", sa.String(10), nullable=False),
        sa.Column("status", sa.String(10), nullable=False),
        sa.Column("closed_by", sa.String(100)),
        sa.Column("worst_case", sa.Float),
        sa.Column("n_samples", sa.Integer),
        sa.Column("recheck_status", sa.String(10)),
        sa.Column("recheck_summary", sa.Text),
        sa.Column("remedies", sa.JSON, nullable=False),
        sa.Column("inputs_hash", sa.String(64), nullable=False),
        sa.Column("git_commit", sa.String(64)),
        sa.Column("versions", sa.JSON, nullable=False),
        sa.Column("device", sa.Text),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("config", sa.JSON, nullable=False),
        sa.Column("seed", sa.Integer, nullable=False),
        sa.UniqueConstraint("checkpoint_id", "threat", "check"))
    op.create_index("ix_remedy_outcomes_checkpoint_id", "remedy_outcomes", ["checkpoint_id"])
