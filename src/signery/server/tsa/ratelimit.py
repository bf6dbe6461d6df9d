"""The TSA's per-client rate limit: a token bucket per client, in process memory."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from signery.errors import (
    ConfigurationError,
)
from signery.server.access.context import source_of

# Rate-limit buckets kept per process; beyond this the least recently seen
# client is forgotten (it gets a full bucket again: the limit fails open for it,
# never closed for anybody else).
MAX_TRACKED_CLIENTS = 65_536
# A client over its rate has one refusal audited per this many seconds; the event
# counts the refusals in between (all of them show in signery_http_requests_total).
REFUSAL_AUDIT_INTERVAL = 60.0


@dataclass(frozen=True, slots=True)
class RateRefusal:
    """A request the rate limit refused."""

    retry_after: float  # seconds until the client has a token again
    audit: bool  # the first refusal of this client in its audit interval
    unaudited: int  # refusals of this client since its last audited one, not audited


@dataclass(slots=True)
class _Bucket:
    tokens: float
    last: float
    audited_at: float | None = None
    unaudited: int = 0


class ClientRateLimiter:
    """A token bucket per client, in this process's memory.

    Per process and per replica: with N workers or replicas behind a balancer a
    client may get up to N times the configured rate. That bounds abuse of an
    unauthenticated endpoint without a shared store on the hot path. A client is
    its IP address (as ``Services.context`` computes it, trusted proxies honoured),
    an IPv6 client its /64.

    Refusals are audited once per client per ``audit_interval`` seconds, the event
    carrying how many refusals were not audited since the previous one: a flood of
    refused requests must not become a flood of audit rows (which would turn the
    rate limit into a way to fill the database)."""

    def __init__(
        self,
        per_minute: int,
        *,
        max_clients: int = MAX_TRACKED_CLIENTS,
        audit_interval: float = REFUSAL_AUDIT_INTERVAL,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if per_minute < 1:
            raise ConfigurationError("the TSA rate limit must be at least 1 per minute")
        self.capacity = float(per_minute)  # a burst of up to one minute's worth
        self.per_second = per_minute / 60.0
        self._max_clients = max_clients
        self._audit_interval = audit_interval
        self._monotonic = monotonic
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._lock = threading.Lock()

    # A client is a source (signery.server.access.context.source_of): an IPv6 client is its /64.
    client_key = staticmethod(source_of)

    def take(self, client_ip: str | None) -> RateRefusal | None:
        """Spend one token: None when admitted, else the refusal."""
        key = self.client_key(client_ip)
        now = self._monotonic()
        with self._lock:
            bucket = self._buckets.pop(key, None) or _Bucket(self.capacity, now)
            bucket.tokens = min(
                self.capacity, bucket.tokens + (now - bucket.last) * self.per_second
            )
            bucket.last = now
            self._buckets[key] = bucket  # most recently seen last
            while len(self._buckets) > self._max_clients:
                self._buckets.popitem(last=False)
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return None
            retry_after = (1.0 - bucket.tokens) / self.per_second
            if bucket.audited_at is None or now - bucket.audited_at >= self._audit_interval:
                unaudited, bucket.unaudited, bucket.audited_at = bucket.unaudited, 0, now
                return RateRefusal(retry_after, audit=True, unaudited=unaudited)
            bucket.unaudited += 1
            return RateRefusal(retry_after, audit=False, unaudited=bucket.unaudited)
