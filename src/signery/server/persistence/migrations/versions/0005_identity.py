"""identity: account token epochs; every API token expires

Revision ID: 0005_identity
Revises: 0004
Create Date: 2026-12-07 03:30:00

``accounts.token_epoch``: access tokens carry the epoch they were issued in, and
disabling an account or removing one of its keys moves it on (existing tokens,
which carry none, count as epoch 0 and stay valid until then).

``api_tokens.expires_at`` becomes NOT NULL. API tokens that never expired, or
that would outlive the new maximum lifetime, expire ``UPGRADE_LIFETIME`` after
the upgrade: long enough to replace them, never forever. (The maximum is the
``api_token_max_lifetime_days`` setting, 90 days by default; a migration cannot
read settings, so it uses that default.)
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from alembic import op

revision = "0005_identity"
down_revision = "0004"
branch_labels = None
depends_on = None

UPGRADE_LIFETIME = timedelta(days=90)


def upgrade() -> None:
    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("token_epoch", sa.Integer(), server_default="0", nullable=False)
        )

    cap = datetime.now(UTC) + UPGRADE_LIFETIME
    tokens = sa.table("api_tokens", sa.column("expires_at", sa.DateTime(timezone=True)))
    op.execute(
        tokens.update()
        .where(sa.or_(tokens.c.expires_at.is_(None), tokens.c.expires_at > cap))
        .values(expires_at=cap)
    )
    with op.batch_alter_table("api_tokens", schema=None) as batch_op:
        batch_op.alter_column(
            "expires_at", existing_type=sa.DateTime(timezone=True), nullable=False
        )


def downgrade() -> None:
    with op.batch_alter_table("api_tokens", schema=None) as batch_op:
        batch_op.alter_column("expires_at", existing_type=sa.DateTime(timezone=True), nullable=True)

    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.drop_column("token_epoch")
