"""Reading an audit trail straight from a database (a live one or a copy), for
`signery audit verify --database-url/--data-dir`."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from sqlalchemy import create_engine, select
from sqlalchemy.engine import Connection

from signery.auditchain import Checkpoint, Report, verify
from signery.server.audit.models import (
    AuditChainHeadRow,
    AuditCheckpointRow,
    AuditEventRow,
    AuditSigningKeyRow,
)
from signery.server.persistence.db import table

_PAGE = 5000


def verify_database(
    url: str, exported: Sequence[Checkpoint] = (), public_keys: dict[str, bytes] | None = None
) -> Report:
    """Verify the trail in the database at ``url``. ``public_keys`` pins the keys
    that checkpoints must verify with; by default, the database's own audit keys
    (an exported checkpoint then still catches a key replaced in the database:
    its signature no longer verifies)."""
    # A plain engine: no connect-time pragmas, nothing written to a copy under
    # examination.
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            heads = {
                h.node_id: (h.seq, h.hash)
                for h in conn.execute(select(table(AuditChainHeadRow))).all()
            }
            stored = [
                Checkpoint(r.payload.encode(), r.signature, f"database checkpoint {r.id}")
                for r in conn.execute(
                    select(table(AuditCheckpointRow)).order_by(AuditCheckpointRow.created_at)
                ).all()
            ]
            keys = public_keys
            if keys is None:
                keys = {
                    k.id: k.public_key_der
                    for k in conn.execute(select(table(AuditSigningKeyRow))).all()
                }
            return verify(
                _events(conn), heads=heads, checkpoints=stored, exported=exported, public_keys=keys
            )
    finally:
        engine.dispose()


def _events(conn: Connection) -> Iterator[dict[str, Any]]:
    events = table(AuditEventRow)
    after = 0
    while True:
        rows = conn.execute(
            select(events).where(events.c.seq > after).order_by(events.c.seq).limit(_PAGE)
        ).all()
        for r in rows:
            yield dict(r._mapping)
        if len(rows) < _PAGE:
            return
        after = rows[-1].seq
