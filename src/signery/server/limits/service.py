"""Limits on what unauthenticated callers can cost.

A password sign-in runs argon2id at 64 MiB, and anyone can send one: without
limits, 300 concurrent attempts for an unknown user took a server to 3 requests/s
and 1.86 GB. Two kinds of limit apply, both before any expensive work:

* **Failure limits, shared by every worker and replica.** Failed password sign-ins
  are counted per username and per source (client address; IPv6: its /64), refused
  token requests per source, each in a fixed window, in ``rate_limit_counters``::

      INSERT INTO rate_limit_counters (scope, subject, window_start, expires_at, count)
      VALUES (:scope, :subject, :window_start, :expires_at, 1)
      ON CONFLICT (scope, subject, window_start) DO UPDATE SET count = count + 1
      WHERE count < :limit RETURNING count

  No row back means the window is full: the request is refused with 429
  ``too_many_failed_attempts`` and ``Retry-After`` the end of the window, before
  any password is verified. A sign-in *reserves* its failure slots before its
  password is verified (both limits in one transaction, all or none) and gives
  them back when the password was right: concurrent guesses cannot overrun a limit
  while they are being verified, and a correct password never counts. The token
  endpoint reads its counter before an exchange and adds a failure after a refusal
  (verifying an assertion costs about what a reservation would), so a burst may
  overrun that limit by the requests already in flight. Successful exchanges are
  never counted: a CI fleet fetching tokens from one address is not throttled.
  Nothing is counted in process memory.

* **Password verifications at once, per process.** At most
  ``auth_password_checks_max`` verifications run at once in a process (64 MiB
  each), and a sign-in waits at most ``auth_password_check_wait_seconds`` for a
  slot, then gets 429 ``password_checks_busy``. It waits on the event loop, not in
  a worker thread, so waiting sign-ins never hold the threads other requests need.

Counting failures per username lets anyone hold a user's password sign-ins off for
a window by guessing wrong on purpose; API tokens keep working, and the window is
short. That is the price of making online guessing slow (docs/security.md).
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import threading
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import anyio
import anyio.to_thread
from sqlalchemy import bindparam, delete, select, update
from sqlalchemy.dialects import postgresql, sqlite

from signery.errors import PasswordChecksBusy, TooManyFailedAttempts
from signery.server.access.context import RequestContext
from signery.server.config import Settings
from signery.server.limits.models import RateLimitCounterRow
from signery.server.persistence.db import Database, table, upsert_statement
from signery.server.runtime.clock import Clock

_C = table(RateLimitCounterRow)
# Rows of ended windows are deleted at most this often (by whichever request
# comes), so the table holds about one window's worth of subjects.
PRUNE_INTERVAL_SECONDS = 60.0
# A sign-in that found every verification slot taken may try again this soon:
# a verification takes well under a second.
BUSY_RETRY_AFTER_SECONDS = 1


class LimitScope(StrEnum):
    """What a counter counts (the ``scope`` column)."""

    PASSWORD_USER = "password_user"  # failed sign-ins for a username
    PASSWORD_SOURCE = "password_source"  # failed sign-ins from a source
    TOKEN_SOURCE = "token_source"  # refused token requests from a source


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    password_failures_per_user: int
    password_failures_per_source: int
    password_window_seconds: int
    password_checks_max: int
    password_check_wait_seconds: float
    token_failures_per_source: int
    token_window_seconds: int

    @classmethod
    def of(cls, settings: Settings) -> LimitsConfig:
        return cls(
            password_failures_per_user=settings.auth_password_failures_per_user,
            password_failures_per_source=settings.auth_password_failures_per_source,
            password_window_seconds=settings.auth_password_window_seconds,
            password_checks_max=settings.auth_password_checks_max,
            password_check_wait_seconds=settings.auth_password_check_wait_seconds,
            token_failures_per_source=settings.auth_token_failures_per_source,
            token_window_seconds=settings.auth_token_window_seconds,
        )


def username_subject(username: str) -> str:
    """A username as a counter's subject: its SHA-256. Usernames here are whatever a
    caller sent (any length, any character, most of them not users at all)."""
    return hashlib.sha256(username.encode("utf-8", "surrogatepass")).hexdigest()


def source_subject(source: str) -> str:
    """A source (``RequestContext.source``) as a counter's subject: the address or
    /64 itself, readable by an operator; anything else (``unknown``, a name a test
    client gives) as its SHA-256, like a username."""
    try:
        ipaddress.ip_network(source)
    except ValueError:
        return hashlib.sha256(source.encode("utf-8", "surrogatepass")).hexdigest()
    return source


@dataclass(frozen=True, slots=True)
class Bucket:
    """One limit applied to one subject, in the fixed window that holds a moment."""

    scope: LimitScope
    subject: str
    limit: int
    window_start: datetime
    expires_at: datetime

    @classmethod
    def at(
        cls, scope: LimitScope, subject: str, limit: int, window_seconds: int, now: datetime
    ) -> Bucket:
        epoch = math.floor(now.timestamp())
        start = datetime.fromtimestamp(epoch - epoch % window_seconds, UTC)
        return cls(scope, subject, limit, start, start + timedelta(seconds=window_seconds))

    def params(self) -> dict[str, Any]:
        return {
            "scope": self.scope.value,
            "subject": self.subject,
            "window_start": self.window_start,
            "expires_at": self.expires_at,
            "limit": self.limit,
        }

    def refusal(self, now: datetime) -> TooManyFailedAttempts:
        retry_after = max(1, math.ceil((self.expires_at - now).total_seconds()))
        what = {
            LimitScope.PASSWORD_USER: "failed sign-ins for this username",
            LimitScope.PASSWORD_SOURCE: "failed sign-ins from this address",
            LimitScope.TOKEN_SOURCE: "refused token requests from this address",
        }[self.scope]
        return TooManyFailedAttempts(
            f"too many {what}; try again in {retry_after} s", retry_after=retry_after
        )


def _reserve_statement(dialect: str) -> Any:
    """Count one more, unless the window is full (then no row is returned)."""
    ins: Any = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(_C)
    ins = ins.values(
        scope=bindparam("scope"),
        subject=bindparam("subject"),
        window_start=bindparam("window_start"),
        expires_at=bindparam("expires_at"),
        count=1,
    )
    return ins.on_conflict_do_update(
        index_elements=["scope", "subject", "window_start"],
        set_={"count": _C.c.count + 1},
        where=_C.c.count < bindparam("limit"),
    ).returning(_C.c.count)


def _key(bucket: Bucket) -> Any:
    return (
        (_C.c.scope == bucket.scope.value)
        & (_C.c.subject == bucket.subject)
        & (_C.c.window_start == bucket.window_start)
    )


class FailureCounters:
    """The counters in the database: take, give back, read."""

    def __init__(self, db: Database, clock: Clock) -> None:
        self._db = db
        self._clock = clock
        self._reserve = _reserve_statement(db.dialect)
        self._add = upsert_statement(
            db.dialect,
            _C,
            key=("scope", "subject", "window_start"),
            increment=("count",),
            replace=("expires_at",),
        )
        self._last_prune = 0.0
        self._prune_lock = threading.Lock()

    def reserve(self, buckets: Sequence[Bucket]) -> None:
        """One slot in every bucket, in one transaction, or none: raises
        TooManyFailedAttempts for the first full one (the transaction rolls back,
        giving back the slots it took)."""
        now = self._clock.now()
        with self._db.write() as s:
            # One lock order for every transaction of every replica (no deadlock).
            for bucket in sorted(buckets, key=lambda b: (b.scope.value, b.subject)):
                # RETURNING, not the row count: SQLAlchemy reports no row count for
                # an INSERT on PostgreSQL. No row back: the window is full.
                counted = s.connection().execute(self._reserve, bucket.params()).first()
                if counted is None:
                    raise bucket.refusal(now)
        self._maybe_prune()

    def release(self, buckets: Sequence[Bucket]) -> None:
        """Give back the slots ``reserve`` took (the attempt did not fail)."""
        with self._db.write() as s:
            for bucket in sorted(buckets, key=lambda b: (b.scope.value, b.subject)):
                s.execute(
                    update(_C).where(_key(bucket), _C.c.count > 0).values(count=_C.c.count - 1)
                )

    def check(self, bucket: Bucket) -> None:
        """Raise TooManyFailedAttempts when the bucket's window is full (a read)."""
        with self._db.read() as s:
            count = s.scalar(select(_C.c.count).where(_key(bucket)))
        if count is not None and count >= bucket.limit:
            raise bucket.refusal(self._clock.now())

    def add(self, bucket: Bucket) -> None:
        """Count one more, full or not."""
        params = bucket.params()
        del params["limit"]
        with self._db.write() as s:
            s.execute(self._add, params | {"count": 1})
        self._maybe_prune()

    def _maybe_prune(self) -> None:
        now = time.monotonic()
        with self._prune_lock:
            if now - self._last_prune < PRUNE_INTERVAL_SECONDS:
                return
            self._last_prune = now
        with self._db.write() as s:
            s.execute(delete(_C).where(_C.c.expires_at < self._clock.now()))


