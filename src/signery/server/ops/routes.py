"""Liveness, readiness, metrics and discovery."""

from __future__ import annotations

import anyio.to_thread
from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from signery import __version__
from signery import protocol as p
from signery.server.accounts.tokens import ASSERTION_ALGORITHMS
from signery.server.http.deps import MetricsReaderDep, ServicesDep
from signery.server.runtime.metrics import CONTENT_TYPE

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=p.Health)
async def healthz() -> p.Health:
    """The process is alive (no dependency is checked)."""
    return p.Health(status="ok")


@router.get("/readyz", response_model=p.Health)
async def readyz(services: ServicesDep) -> JSONResponse:
    """Ready to serve: database reachable, built-in key store and audit writer up
    (503 otherwise). An external key store or an audit sink that is down is reported
    ("degraded", still 200): the node serves every other key, and taking it out of
    the load balancer would not bring it back."""

    def check() -> dict[str, str]:
        checks = {"database": "ok" if services.db.ping() else "unreachable"}
        for name, health in services.core.keystores.health().items():
            checks[f"keystore:{name}"] = "ok" if health.ok else f"down: {health.detail}"
        checks["audit_writer"] = "ok" if services.recorder.running else "stopped"
        # A sink that is down degrades (events wait in the audit table); never unready.
        for forwarder in services.sinks:
            checks[f"audit_sink:{forwarder.sink}"] = forwarder.health()
        return checks

    checks = await anyio.to_thread.run_sync(check)
    essential = ("database", "keystore:builtin", "audit_writer")
    ready = all(checks[name] == "ok" for name in essential)
    degraded = ready and any(v != "ok" for v in checks.values())
    status = "unavailable" if not ready else "degraded" if degraded else "ok"
    body = p.Health(status=status, checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get("/metrics")
async def metrics(services: ServicesDep, _: MetricsReaderDep) -> Response:
    """Prometheus metrics of every worker of this server (scrape token or root auditor)."""
    # With several workers this reads every worker's files: not on the event loop.
    body = await anyio.to_thread.run_sync(services.metrics.render)
    return Response(body, media_type=CONTENT_TYPE)


def server_metadata(services: ServicesDep) -> p.ServerMetadata:
    base = (services.settings.public_url or "").rstrip("/")
    return p.ServerMetadata(
        issuer=services.issuer,
        token_endpoint=f"{base}{p.API_PREFIX}/oauth/token",
        grant_types_supported=[p.JWT_BEARER_GRANT],
        token_endpoint_auth_signing_alg_values_supported=list(ASSERTION_ALGORITHMS),
        version=__version__,
    )


@router.get("/.well-known/oauth-authorization-server", response_model=p.ServerMetadata)
def oauth_metadata(services: ServicesDep) -> p.ServerMetadata:
    """RFC 8414 metadata: the issuer identifier clients must put in ``aud``."""
    return server_metadata(services)


@router.get(f"{p.API_PREFIX}/meta", response_model=p.ServerMetadata)
def meta(services: ServicesDep) -> p.ServerMetadata:
    return server_metadata(services)
