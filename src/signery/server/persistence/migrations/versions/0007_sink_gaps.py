"""audit sink gaps: numbers a sink went past, watched for late commits

Revision ID: 0007_sink_gaps
Revises: 0006_subject_policy
Create Date: 2026-12-10 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_sink_gaps"
down_revision = "0006_subject_policy"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_sink_gaps",
        sa.Column("sink", sa.String(length=64), nullable=False),
        sa.Column("first_seq", sa.BigInteger(), nullable=False),
        sa.Column("last_seq", sa.BigInteger(), nullable=False),
        sa.Column("horizon", sa.BigInteger(), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("sink", "first_seq", name=op.f("pk_audit_sink_gaps")),
    )


def downgrade() -> None:
    op.drop_table("audit_sink_gaps")
