"""Sink forwarding where commit order can differ from ``seq`` order: PostgreSQL
hands out sequence numbers before commit (SQLite has one writer at a time, so
there seq order is commit order and this case cannot arise: PostgreSQL only)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import insert

from signery.server.audit.models import AuditEventRow
from signery.server.audit.sinks import Forwarder, ForwarderConfig, SyslogSink, SyslogTarget
from signery.server.clock import SystemClock
from signery.server.db import Database, make_engine
from tests.server.audit.sink_receivers import SyslogReceiver
from tests.server.audit.test_sinks import (
    assert_delivered,
    cursor_of,
    db,  # noqa: F401 - fixture
    last_seq,
    sign_many,
    wait_for,
)
from tests.support import Api, Installation, free_port, new_installation


@pytest.fixture(scope="module")
def installation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installation]:
    with new_installation("postgresql", tmp_path_factory.mktemp("sinks-pg")) as inst:
        yield inst


def test_an_event_committed_late_is_not_skipped(
    installation: Installation,
    db: Database,  # noqa: F811 - the fixture imported above
    api: Api,
) -> None:
    """PostgreSQL hands out seq numbers before commit: an event whose transaction
    commits after later ones must still be sent, in order. A number whose
    transaction rolled back is skipped after audit_sink_gap_seconds."""
    receiver = SyslogReceiver("tcp", free_port())
    receiver.start()
    config = ForwarderConfig(poll_seconds=0.05, retry_max_seconds=0.2, gap_seconds=1.0)
    target = SyslogTarget.parse(f"tcp://127.0.0.1:{receiver.port}")
    forwarder = Forwarder(db, SyslogSink(target, 13, 2.0), "node-g", SystemClock(), config)
    engine = make_engine(installation.settings.resolved_database_url, pool_size=1)
    row = {
        "time": datetime.now(UTC),
        "kind": "server.initialized",
        "outcome": "succeeded",
        "principal_type": "system",
        "node_id": "slow-writer",
        "details": "{}",
    }
    try:
        before = cursor_of(db, "syslog")
        forwarder.start()
        for ending in ("commit", "rollback"):
            with engine.connect() as slow:
                held = slow.execute(
                    insert(AuditEventRow).values(id=str(uuid.uuid4()), **row)
                ).inserted_primary_key[0]
                sign_many(api, 3, f"late-{ending}")
                time.sleep(0.4)
                assert cursor_of(db, "syslog") < held  # waits at the gap
                getattr(slow, ending)()
            wait_for(lambda: cursor_of(db, "syslog") >= last_seq(db))
        received = receiver.events()
        assert_delivered(received, db, before)
        assert len(received) == len({e["id"] for e in received})
    finally:
        forwarder.stop()
        engine.dispose()
        receiver.stop()