class PasswordGate:
    """At most ``slots`` password verifications at once in this process."""

    def __init__(self, slots: int, wait_seconds: float) -> None:
        self._semaphore = anyio.Semaphore(slots)
        self._wait = wait_seconds

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold a slot, waiting at most the configured time (PasswordChecksBusy)."""
        try:
            self._semaphore.acquire_nowait()
        except anyio.WouldBlock:
            acquired = False
            with anyio.move_on_after(self._wait):
                await self._semaphore.acquire()
                acquired = True
            if not acquired:
                raise PasswordChecksBusy(
                    "the server is verifying as many passwords as it may at once",
                    retry_after=BUSY_RETRY_AFTER_SECONDS,
                ) from None
        try:
            yield
        finally:
            self._semaphore.release()


class SignInAttempt:
    """One password sign-in in progress; ``failed()`` keeps its failure slots."""

    def __init__(self) -> None:
        self.has_failed = False

    def failed(self) -> None:
        self.has_failed = True


class AuthLimits:
    """The limits of the password sign-ins and of the token endpoint."""

    def __init__(self, *, counters: FailureCounters, config: LimitsConfig, clock: Clock) -> None:
        self._counters = counters
        self._config = config
        self._clock = clock
        self._gate = PasswordGate(config.password_checks_max, config.password_check_wait_seconds)

    @asynccontextmanager
    async def sign_in(self, username: str, ctx: RequestContext) -> AsyncIterator[SignInAttempt]:
        """Around one password verification: its failure slots (per source and per
        username) are reserved first, then a verification slot is waited for. The
        failure slots are given back unless the attempt was marked failed."""
        config = self._config
        now = self._clock.now()
        buckets = (
            Bucket.at(
                LimitScope.PASSWORD_SOURCE,
                source_subject(ctx.source),
                config.password_failures_per_source,
                config.password_window_seconds,
                now,
            ),
            Bucket.at(
                LimitScope.PASSWORD_USER,
                username_subject(username),
                config.password_failures_per_user,
                config.password_window_seconds,
                now,
            ),
        )
        # Shielded: slots taken by a request cancelled meanwhile are given back below.
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._counters.reserve, buckets)
        attempt = SignInAttempt()
        try:
            async with self._gate.slot():
                yield attempt
        finally:
            if not attempt.has_failed:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(self._counters.release, buckets)

    def _token_bucket(self, ctx: RequestContext) -> Bucket:
        return Bucket.at(
            LimitScope.TOKEN_SOURCE,
            source_subject(ctx.source),
            self._config.token_failures_per_source,
            self._config.token_window_seconds,
            self._clock.now(),
        )

    def check_token_request(self, ctx: RequestContext) -> None:
        """Refuse a token request from a source whose refusals fill the window."""
        self._counters.check(self._token_bucket(ctx))

    def token_request_refused(self, ctx: RequestContext) -> None:
        self._counters.add(self._token_bucket(ctx))
