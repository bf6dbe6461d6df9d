"""The audit recorder: the only writer of audit events and usage counters.

Three ways in:

* ``record(session, ...)`` adds an event to the caller's transaction, so a
  management change and its event commit together or not at all;
* ``commit(...)`` (async) / ``commit_sync(...)`` hand an event and its usage
  delta to the group-commit writer and return once they are durably committed.
  A signing returns its signature only after this, and no signature at all if
  it fails (fail closed: ``AuditUnavailable``);
* ``commit_refusal(...)`` / ``commit_refusal_sync(...)`` for a refused request:
  the same, except that the refusals of unauthenticated callers beyond a share
  per source and interval are summed into one event per reason, written when the
  interval ends (signery.server.audit.refusals).

Group commit: one writer thread per process drains every event that queued up
while the previous transaction was committing and writes them in one
transaction (each signing's event and counters are in the same transaction, as
the design requires). One fsync then covers many signings, which is how
thousands of durably audited signatures per second fit on one SQLite file.

On PostgreSQL a transaction that writes events holds its transaction id before
it draws their ``seq`` numbers (the chain head's row lock gives it one; without
the chain it asks for one). The audit sinks rely on it to know when a missing
number can no longer commit (signery.server.audit.sinks).
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from signery.auditchain import GENESIS_HASH, link
from signery.errors import AuditUnavailable, SigneryError
from signery.server.access.context import RequestContext
from signery.server.audit.events import (
    AuditRecord,
    Counted,
    UsageDelta,
)
from signery.server.audit.models import (
    AuditChainHeadRow,
    AuditEventRow,
    UsageCounterRow,
    UsageDailyRow,
)
from signery.server.audit.refusals import RefusalAggregator
from signery.server.persistence.db import Database, new_id, sorted_by_key, table, upsert_statement
from signery.server.persistence.direct import Prepared
from signery.server.persistence.groupcommit import STOP, run_writer
from signery.server.runtime.clock import Clock

log = logging.getLogger("signery.audit")

_EVENTS = table(AuditEventRow)
_COUNTERS = table(UsageCounterRow)
_DAILY = table(UsageDailyRow)
_HEADS = table(AuditChainHeadRow)
# How often the summaries of anonymous refusals are looked at (they are written
# once their interval has ended).
REFUSAL_FLUSH_SECONDS = 1.0
DEFAULT_REFUSAL_SHARE = 100
DEFAULT_REFUSAL_INTERVAL = 60.0
# Long client-supplied strings are cut, not refused: the event must be written.
_MAX_TEXT = {"principal_name": 256, "user_agent": 256, "client_machine": 256, "client_tool": 256}


# The counter columns, each bound by the prepared upserts.
_COUNTED = tuple(c.value for c in Counted)


@dataclass(slots=True)
class _Pending:
    row: dict[str, Any]
    usage: UsageDelta | None
    error: BaseException | None = None  # set by the writer when the commit failed


@dataclass(slots=True)
class _Batch:
    """Events handed to the writer together, and how to tell their owner it is done."""

    items: list[_Pending]
    done: Callable[[], None]


class AuditRecorder:
    def __init__(
        self,
        *,
        db: Database,
        node_id: str,
        clock: Clock,
        batch_max: int = 512,
        hash_chain: bool = True,
        refusal_share: int = DEFAULT_REFUSAL_SHARE,
        refusal_interval: float = DEFAULT_REFUSAL_INTERVAL,
    ) -> None:
        self._db = db
        # Off only to measure what the chain costs (bench/sign_throughput.py).
        self.hash_chain = hash_chain
        # The group-commit path writes on its own raw connection
        # (signery.server.persistence.direct).
        self._direct = db.direct(autocommit=False)
        dialect = self._direct.dialect
        self._insert_events = Prepared.of(
            insert(_EVENTS).values(
                {c.name: bindparam(c.name) for c in _EVENTS.c if c.name != "seq"}
            ),
            dialect,
        )
        self._upsert_counters = Prepared.of(
            upsert_statement(
                dialect.name,
                _COUNTERS,
                key=("scope", "subject_id"),
                increment=_COUNTED,
                keep_if_null=("last_used_at",),
            ),
            dialect,
        )
        self._upsert_daily = Prepared.of(
            upsert_statement(
                dialect.name,
                _DAILY,
                key=("day", "scope", "subject_id"),
                increment=_COUNTED,
            ),
            dialect,
        )
        # The node's chain head, read under its row lock in the writing transaction.
        self._head_for_update = Prepared.of(_head_select(node_id), dialect)
        self._head_insert = Prepared.of(_head_insert(dialect.name, node_id), dialect)
        self._head_update = Prepared.of(_head_update(node_id), dialect)
        self._take_xid = Prepared.of(_TAKE_XID, dialect) if dialect.name == "postgresql" else None
        self.node_id = node_id
        self._clock = clock
        self._batch_max = batch_max
        self._queue: queue.SimpleQueue[_Batch | object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.batches_written = 0
        # Event-loop side of the group commit (touched only by the loop's thread).
        self._waiting: list[tuple[_Pending, asyncio.Future[str]]] = []
        self._in_flight = False
        self._flush_scheduled = False
        self.anonymous_refusals = RefusalAggregator(refusal_share, refusal_interval, now=clock.now)
        self._refusal_thread: threading.Thread | None = None
        self._refusal_stop = threading.Event()

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="signery-audit-writer", daemon=True
            )
            self._thread.start()
        if self._refusal_thread is None:
            self._refusal_stop.clear()
            self._refusal_thread = threading.Thread(
                target=self._write_refusal_summaries, name="signery-audit-refusals", daemon=True
            )
            self._refusal_thread.start()

    def stop(self) -> None:
        """Write the refusal summaries and everything queued, then stop the writer."""
        if self._refusal_thread is not None:
            self._refusal_stop.set()
            self._refusal_thread.join()
            self._refusal_thread = None
        self._write_summaries(self.anonymous_refusals.due(everything=True))
        if self._thread is not None:
            self._queue.put(STOP)
            self._thread.join()
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------ recording

    def record(self, session: Session, record: AuditRecord) -> str:
        """Add an event to the caller's transaction; it commits with the change it records."""
        row = self._row(record)
        try:
            if self.hash_chain:
                head = session.execute(_head_select(self.node_id)).first()
                if head is None:
                    dialect = session.get_bind().dialect.name
                    session.execute(_head_insert(dialect, self.node_id), {"at": row["time"]})
                    head = session.execute(_head_select(self.node_id)).one()
                seq, hash_ = link([row], head[0], head[1])
                session.execute(insert(_EVENTS), [row])
                session.execute(
                    _head_update(self.node_id), {"seq": seq, "hash": hash_, "at": row["time"]}
                )
            else:
                if session.get_bind().dialect.name == "postgresql":
                    session.execute(_TAKE_XID)
                session.execute(insert(_EVENTS), [row])
        except SQLAlchemyError as e:
            # Fail closed: the change this event records must not commit without it.
            raise AuditUnavailable() from e
        return str(row["id"])

    async def commit(self, record: AuditRecord, usage: UsageDelta | None = None) -> str:
        """Durably commit an event (and its usage delta); AuditUnavailable if impossible.

        Natural group commit: while one batch is being written, the events of
        every other request wait here, and go to the writer together as soon as
        it is free. Under load one fsync covers many signings; alone, an event
        is written at once, with no added delay."""
        if not self.running:
            return self.commit_sync(record, usage)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[str] = loop.create_future()
        self._waiting.append((_Pending(self._row(record), usage), future))
        self._schedule_flush(loop)
        return await future

    def commit_sync(self, record: AuditRecord, usage: UsageDelta | None = None) -> str:
        """The same, from a worker thread (or without a writer thread: written here)."""
        pending = _Pending(self._row(record), usage)
        if self.running:
            written = threading.Event()
            self._queue.put(_Batch([pending], written.set))
            written.wait()
        else:
            self._write_items([pending])
        if pending.error is not None:
            raise pending.error
        return str(pending.row["id"])

    @contextmanager
    def refusals(self) -> Iterator[list[AuditRecord]]:
        """Refusals decided inside a transaction, committed after it is rolled back.

        A service that refuses a change halfway through ``db.write()`` appends the
        refusal's event to the list and raises; the rollback must not take the
        event with it, so it is committed here on its own, and the error is marked
        as audited so that the HTTP edge does not record it a second time.
        """
        pending: list[AuditRecord] = []
        try:
            yield pending
        except SigneryError as e:
            for record in pending:
                self.commit_sync(record)
                e.audited = True
            raise

    async def commit_refusal(self, record: AuditRecord) -> str | None:
        """Commit a refused request's event, unless it is an unauthenticated caller's
        beyond its source's share for the interval: then it is counted in the
        summary written at the interval's end, and None is returned at once."""
        if RefusalAggregator.applies_to(record) and not self.anonymous_refusals.admit(record):
            return None
        return await self.commit(record)

    def commit_refusal_sync(self, record: AuditRecord) -> str | None:
        """The same, from a worker thread."""
        if RefusalAggregator.applies_to(record) and not self.anonymous_refusals.admit(record):
            return None
        return self.commit_sync(record)

    def _write_refusal_summaries(self) -> None:  # a thread of its own
        while not self._refusal_stop.wait(
            min(REFUSAL_FLUSH_SECONDS, self.anonymous_refusals.interval)
        ):
            self._write_summaries(self.anonymous_refusals.due())

    def _write_summaries(self, records: list[AuditRecord]) -> None:
        if not records:
            return
        items = [_Pending(self._row(r), None) for r in records]
        if self.running:
            written = threading.Event()
            self._queue.put(_Batch(items, written.set))
            written.wait()
        else:
            self._write_items(items)
        lost = sum(1 for p in items if p.error is not None)
        if lost:
            # The requests were answered long ago: nothing to fail closed. Say so.
            log.error(
                "summaries of refused requests could not be written",
                extra={"summaries": lost},
            )

    # ------------------------------------------------------------ event-loop side

    def _schedule_flush(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._waiting and not self._in_flight and not self._flush_scheduled:
            self._flush_scheduled = True
            # call_soon: after the callbacks already ready, so that every request
            # handled in this turn of the loop joins the same batch.
            loop.call_soon(self._flush, loop)

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        self._flush_scheduled = False
        if self._in_flight or not self._waiting:
            return
        taken, self._waiting = self._waiting, []
        self._in_flight = True

        def done() -> None:  # in the writer thread, once the batch is committed (or not)
            loop.call_soon_threadsafe(self._resolve, loop, taken)

        self._queue.put(_Batch([p for p, _ in taken], done))

    def _resolve(
        self, loop: asyncio.AbstractEventLoop, taken: list[tuple[_Pending, asyncio.Future[str]]]
    ) -> None:
        self._in_flight = False
        for pending, future in taken:
            if future.done():  # the request was cancelled meanwhile
                continue
            if pending.error is not None:
                future.set_exception(pending.error)
            else:
                future.set_result(str(pending.row["id"]))
        self._schedule_flush(loop)

    # ------------------------------------------------------------ writer thread

    def _run(self) -> None:
        run_writer(self._queue, self._write_batches, self._batch_max, lambda b: len(b.items))

    def _write_batches(self, batches: list[_Batch]) -> None:
        self._write_items([p for b in batches for p in b.items])
        for b in batches:
            b.done()

    def _write_items(self, items: Sequence[_Pending]) -> None:
        try:
            self._write(items)
        except Exception as e:
            if len(items) > 1:
                # Isolate the failure: one bad event must not fail its neighbours.
                for p in items:
                    self._write_items([p])
                return
            log.error(
                "audit event could not be committed; the request fails closed",
                extra={"event_kind": items[0].row["kind"], "error": type(e).__name__},
            )
            items[0].error = e if isinstance(e, AuditUnavailable) else AuditUnavailable()
            return
        self.batches_written += 1

    def _write(self, batch: Sequence[_Pending]) -> None:
        counters: dict[tuple[str, str], dict[str, Any]] = {}
        daily: dict[tuple[Any, str, str], dict[str, Any]] = {}
        for p in batch:
            if p.usage is None:
                continue
            at: datetime = p.row["time"]
            column = p.usage.outcome.value
            for scope, subject in (
                ("key", p.usage.key_id),
                ("key_version", p.usage.version_id),
                ("account", p.usage.account_id),
            ):
                if subject is None:
                    continue
                c = counters.setdefault(
                    (scope, subject),
                    {"scope": scope, "subject_id": subject, "last_used_at": None}
                    | dict.fromkeys(_COUNTED, 0),
                )
                d = daily.setdefault(
                    (at.date(), scope, subject),
                    {"day": at.date(), "scope": scope, "subject_id": subject}
                    | dict.fromkeys(_COUNTED, 0),
                )
                c[column] += 1
                d[column] += 1
                if p.usage.outcome is Counted.SUCCEEDED and (
                    c["last_used_at"] is None or at > c["last_used_at"]
                ):
                    c["last_used_at"] = at
        try:
            with self._direct.transaction() as cursor:
                if self.hash_chain:
                    self._link(cursor, [p.row for p in batch])
                elif self._take_xid is not None:
                    self._take_xid.fetchall(cursor, {})
                self._insert_events.executemany(cursor, [p.row for p in batch])
                self._upsert_counters.executemany(
                    cursor, sorted_by_key(list(counters.values()), ("scope", "subject_id"))
                )
                self._upsert_daily.executemany(
                    cursor, sorted_by_key(list(daily.values()), ("day", "scope", "subject_id"))
                )
        except SigneryError:
            raise
        except Exception as e:
            raise AuditUnavailable() from e

    def _link(self, cursor: Any, rows: list[dict[str, Any]]) -> None:
        """Chain a batch after the node's head and move the head, in the caller's
        transaction: the head row's lock (FOR UPDATE; the write lock on SQLite)
        keeps two writers of one node from forking its chain, and a rollback
        takes the head back with the events (no gap)."""
        head = self._head_for_update.fetchall(cursor, {})
        if not head:
            self._head_insert.execute(cursor, {"at": rows[-1]["time"]})
            head = self._head_for_update.fetchall(cursor, {})
        seq, hash_ = link(rows, head[0][0], head[0][1])
        self._head_update.execute(cursor, {"seq": seq, "hash": hash_, "at": rows[-1]["time"]})

    # ------------------------------------------------------------ encoding

    def _row(self, r: AuditRecord) -> dict[str, Any]:
        ctx = r.context or RequestContext()
        row: dict[str, Any] = {
            "id": new_id(),
            "time": self._clock.now(),
            "kind": r.kind.value,
            "outcome": r.outcome.value,
            "reason": r.reason,
            "tsg_id": r.tsg_id,
            "tsg_path": r.tsg_path,
            "principal_type": r.actor.type.value,
            "principal_id": r.actor.id,
            "principal_name": r.actor.name,
            "key_id": r.key_id,
            "key_version": r.key_version,
            "algorithm": r.algorithm,
            "digest": r.digest,
            "client_ip": ctx.client_ip,
            "user_agent": ctx.user_agent,
            "client_machine": ctx.machine,
            "client_tool": ctx.tool,
            "request_id": ctx.request_id,
            "node_id": self.node_id,
            # Secrets never reach here: callers pass identifiers, never tokens.
            "details": json.dumps(dict(r.details), sort_keys=True, default=str),
            # The hash chain, set where the event is written (``link``).
            "node_seq": None,
            "prev_hash": None,
            "hash": None,
        }
        for col, limit in _MAX_TEXT.items():
            if isinstance(row[col], str) and len(row[col]) > limit:
                row[col] = row[col][:limit]
        for col, value in row.items():
            # PostgreSQL text cannot hold NUL: a client string carrying one would
            # fail the insert and so, failing closed, refuse the request. The event
            # is written with U+FFFD in its place instead. (details is JSON, where
            # json.dumps already escaped it.)
            if isinstance(value, str) and "\x00" in value:
                row[col] = value.replace("\x00", "\ufffd")
        return row


# The transaction's id, assigned now if it has none yet (PostgreSQL 13+): taken
# before the insert draws seq numbers when no row lock (the chain head's) did.
_TAKE_XID = select(func.pg_current_xact_id())


def _head_select(node_id: str) -> Any:
    return select(_HEADS.c.seq, _HEADS.c.hash).where(_HEADS.c.node_id == node_id).with_for_update()


def _head_insert(dialect: str, node_id: str) -> Any:
    """The node's first head (seq 0, the genesis hash); nothing if a rival made it."""
    values = {"node_id": node_id, "seq": 0, "hash": GENESIS_HASH, "updated_at": bindparam("at")}
    if dialect == "postgresql":
        return postgresql.insert(_HEADS).values(values).on_conflict_do_nothing()
    return sqlite.insert(_HEADS).values(values).on_conflict_do_nothing()


def _head_update(node_id: str) -> Any:
    return (
        update(_HEADS)
        .where(_HEADS.c.node_id == node_id)
        .values(seq=bindparam("seq"), hash=bindparam("hash"), updated_at=bindparam("at"))
    )
