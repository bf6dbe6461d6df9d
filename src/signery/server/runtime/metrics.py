"""Prometheus metrics (served at /metrics, to a scrape token or an installation auditor).

Labels are bounded and name no tenant: HTTP requests by method (known methods
only), route template and status; signings by outcome. What each key or account
did is in the usage API, authorized per TSG; /metrics is one view of the whole
installation, so it carries nothing that one tenant may not see of another.

Several workers (``signery serve --workers N``): the supervisor gives them a
private directory in ``PROMETHEUS_MULTIPROC_DIR`` before they start, each worker
counts into its own files there (prometheus_client's multiprocess mode), and any
worker's scrape adds up every worker's files, dead workers' included, so a
counter never goes back when a worker is replaced.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector

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
# The method label takes these values and "other": a client chooses the method,
# and every new label value is a new series (and, with several workers, file space).
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# A scrape token shorter than this is refused at start: it would be guessable.
MIN_SCRAPE_TOKEN_CHARS = 32


class Metrics:
    """Counters and histograms, in a registry of their own (one per app)."""

    def __init__(self, multiprocess_dir: Path | None = None) -> None:
        self._multiprocess_dir = multiprocess_dir
        # Labelled children are looked up once and kept: .labels() costs ~10 µs.
        self._request_children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self._signing_children: dict[AuditOutcome, tuple[Counter, Histogram]] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "signery_http_requests",
            "HTTP requests by method, route template and status",
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
            "Signing attempts by outcome",
            ["outcome"],
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
        if method not in KNOWN_METHODS:
            method = "other"
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

    def signing(self, outcome: AuditOutcome, started: float) -> None:
        children = self._signing_children.get(outcome)
        if children is None:
            children = (
                self.signings.labels(outcome.value),
                self.signing_latency.labels(outcome.value),
            )
            self._signing_children[outcome] = children
        children[0].inc()
        children[1].observe(time.perf_counter() - started)

    def render(self) -> bytes:
        if self._multiprocess_dir is None:
            return generate_latest(self.registry)
        # Every worker's files, read at each scrape.
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self._multiprocess_dir))  # type: ignore[no-untyped-call]
        return generate_latest(registry)


class ScrapeToken:
    """The bearer token Prometheus scrapes /metrics with (``metrics_token`` or
    ``metrics_token_file``), kept only as its SHA-256."""

    def __init__(self, token: str | None) -> None:
        self._digest = hashlib.sha256(token.encode()).digest() if token else None

    @property
    def configured(self) -> bool:
        return self._digest is not None

    def matches(self, header: str | None) -> bool:
        """True when ``header`` is ``Bearer <the scrape token>``."""
        if self._digest is None or not header:
            return False
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        # Digests of equal length compared in constant time: no timing oracle on the token.
        presented = hashlib.sha256(value.strip().encode("utf-8", "surrogatepass")).digest()
        return hmac.compare_digest(presented, self._digest)
