"""Usage limits of keys (``max_signatures_total``, ``max_signatures_per_day``),
enforced by the database.

A signing reserves its slot before the key store signs, with one conditional
upsert per limited period::

    INSERT INTO key_usage_quotas (key_id, period, used) VALUES (:key_id, :period, 1)
    ON CONFLICT (key_id, period) DO UPDATE SET used = used + 1 WHERE used < :max_used

A row count of 0 means the period is full. Both periods are reserved in one
transaction, so a full day does not take a slot of the total. The database
serializes the updates of one row (SQLite: one writer; PostgreSQL: the row
lock of ON CONFLICT DO UPDATE), so a limit holds across threads, processes and
replicas; nothing is counted in process memory. When no signature leaves after
all (the store failed, the audit commit failed), the slot is given back.

Group commit: the reservations run on one writer thread per process, which
takes every reservation that queued up while its previous transaction was
committing and makes them all in one transaction (each still one conditional
statement per period, with its own row count). One commit (one fsync on SQLite)
then covers many signings, as the audit recorder does for events; alone, a
reservation is written at once. Never on the event loop: on SQLite a commit may
wait for the audit writer's lock, and on PostgreSQL it is a network round trip.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, update
from sqlalchemy.dialects import postgresql, sqlite

from signery.errors import DailyLimitReached, UsageLimitReached
from signery.server.access.authz import SigningRules
from signery.server.keys.models import KeyUsageQuotaRow
from signery.server.keys.policy import TOTAL, local_day, next_local_midnight
from signery.server.persistence.db import Database, table
from signery.server.persistence.direct import Prepared
from signery.server.persistence.groupcommit import STOP, run_writer

_Q = table(KeyUsageQuotaRow)
# Reservations made in one transaction at most (the rest wait for the next one).
BATCH_MAX = 512
STOP_TIMEOUT_SECONDS = 10.0
log = logging.getLogger("signery.signing")


def _reserve_statement(dialect: str) -> Any:
    ins: Any = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(_Q)
    ins = ins.values(key_id=bindparam("key_id"), period=bindparam("period"), used=1)
    return ins.on_conflict_do_update(
        index_elements=["key_id", "period"],
        set_={"used": _Q.c.used + 1},
        where=_Q.c.used < bindparam("max_used"),
    )


@dataclass(slots=True)
class _Reservation:
    key_id: str
    periods: list[tuple[str, int]]
    # Called on the writer thread with the first full period (None: every period
    # got its slot) or the error that failed the whole batch.
    done: Callable[[str | None, BaseException | None], None]


class UsageQuotas:
    def __init__(self, db: Database, *, batch_max: int = BATCH_MAX) -> None:
        self._db = db
        self._direct = db.direct(autocommit=False)
        dialect = self._direct.dialect
        self._reserve = Prepared.of(_reserve_statement(dialect.name), dialect)
        self._give_back = Prepared.of(
            update(_Q)
            .where(
                _Q.c.key_id == bindparam("key_id"),
                _Q.c.period == bindparam("period"),
                _Q.c.used > 0,
            )
            .values(used=_Q.c.used - 1),
            dialect,
        )
        self._batch_max = batch_max
        self._queue: queue.SimpleQueue[_Reservation | object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.batches_written = 0

    async def reserve(self, key_id: str, rules: SigningRules, now: datetime) -> Callable[[], None]:
        """Take one slot of every limited period of the key, or raise
        UsageLimitReached / DailyLimitReached; returns the step that gives the
        slots back (for ``_Attempt.undo``)."""
        periods: list[tuple[str, int]] = []
        if rules.max_total is not None:
            periods.append((TOTAL, rules.max_total))
        if rules.max_per_day is not None:
            periods.append((local_day(rules.zone, now), rules.max_per_day))
        taken = [period for period, _ in periods]
        loop = asyncio.get_running_loop()
        future: asyncio.Future[str | None] = loop.create_future()

        def settle(full: str | None, error: BaseException | None) -> None:  # on the loop
            if future.cancelled():
                # The request went away while its reservation was being written:
                # nobody will sign with the slots it got, so they go back.
                if error is None and full is None:
                    loop.run_in_executor(None, self.release, key_id, taken)
            elif error is not None:
                future.set_exception(error)
            else:
                future.set_result(full)

        def done(full: str | None, error: BaseException | None) -> None:  # writer thread
            loop.call_soon_threadsafe(settle, full, error)

        self._start()
        self._queue.put(_Reservation(key_id, periods, done))
        full = await future
        if full == TOTAL:
            raise UsageLimitReached(
                f"the key's limit of {rules.max_total} signatures in total is reached"
            )
        if full is not None:
            seconds = (next_local_midnight(rules.zone, now) - now).total_seconds()
            raise DailyLimitReached(
                f"the key's limit of {rules.max_per_day} signatures on {full} is reached",
                retry_after=max(1, math.ceil(seconds)),
            )
        return lambda: self.release(key_id, taken)

    # ------------------------------------------------------------ writer thread

    def _start(self) -> None:
        if self._thread is None:
            with self._start_lock:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name="signery-quota-writer", daemon=True
                    )
                    self._thread.start()

    def _run(self) -> None:
        run_writer(self._queue, self._write, self._batch_max)

    def _write(self, batch: list[_Reservation]) -> None:
        """One transaction for the batch. Each reservation gets a slot of every
        period or of none: when a later period is full, the slots it took in this
        transaction are given back in it."""
        # One lock order (by key) for every transaction of every replica, so two
        # batches on PostgreSQL never wait for each other's rows in a cycle.
        batch.sort(key=lambda r: r.key_id)
        results: list[str | None] = []
        try:
            with self._direct.transaction() as cur:
                for r in batch:
                    full: str | None = None
                    taken: list[str] = []
                    for period, limit in r.periods:
                        self._reserve.execute(
                            cur, {"key_id": r.key_id, "period": period, "max_used": limit}
                        )
                        if cur.rowcount != 1:
                            full = period
                            break
                        taken.append(period)
                    if full is not None:
                        for period in taken:
                            self._give_back.execute(cur, {"key_id": r.key_id, "period": period})
                    results.append(full)
        except Exception as e:
            # Nothing of the batch was committed: every signing in it is refused
            # (fail closed), none holds a slot.
            log.error("usage-limit reservations could not be committed: %s", type(e).__name__)
            for r in batch:
                r.done(None, e)
            return
        self.batches_written += 1
        for r, full in zip(batch, results, strict=True):
            r.done(full, None)

    def release(self, key_id: str, periods: list[str]) -> None:
        """Give the slots back (any thread; a rare path, on the pooled engine)."""
        with self._db.write() as s:
            s.execute(
                update(KeyUsageQuotaRow)
                .where(
                    KeyUsageQuotaRow.key_id == key_id,
                    KeyUsageQuotaRow.period.in_(periods),
                    KeyUsageQuotaRow.used > 0,
                )
                .values(used=KeyUsageQuotaRow.used - 1)
            )

    def close(self) -> None:
        """Write what is queued, then stop the writer thread."""
        if self._thread is not None:
            self._queue.put(STOP)
            self._thread.join(timeout=STOP_TIMEOUT_SECONDS)
            self._thread = None
