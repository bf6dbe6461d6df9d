"""Audit events written straight into the table, many at once (executemany), for
the export tests: hostile client strings in every free-text field."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import insert

from signery.server.audit.models import AuditEventRow
from signery.server.persistence.db import make_engine
from tests.support import Installation

# A formula, a forged JSON line, a forged CSV row, a quote, a tab.
HOSTILE = (
    '=HYPERLINK("http://evil")',
    'ua\n{"id":"forged","kind":"signing.sign.succeeded"}',
    'machine\r\n"forged",row,here',
    "'quoted",
    "+1-2",
    "@SUM(A1)",
    "-cmd",
    "\ttabbed",
    "plain, with comma and \u2028 separator",
)


def insert_events(installation: Installation, start: datetime, count: int) -> None:
    """``count`` events one second apart from ``start``, outside any TSG (so the
    root administrator reads them)."""
    rows: list[dict[str, Any]] = []
    for i in range(count):
        h = HOSTILE[i % len(HOSTILE)]
        rows.append(
            {
                "id": str(uuid.uuid4()),
                "time": start + timedelta(seconds=i),
                "kind": "signing.sign.succeeded" if i % 2 else "signing.sign.denied",
                "outcome": "succeeded" if i % 2 else "denied",
                "reason": None if i % 2 else "scheme_not_allowed",
                "tsg_id": None,
                "tsg_path": None,
                "principal_type": "account",
                "principal_id": str(uuid.uuid4()),
                "principal_name": h,
                "key_id": str(uuid.uuid4()),
                "key_version": 1 + i % 3,
                "algorithm": "EC_P256",
                "digest": f"{i:064x}",
                "client_ip": "192.0.2.7",
                "user_agent": HOSTILE[(i + 1) % len(HOSTILE)],
                "client_machine": HOSTILE[(i + 2) % len(HOSTILE)],
                "client_tool": HOSTILE[(i + 3) % len(HOSTILE)],
                "request_id": uuid.uuid4().hex,
                "node_id": "bulk-node",
                "details": json.dumps({"key_ref": h, "n": i}, sort_keys=True),
                "node_seq": None,
                "prev_hash": None,
                "hash": None,
            }
        )
    engine = make_engine(installation.settings.resolved_database_url, pool_size=1)
    try:
        with engine.begin() as conn:
            for chunk in range(0, count, 5000):
                conn.execute(insert(AuditEventRow), rows[chunk : chunk + 5000])
    finally:
        engine.dispose()
