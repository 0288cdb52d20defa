"""Adversarial examples: a few samples each attack evaluation fooled, clean and adversarial pixels,
for the report's run comparisons. A new table; every existing row is kept as it is (evaluations
stored before this revision simply have no examples).

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "adversarial_examples",
        sa.Column("evaluation_id", sa.Integer, sa.ForeignKey("evaluations.evaluation_id"), primary_key=True),
        sa.Column("sample_index", sa.Integer, primary_key=True),
        sa.Column("label", sa.Integer, nullable=False),
        sa.Column("predicted", sa.Integer, nullable=False),
        sa.Column("channels", sa.Integer, nullable=False),
        sa.Column("height", sa.Integer, nullable=False),
        sa.Column("width", sa.Integer, nullable=False),
        sa.Column("clean", sa.LargeBinary, nullable=False),
        sa.Column("adversarial", sa.LargeBinary, nullable=False),
    )
