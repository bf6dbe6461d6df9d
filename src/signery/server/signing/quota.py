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

The writes run on a few threads of their own, never on the event loop: on
SQLite a commit may wait for the audit writer's lock, and on PostgreSQL it is
a network round trip.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, update
from sqlalchemy.dialects import postgresql, sqlite

from signery.errors import DailyLimitReached, UsageLimitReached
from signery.server.authz import SigningRules
from signery.server.db import Database, table
from signery.server.direct import Prepared
from signery.server.keys.models import KeyUsageQuotaRow
from signery.server.keys.policy import TOTAL, local_day, next_local_midnight

_Q = table(KeyUsageQuotaRow)
QUOTA_THREADS = 4


def _reserve_statement(dialect: str) -> Any:
    ins: Any = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(_Q)
    ins = ins.values(key_id=bindparam("key_id"), period=bindparam("period"), used=1)
    return ins.on_conflict_do_update(
        index_elements=["key_id", "period"],
        set_={"used": _Q.c.used + 1},
        where=_Q.c.used < bindparam("max_used"),
    )


class UsageQuotas:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._direct = db.direct(autocommit=False)
        dialect = self._direct.dialect
        self._reserve = Prepared.of(_reserve_statement(dialect.name), dialect)
        self._executor = ThreadPoolExecutor(QUOTA_THREADS, thread_name_prefix="signery-quota")

    async def reserve(self, key_id: str, rules: SigningRules, now: datetime) -> Callable[[], None]:
        """Take one slot of every limited period of the key, or raise
        UsageLimitReached / DailyLimitReached; returns the step that gives the
        slots back (for ``_Attempt.undo``)."""
        periods: list[tuple[str, int]] = []
        if rules.max_total is not None:
            periods.append((TOTAL, rules.max_total))
        if rules.max_per_day is not None:
            periods.append((local_day(rules.zone, now), rules.max_per_day))
        loop = asyncio.get_running_loop()
        full = await loop.run_in_executor(self._executor, self._take, key_id, periods)
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
        taken = [period for period, _ in periods]
        return lambda: self.release(key_id, taken)

    def _take(self, key_id: str, periods: list[tuple[str, int]]) -> str | None:
        """One transaction: every period gets a slot, or none does. Returns the
        first full period, or None."""
        # Rolled back by raising through transaction(): nothing of this attempt stays.
        try:
            with self._direct.transaction() as cur:
                for period, limit in periods:
                    self._reserve.execute(
                        cur, {"key_id": key_id, "period": period, "max_used": limit}
                    )
                    if cur.rowcount != 1:
                        raise _PeriodFull(period)
        except _PeriodFull as full:
            return full.period
        return None

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
        self._executor.shutdown(wait=False, cancel_futures=True)


class _PeriodFull(Exception):
    def __init__(self, period: str) -> None:
        super().__init__(period)
        self.period = period
