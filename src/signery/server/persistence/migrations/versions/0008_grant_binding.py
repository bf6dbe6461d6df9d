"""approval grants bind the digests approvers saw

Revision ID: 0008_grant_binding
Revises: 0007_sink_gaps
Create Date: 2026-12-07 03:30:00

A signing request lists the (digest, digest_algorithm, scheme) items it covers
(``signing_request_digests``), and requests and grants say their scope:
``digests`` (exactly those items) or ``any_digest`` (a pre-approval that said so).

Existing rows keep what their approvers saw: a request made by the signing
plane showed one digest, so it and its grant cover that digest only (the
grant's uses already made count against it); a pre-approval showed none and
meant any digest, so it and its grant are ``any_digest``.
"""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from alembic import op

revision = "0008_grant_binding"
down_revision = "0007_sink_gaps"
branch_labels = None
depends_on = None

DIGESTS = "digests"
ANY_DIGEST = "any_digest"


def upgrade() -> None:
    op.create_table(
        "signing_request_digests",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("request_id", sa.String(length=36), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("digest_algorithm", sa.String(length=16), nullable=False),
        sa.Column("digest", sa.String(length=128), nullable=False),
        sa.Column("scheme", sa.String(length=16), nullable=False),
        sa.Column("uses", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["request_id"],
            ["signing_requests.id"],
            name=op.f("fk_signing_request_digests_request_id_signing_requests"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_signing_request_digests")),
        sa.UniqueConstraint(
            "request_id",
            "digest_algorithm",
            "digest",
            "scheme",
            # Named by hand: the conventional name is longer than PostgreSQL's 63 bytes.
            name=op.f("uq_signing_request_digests_item"),
        ),
    )
    with op.batch_alter_table("signing_request_digests", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_signing_request_digests_request_id"), ["request_id"], unique=False
        )
    # Plain ALTER TABLE, never a batch copy: on SQLite a copy drops and renames the
    # table, which the foreign keys of decisions and grants refuse. The default is
    # the narrowest scope; every existing row gets its real one below.
    for table in ("signing_requests", "signing_grants"):
        op.add_column(
            table,
            sa.Column("scope", sa.String(length=16), server_default=DIGESTS, nullable=False),
        )

    conn = op.get_bind()
    requests = sa.table(
        "signing_requests",
        sa.column("id", sa.String),
        sa.column("scope", sa.String),
        sa.column("digest_algorithm", sa.String),
        sa.column("digest", sa.String),
        sa.column("scheme", sa.String),
        sa.column("created_at", sa.DateTime(timezone=True)),
    )
    grants = sa.table(
        "signing_grants",
        sa.column("id", sa.String),
        sa.column("request_id", sa.String),
        sa.column("scope", sa.String),
        sa.column("uses", sa.Integer),
        sa.column("max_uses", sa.Integer),
    )
    items = sa.table(
        "signing_request_digests",
        sa.column("id", sa.String),
        sa.column("request_id", sa.String),
        sa.column("position", sa.Integer),
        sa.column("digest_algorithm", sa.String),
        sa.column("digest", sa.String),
        sa.column("scheme", sa.String),
        sa.column("uses", sa.Integer),
        sa.column("created_at", sa.DateTime(timezone=True)),
    )
    bound = sa.and_(
        requests.c.digest.is_not(None),
        requests.c.digest_algorithm.is_not(None),
        requests.c.scheme.is_not(None),
    )
    conn.execute(
        requests.update().values(
            scope=sa.case((bound, sa.literal(DIGESTS)), else_=sa.literal(ANY_DIGEST))
        )
    )
    used = {
        request_id: (uses, max_uses)
        for request_id, uses, max_uses in conn.execute(
            sa.select(grants.c.request_id, grants.c.uses, grants.c.max_uses).where(
                grants.c.request_id.is_not(None)
            )
        )
    }
    rows = conn.execute(
        sa.select(
            requests.c.id,
            requests.c.digest_algorithm,
            requests.c.digest,
            requests.c.scheme,
            requests.c.created_at,
        ).where(bound)
    ).all()
    for request_id, algorithm, digest, scheme, created_at in rows:
        uses, max_uses = used.get(request_id, (0, None))
        conn.execute(
            items.insert().values(
                id=str(uuid.uuid4()),
                request_id=request_id,
                position=0,
                digest_algorithm=algorithm,
                digest=digest.lower(),
                scheme=scheme,
                # Uses already made count against the one digest (never above the cap).
                uses=uses if max_uses is None else min(uses, max_uses),
                created_at=created_at,
            )
        )
    conn.execute(
        grants.update().values(
            scope=sa.func.coalesce(
                sa.select(requests.c.scope)
                .where(requests.c.id == grants.c.request_id)
                .scalar_subquery(),
                sa.literal(ANY_DIGEST),
            )
        )
    )
    # Native DROP COLUMN (SQLite 3.35+): these columns carry no index or constraint.
    for column in ("scheme", "digest", "digest_algorithm"):
        op.drop_column("signing_requests", column)


def downgrade() -> None:
    op.add_column("signing_requests", sa.Column("digest_algorithm", sa.String(16), nullable=True))
    op.add_column("signing_requests", sa.Column("digest", sa.String(128), nullable=True))
    op.add_column("signing_requests", sa.Column("scheme", sa.String(16), nullable=True))
    # The first digest of each request goes back to the request (what it showed before).
    op.execute(
        """
        UPDATE signing_requests SET
          digest_algorithm = (SELECT d.digest_algorithm FROM signing_request_digests d
                              WHERE d.request_id = signing_requests.id AND d.position = 0),
          digest = (SELECT d.digest FROM signing_request_digests d
                    WHERE d.request_id = signing_requests.id AND d.position = 0),
          scheme = (SELECT d.scheme FROM signing_request_digests d
                    WHERE d.request_id = signing_requests.id AND d.position = 0)
        """
    )
    for table in ("signing_requests", "signing_grants"):
        op.drop_column(table, "scope")
    with op.batch_alter_table("signing_request_digests", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_signing_request_digests_request_id"))
    op.drop_table("signing_request_digests")
