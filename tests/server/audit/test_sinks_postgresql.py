"""Sink forwarding where commit order can differ from ``seq`` order: PostgreSQL
hands out sequence numbers before commit (SQLite has one writer at a time, so
there seq order is commit order and this case cannot arise: PostgreSQL only).

A transaction is held open on an explicit connection to make the case happen.
Every wait is for a condition, bounded generously so that a machine running two
test suites at once only makes a test slower, never wrong; no test sleeps or
depends on how fast anything runs."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import Connection, Engine, insert, select, text

from signery.protocol import AuditOutcome
from signery.server.audit.events import SYSTEM, AuditRecord, EventKind
from signery.server.audit.models import AuditEventRow, AuditSinkGapRow
from signery.server.audit.recorder import AuditRecorder
from signery.server.audit.sinks import Forwarder, ForwarderConfig, SyslogSink, SyslogTarget
from signery.server.persistence.db import Database, make_engine
from signery.server.runtime.clock import SystemClock
from tests.server.audit.sink_receivers import SyslogReceiver
from tests.server.audit.test_sinks import (
    assert_delivered,
    cursor_of,
    db,  # noqa: F401 - fixture
    events_after,
    last_seq,
    received_after,
    sign_many,
    wait_for,
)
from tests.support import Api, Installation, free_port, new_installation

# Seconds: each condition holds in well under one on an idle machine.
PATIENCE = 120.0


@pytest.fixture(scope="module")
def installation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installation]:
    with new_installation("postgresql", tmp_path_factory.mktemp("sinks-pg")) as inst:
        yield inst


@pytest.fixture
def receiver() -> Iterator[SyslogReceiver]:
    receiver = SyslogReceiver("tcp", free_port())
    receiver.start()
    yield receiver
    receiver.stop()


@pytest.fixture
def writer(installation: Installation) -> Iterator[Engine]:
    """Connections for the transactions a test holds open."""
    engine = make_engine(installation.settings.resolved_database_url, pool_size=2)
    yield engine
    engine.dispose()


def forwarder_for(database: Database, receiver: SyslogReceiver, gap_seconds: float) -> Forwarder:
    config = ForwarderConfig(poll_seconds=0.05, retry_max_seconds=0.2, gap_seconds=gap_seconds)
    target = SyslogTarget.parse(f"tcp://127.0.0.1:{receiver.port}")
    node = f"node-{uuid.uuid4().hex[:6]}"
    return Forwarder(
        db=database,
        sink=SyslogSink(target=target, facility=13, timeout=2.0),
        node_id=node,
        clock=SystemClock(),
        config=config,
    )


def insert_open(slow: Connection) -> tuple[int, str]:
    """An audit event inserted in ``slow``'s transaction and left uncommitted:
    its seq is drawn now; its row becomes visible at commit, or never."""
    event_id = str(uuid.uuid4())
    seq = slow.execute(
        insert(AuditEventRow).values(
            id=event_id,
            time=datetime.now(UTC),
            kind="server.initialized",
            outcome="succeeded",
            principal_type="system",
            node_id="slow-writer",
            details="{}",
        )
    ).inserted_primary_key[0]
    return int(seq), event_id


def received_ids(receiver: SyslogReceiver) -> set[str]:
    return {e["id"] for e in receiver.events()}


def stored_gaps(database: Database) -> list[tuple[int, int]]:
    g = AuditSinkGapRow
    with database.read() as s:
        rows = s.execute(
            select(g.first_seq, g.last_seq).where(g.sink == "syslog").order_by(g.first_seq)
        ).all()
    return [(int(r[0]), int(r[1])) for r in rows]


def test_an_event_committed_late_is_not_skipped(
    db: Database,  # noqa: F811 - the fixture imported above
    api: Api,
    receiver: SyslogReceiver,
    writer: Engine,
) -> None:
    """A transaction that commits long after audit_sink_gap_seconds (the later
    events went out meanwhile) still has its event delivered, late, with its id."""
    forwarder = forwarder_for(db, receiver, gap_seconds=0.2)
    try:
        before = cursor_of(db, "syslog")
        forwarder.start()
        with writer.connect() as slow:
            held, held_id = insert_open(slow)
            sign_many(api, 3, "late-commit")
            # The window is over: the events after the open one have gone out.
            wait_for(lambda: cursor_of(db, "syslog") >= last_seq(db), PATIENCE)
            assert held_id not in received_ids(receiver)
            assert forwarder.status().late == ((held, held),)
            slow.commit()
        wait_for(lambda: held_id in received_ids(receiver), PATIENCE)
        received = received_after(receiver, db, before)
        assert [e["seq"] for e in received if e["id"] == held_id] == [held]
        assert received[-1]["id"] == held_id  # sent after the later events
        assert {e["id"] for e in received} == {i for _, i in events_after(db, before)}
        wait_for(lambda: stored_gaps(db) == [], PATIENCE)
    finally:
        forwarder.stop()


def test_a_late_commit_within_the_window_is_sent_in_order(
    db: Database,  # noqa: F811 - the fixture imported above
    api: Api,
    receiver: SyslogReceiver,
    writer: Engine,
) -> None:
    """While the window lasts, later events wait for the missing number, so a
    transaction that commits in time keeps the trail in seq order."""
    forwarder = forwarder_for(db, receiver, gap_seconds=3600)
    try:
        before = cursor_of(db, "syslog")
        forwarder.start()
        with writer.connect() as slow:
            held, _ = insert_open(slow)
            sign_many(api, 3, "in-window")
            wait_for(lambda: forwarder.status().waiting_for == held, PATIENCE)
            assert cursor_of(db, "syslog") < held
            slow.commit()
        wait_for(lambda: cursor_of(db, "syslog") >= last_seq(db), PATIENCE)
        received = received_after(receiver, db, before)
        assert_delivered(received, db, before)
        assert [e["seq"] for e in received] == sorted(e["seq"] for e in received)
        assert forwarder.status().late == ()
    finally:
        forwarder.stop()


def test_a_rolled_back_number_does_not_hold_the_sink(
    db: Database,  # noqa: F811 - the fixture imported above
    api: Api,
    receiver: SyslogReceiver,
    writer: Engine,
) -> None:
    """A number whose transaction rolled back is known final as soon as the
    transactions running when the gap was seen have ended: the sink goes on
    without waiting for audit_sink_gap_seconds (here an hour)."""
    forwarder = forwarder_for(db, receiver, gap_seconds=3600)
    try:
        before = cursor_of(db, "syslog")
        forwarder.start()
        with writer.connect() as slow:
            held, _ = insert_open(slow)
            sign_many(api, 3, "rolled-back")
            wait_for(lambda: forwarder.status().waiting_for == held, PATIENCE)
            slow.rollback()
        wait_for(lambda: cursor_of(db, "syslog") >= last_seq(db), PATIENCE)
        assert cursor_of(db, "syslog") > held
        received = received_after(receiver, db, before)
        assert_delivered(received, db, before)
        assert len(received) == len({e["id"] for e in received})
        assert forwarder.status().late == ()
        assert stored_gaps(db) == []
    finally:
        forwarder.stop()


def test_watched_numbers_survive_a_restart_and_a_rolled_back_one_is_dropped(
    db: Database,  # noqa: F811 - the fixture imported above
    api: Api,
    receiver: SyslogReceiver,
    writer: Engine,
) -> None:
    """The numbers a sink went past are stored with its cursor: the forwarder
    that takes over (another process, another replica) still sends the one that
    commits and forgets the one rolled back, without holding the sink meanwhile."""
    first = forwarder_for(db, receiver, gap_seconds=0.2)
    second = forwarder_for(db, receiver, gap_seconds=0.2)
    try:
        before = cursor_of(db, "syslog")
        first.start()
        with writer.connect() as committing, writer.connect() as rolling_back:
            kept, kept_id = insert_open(committing)
            dropped, _ = insert_open(rolling_back)
            sign_many(api, 3, "restart")
            wait_for(lambda: cursor_of(db, "syslog") >= last_seq(db), PATIENCE)
            assert stored_gaps(db) == [(kept, dropped)]
            first.stop()
            second.start()
            wait_for(lambda: second.status().holds_lease, PATIENCE)
            assert second.status().late == ((kept, dropped),)
            committing.commit()
            rolling_back.rollback()
        wait_for(lambda: kept_id in received_ids(receiver), PATIENCE)
        wait_for(lambda: stored_gaps(db) == [], PATIENCE)
        assert second.status().late == ()
        sign_many(api, 2, "after-restart")
        wait_for(lambda: cursor_of(db, "syslog") >= last_seq(db), PATIENCE)
        received = received_after(receiver, db, before)
        assert {e["id"] for e in received} == {i for _, i in events_after(db, before)}
        assert dropped not in {e["seq"] for e in received}
    finally:
        first.stop()
        second.stop()


def test_the_recorder_holds_a_transaction_id_before_it_draws_seq(
    db: Database,  # noqa: F811 - the fixture imported above
) -> None:
    """What the sink's rule for final gaps stands on: a transaction that writes
    events has its transaction id before their seq numbers are drawn, with and
    without the hash chain, by both ways in. A real trigger checks it in the
    database, between the drawing of the number and the row's insert."""
    with db.write() as s:
        s.execute(
            text(
                "CREATE FUNCTION seq_drawn_with_xid() RETURNS trigger LANGUAGE plpgsql AS $$ "
                "BEGIN IF pg_current_xact_id_if_assigned() IS NULL THEN "
                "RAISE EXCEPTION 'seq % drawn before the transaction id', NEW.seq; "
                "END IF; RETURN NEW; END $$"
            )
        )
        s.execute(
            text(
                "CREATE TRIGGER seq_drawn_with_xid BEFORE INSERT ON audit_events "
                "FOR EACH ROW EXECUTE FUNCTION seq_drawn_with_xid()"
            )
        )
    record = AuditRecord(EventKind.SERVER_INITIALIZED, AuditOutcome.SUCCEEDED, SYSTEM)
    try:
        for chained in (True, False):
            # Not started: commit_sync writes on the calling thread, as the writer would.
            recorder = AuditRecorder(
                db=db, node_id=f"xid-{chained}", clock=SystemClock(), hash_chain=chained
            )
            recorder.commit_sync(record)
            with db.write() as s:
                recorder.record(s, record)
    finally:
        with db.write() as s:
            s.execute(text("DROP TRIGGER seq_drawn_with_xid ON audit_events"))
            s.execute(text("DROP FUNCTION seq_drawn_with_xid()"))
