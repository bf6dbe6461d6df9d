"""Refusals of unauthenticated requests, audited one by one up to a share per
source and interval, and summed beyond it.

Every refused request is an audit event, committed (fsync'ed) before the answer.
For a caller nobody could authenticate, that turns a flood of bad credentials
into a flood of durable rows (6,000 in 140 s from one client): the audit trail
becomes the cheapest thing to fill. So for *anonymous* refusals only:

* each source (client address; IPv6: its /64) has the first
  ``audit_anonymous_refusals`` refusals of an interval recorded one by one, as
  before (who, what, when, request id), committed before the answer;
* beyond that share, a refusal is counted in memory, and at the end of the
  interval one event per (kind, reason, outcome) records how many there were
  (``details.aggregated``), with the first and last time and the details of the
  first one (``details.example``). The answer does not wait for it.

A refusal of an authenticated caller (a valid token without the permission, an
account's assertion for a disabled client...) is always its own event: it is
attributable, and its caller can be disabled. The summaries are written by the
recorder when their interval ends and when the server stops; a process killed
outright loses the counts of its current interval (at most ``interval`` seconds
of refusals beyond the share), never an event recorded one by one. Every refusal,
summed or not, still shows in ``signery_http_requests_total``.

Per process: with N workers, a source can have N shares per interval. Memory is
bounded: at most ``max_sources`` sources are tracked (the least recently seen is
forgotten, its summaries written first) and the summaries of an interval are
keyed by source, kind, reason and outcome only.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from signery.protocol import PrincipalType
from signery.server.access.context import RequestContext

if TYPE_CHECKING:
    from signery.server.audit.events import AuditRecord

# Sources tracked at once per process; beyond this the least recently seen source
# is forgotten (its summaries written first), and gets a new share if it returns.
MAX_TRACKED_SOURCES = 65_536


@dataclass(slots=True)
class _Summary:
    first: AuditRecord
    first_at: datetime
    last_at: datetime
    count: int = 0


@dataclass(slots=True)
class _Window:
    started: float  # monotonic
    recorded: int = 0
    summaries: dict[tuple[str, str | None, str], _Summary] = field(default_factory=dict)


class RefusalAggregator:
    """Decides which anonymous refusals are recorded now, and sums the others."""

    def __init__(
        self,
        share: int,
        interval: float,
        *,
        now: Callable[[], datetime],
        max_sources: int = MAX_TRACKED_SOURCES,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.share = share
        self.interval = interval
        self._now = now
        self._max_sources = max_sources
        self._monotonic = monotonic
        self._windows: OrderedDict[str, _Window] = OrderedDict()
        self._ready: list[AuditRecord] = []  # summaries of forgotten sources
        self._lock = threading.Lock()

    @staticmethod
    def applies_to(record: AuditRecord) -> bool:
        return record.actor.type is PrincipalType.ANONYMOUS

    def admit(self, record: AuditRecord) -> bool:
        """True: record this refusal now. False: it was counted in its source's
        summary for the current interval."""
        source = (record.context or RequestContext()).source
        now = self._monotonic()
        with self._lock:
            window = self._windows.pop(source, None)
            if window is not None and now - window.started >= self.interval:
                self._ready.extend(self._summaries_of(source, window))
                window = None
            if window is None:
                window = _Window(started=now)
            self._windows[source] = window  # most recently seen last
            while len(self._windows) > self._max_sources:
                old_source, old = self._windows.popitem(last=False)
                self._ready.extend(self._summaries_of(old_source, old))
            if window.recorded < self.share:
                window.recorded += 1
                return True
            key = (record.kind.value, record.reason, record.outcome.value)
            at = self._now()
            summary = window.summaries.get(key)
            if summary is None:
                summary = window.summaries[key] = _Summary(record, at, at)
            summary.count += 1
            summary.last_at = at
            return False

    def due(self, *, everything: bool = False) -> list[AuditRecord]:
        """The summaries whose interval has ended (all of them when ``everything``:
        the server is stopping); each is handed out once."""
        now = self._monotonic()
        with self._lock:
            records, self._ready = self._ready, []
            for source in list(self._windows):
                window = self._windows[source]
                if everything or now - window.started >= self.interval:
                    records.extend(self._summaries_of(source, window))
                    del self._windows[source]
            return records

    def _summaries_of(self, source: str, window: _Window) -> list[AuditRecord]:
        return [self._summary_record(source, s) for s in window.summaries.values()]

    def _summary_record(self, source: str, summary: _Summary) -> AuditRecord:
        first = summary.first
        details: dict[str, Any] = {
            "aggregated": summary.count,
            "first_at": summary.first_at.isoformat(),
            "last_at": summary.last_at.isoformat(),
            "interval_seconds": self.interval,
            "example": dict(first.details),
        }
        context = first.context or RequestContext()
        return replace(
            first,
            # The source, not one of its addresses (an IPv6 source is a /64); no
            # request id: the event stands for many requests.
            context=RequestContext(client_ip=source, user_agent=context.user_agent),
            details=details,
        )
