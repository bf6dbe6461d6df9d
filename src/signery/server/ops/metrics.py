"""Prometheus metrics of one server process (served at /metrics)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from signery.protocol import AuditOutcome

CONTENT_TYPE = CONTENT_TYPE_LATEST
_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class Metrics:
    """Counters and histograms, in a registry of their own (one per app)."""

    def __init__(self) -> None:
        # Labelled children are looked up once and kept: .labels() costs ~10 µs.
        self._request_children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self._signing_children: dict[
            tuple[str | None, str | None, AuditOutcome], tuple[Counter, Histogram]
        ] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "signery_http_requests",
            "HTTP requests by route template and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.request_latency = Histogram(
            "signery_http_request_duration_seconds",
            "HTTP request latency by route template",
            ["method", "route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.signings = Counter(
            "signery_signings",
            "Signing attempts by key and outcome",
            ["key_id", "key_name", "outcome"],
            registry=self.registry,
        )
        self.signing_latency = Histogram(
            "signery_signing_duration_seconds",
            "Time to sign, verify and durably audit one signing",
            ["outcome"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        children = self._request_children.get(key)
        if children is None:
            children = (
                self.requests.labels(method, route, str(status)),
                self.request_latency.labels(method, route),
            )
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def signing(
        self, key_id: str | None, key_name: str | None, outcome: AuditOutcome, started: float
    ) -> None:
        key = (key_id, key_name, outcome)
        children = self._signing_children.get(key)
        if children is None:
            children = (
                self.signings.labels(key_id or "unknown", key_name or "unknown", outcome.value),
                self.signing_latency.labels(outcome.value),
            )
            self._signing_children[key] = children
        children[0].inc()
        children[1].observe(time.perf_counter() - started)

    def render(self) -> bytes:
        return generate_latest(self.registry)
