"""The aggregator of anonymous refusals: a share per source and interval, then one
summing event per reason."""

from __future__ import annotations

from signery.protocol import AuditOutcome, PrincipalType
from signery.server.access.context import RequestContext
from signery.server.audit.events import ANONYMOUS, Actor, AuditRecord, EventKind
from signery.server.audit.refusals import RefusalAggregator
from tests.support import FakeClock

BAD_TOKEN = {"Authorization": "Bearer sgy_pat_0123456789abcdef_not-a-secret"}


def refusal(ip: str | None, reason: str = "invalid_token", actor: Actor = ANONYMOUS) -> AuditRecord:
    return AuditRecord(
        EventKind.AUTHENTICATION_FAILED,
        AuditOutcome.DENIED,
        actor,
        reason=reason,
        context=RequestContext(request_id="r", client_ip=ip, user_agent="curl/8"),
        details={"method": "GET", "path": "/api/v1/keys"},
    )


class Ticks:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_source_has_a_share_then_one_summary_per_reason() -> None:
    ticks = Ticks()
    aggregator = RefusalAggregator(2, 60.0, now=FakeClock().now, monotonic=ticks)
    admitted = [aggregator.admit(refusal("192.0.2.1")) for _ in range(5)]
    assert admitted == [True, True, False, False, False]
    assert aggregator.admit(refusal("192.0.2.1", reason="invalid_credentials")) is False
    assert aggregator.admit(refusal("192.0.2.2")) is True  # a share per source
    assert aggregator.due() == []  # the interval is not over
    ticks.now = 60.0
    summaries = {s.reason: s for s in aggregator.due()}
    assert set(summaries) == {"invalid_token", "invalid_credentials"}
    summary = summaries["invalid_token"]
    assert summary.kind is EventKind.AUTHENTICATION_FAILED
    assert summary.outcome is AuditOutcome.DENIED
    assert summary.actor == ANONYMOUS
    assert summary.details["aggregated"] == 3
    assert summary.details["example"] == {"method": "GET", "path": "/api/v1/keys"}
    assert summary.context is not None
    assert summary.context.client_ip == "192.0.2.1"
    assert summary.context.request_id is None  # it stands for many requests
    assert summaries["invalid_credentials"].details["aggregated"] == 1
    assert aggregator.due() == []  # handed out once
    # A new interval, a new share.
    assert aggregator.admit(refusal("192.0.2.1")) is True


def test_an_ipv6_source_is_its_64_and_the_summary_names_it() -> None:
    ticks = Ticks()
    aggregator = RefusalAggregator(1, 10.0, now=FakeClock().now, monotonic=ticks)
    assert aggregator.admit(refusal("2001:db8:1:2::1")) is True
    assert aggregator.admit(refusal("2001:db8:1:2:ffff::9")) is False
    (summary,) = aggregator.due(everything=True)  # the server stops: everything goes
    assert summary.context is not None
    assert summary.context.client_ip == "2001:db8:1:2::/64"


def test_a_forgotten_source_has_its_summary_written_first() -> None:
    ticks = Ticks()
    aggregator = RefusalAggregator(0, 60.0, now=FakeClock().now, max_sources=2, monotonic=ticks)
    for ip in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
        assert aggregator.admit(refusal(ip)) is False
    (forgotten,) = aggregator.due()  # before the interval ends: its source was dropped
    assert forgotten.context is not None
    assert forgotten.context.client_ip == "192.0.2.1"


def test_authenticated_refusals_are_not_aggregated() -> None:
    user = Actor(PrincipalType.USER, "u-1", "alice")
    assert RefusalAggregator.applies_to(refusal("192.0.2.1")) is True
    assert RefusalAggregator.applies_to(refusal("192.0.2.1", actor=user)) is False
