"""Upgrading keeps what approvers saw: a grant made from a signing request before
digest binding covers the one digest that request showed (its uses so far
counted), a pre-approval stays a grant for any digest. SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine

from signery.server.persistence import migrate
from tests.server.persistence.test_migrations import BACKENDS, empty_database

REVISION = "0008_grant_binding"
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
DIGEST = "ab" * 32


def run(engine: Engine, action: str, revision: str) -> None:
    cfg = migrate.alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        getattr(command, action)(cfg, revision)


def previous() -> str:
    down = ScriptDirectory.from_config(migrate.alembic_config()).get_revision(REVISION)
    assert down is not None
    assert isinstance(down.down_revision, str)
    return down.down_revision


def insert(conn: Connection, table_name: str, **values: Any) -> None:
    """A row with ``values``, its other required columns filled with placeholders."""
    table = sa.Table(table_name, sa.MetaData(), autoload_with=conn)
    row = dict(values)
    for c in table.columns:
        if c.name in row or c.nullable or c.server_default is not None:
            continue
        python = c.type.python_type
        if python is datetime:
            row[c.name] = NOW
        elif python is int:
            row[c.name] = 0
        elif python is bool:
            row[c.name] = False
        elif python is bytes:
            row[c.name] = b"\x00"
        else:
            length = getattr(c.type, "length", None) or 8
            row[c.name] = "x"[: max(length, 1)]
    conn.execute(table.insert().values(**row))


@pytest.fixture(params=BACKENDS)
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    with empty_database(request.param, tmp_path) as e:
        run(e, "upgrade", previous())
        yield e


def test_existing_grants_keep_what_their_approvers_saw(engine: Engine) -> None:
    later = NOW + timedelta(days=1)
    with engine.begin() as conn:
        insert(conn, "tsgs", id="1000000001", name="root", path="/1000000001/", parent_id=None)
        insert(conn, "accounts", id="account-1", tsg_id="1000000001", name="ci")
        insert(conn, "signing_keys", id="key-1", tsg_id="1000000001", name="release")
        common = {
            "key_id": "key-1",
            "tsg_id": "1000000001",
            "account_id": "account-1",
            "status": "approved",
            "required_approvals": 1,
            "grant_ttl_seconds": 3600,
            "expires_at": later,
            "created_at": NOW,
            "updated_at": NOW,
        }
        # Made by the signing plane: approvers saw this one digest.
        insert(
            conn,
            "signing_requests",
            id="req-signed",
            requested_by_type="account",
            requested_by_id="account-1",
            digest_algorithm="sha256",
            digest=DIGEST.upper(),
            scheme="ecdsa",
            grant_id="grant-signed",
            grant_max_uses=3,
            **common,
        )
        # A pre-approval: no digest shown, any digest meant.
        insert(
            conn,
            "signing_requests",
            id="req-pre",
            requested_by_type="user",
            requested_by_id="user-1",
            grant_id="grant-pre",
            grant_max_uses=2,
            **common,
        )
        for grant_id, request_id, uses, max_uses in (
            ("grant-signed", "req-signed", 1, 3),
            ("grant-pre", "req-pre", 1, 2),
        ):
            insert(
                conn,
                "signing_grants",
                id=grant_id,
                key_id="key-1",
                account_id="account-1",
                request_id=request_id,
                uses=uses,
                max_uses=max_uses,
                expires_at=later,
                created_at=NOW,
            )

    run(engine, "upgrade", REVISION)

    with engine.connect() as conn:
        scopes = dict(conn.execute(sa.text("SELECT id, scope FROM signing_requests")).all())
        assert scopes == {"req-signed": "digests", "req-pre": "any_digest"}
        grants = dict(conn.execute(sa.text("SELECT id, scope FROM signing_grants")).all())
        assert grants == {"grant-signed": "digests", "grant-pre": "any_digest"}
        items = conn.execute(
            sa.text(
                "SELECT request_id, position, digest_algorithm, digest, scheme, uses "
                "FROM signing_request_digests"
            )
        ).all()
        assert [tuple(i) for i in items] == [("req-signed", 0, "sha256", DIGEST, "ecdsa", 1)]
        columns = {c["name"] for c in sa.inspect(conn).get_columns("signing_requests")}
        assert {"digest", "digest_algorithm", "scheme"}.isdisjoint(columns)

    # And back: the request shows its digest again.
    run(engine, "downgrade", previous())
    with engine.connect() as conn:
        shown = conn.execute(
            sa.text("SELECT id, digest_algorithm, digest, scheme FROM signing_requests ORDER BY id")
        ).all()
        assert [tuple(r) for r in shown] == [
            ("req-pre", None, None, None),
            ("req-signed", "sha256", DIGEST, "ecdsa"),
        ]
