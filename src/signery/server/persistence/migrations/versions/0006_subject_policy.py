"""subject policies of the built-in CA, one per TSG

Existing installations get no policy: from this version on, the built-in CA
certifies keys outside the root TSG (and EST enrollments labelled with such a
TSG) only under a subject policy a root superuser sets (docs/security.md, "On
upgrade").

Revision ID: 0006_subject_policy
Revises: 0005_identity
Create Date: 2026-12-14 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_subject_policy"
down_revision = "0005_identity"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "subject_policies",
        sa.Column("tsg_id", sa.String(length=10), nullable=False),
        sa.Column("rules_json", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(length=36), nullable=True),
        sa.ForeignKeyConstraint(
            ["tsg_id"], ["tsgs.id"], name=op.f("fk_subject_policies_tsg_id_tsgs")
        ),
        sa.PrimaryKeyConstraint("tsg_id", name=op.f("pk_subject_policies")),
    )


def downgrade() -> None:
    op.drop_table("subject_policies")
