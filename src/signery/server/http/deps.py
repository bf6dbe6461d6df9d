"""FastAPI dependencies: services, request context and authenticated principals.

Authentication failures are audited here (one event each) before the 401.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from starlette.requests import HTTPConnection

from signery.errors import AuthenticationFailed, PermissionDenied
from signery.protocol import AuditOutcome
from signery.server.access.authz import Denied, Permission, Principal
from signery.server.access.claims import AccessClaims
from signery.server.access.context import RequestContext
from signery.server.audit.events import ANONYMOUS, AuditRecord, EventKind
from signery.server.container import Services
from signery.server.http.edge import request_context

# Dependencies are ``async def`` even when they do not await: FastAPI runs a plain
# ``def`` dependency in a worker thread, a thread hop per dependency per request.


async def get_services(request: Request) -> Services:
    return services_of(request)


async def get_context(request: Request) -> RequestContext:
    return request_context(services_of(request), request)


def services_of(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


async def _audit_auth_failure(
    services: Services, request: HTTPConnection, error: AuthenticationFailed
) -> None:
    # Nobody is authenticated: one event per refusal up to the source's share, the
    # rest summed (AuditRecorder.commit_refusal).
    await services.recorder.commit_refusal(
        AuditRecord(
            EventKind.AUTHENTICATION_FAILED,
            AuditOutcome.DENIED,
            ANONYMOUS,
            reason=error.code,
            context=request_context(services, request),
            details={"method": request.scope.get("method"), "path": request.url.path[:256]},
        )
    )
    error.audited = True


async def _principal(request: Request, *, allow_password: bool) -> Principal:
    services = services_of(request)
    header = request.headers.get("authorization")
    try:
        principal = await services.authn.principal_async(
            header, request_context(services, request), allow_password=allow_password
        )
    except AuthenticationFailed as e:
        await _audit_auth_failure(services, request, e)
        raise
    request.scope.setdefault("state", {})["principal"] = principal
    return principal


async def current_principal(request: Request) -> Principal:
    return await _principal(request, allow_password=False)


async def principal_or_password(request: Request) -> Principal:
    return await _principal(request, allow_password=True)


async def metrics_reader(request: Request) -> None:
    """/metrics: the scrape token, or a principal holding metrics read at the root
    TSG (an installation auditor or superuser). Anything else is refused: 401 with
    no credential or a wrong one, 403 for a principal without that permission."""
    services = services_of(request)
    if services.scrape_token.matches(request.headers.get("authorization")):
        return
    principal = await current_principal(request)
    decision = services.core.authz.decide_installation(principal, Permission.METRICS_READ)
    if isinstance(decision, Denied):
        raise PermissionDenied(
            "/metrics answers to the scrape token or to metrics read access at the root TSG"
        )


async def access_claims(request: Request) -> AccessClaims:
    """Signing plane: a verified access token (no database work here)."""
    return await signing_claims(services_of(request), request)


async def signing_claims(services: Services, conn: HTTPConnection) -> AccessClaims:
    try:
        return services.authn.access_claims(conn.headers.get("authorization"))
    except AuthenticationFailed as e:
        await _audit_auth_failure(services, conn, e)
        raise


ServicesDep = Annotated[Services, Depends(get_services)]
ContextDep = Annotated[RequestContext, Depends(get_context)]
PrincipalDep = Annotated[Principal, Depends(current_principal)]
PasswordPrincipalDep = Annotated[Principal, Depends(principal_or_password)]
ClaimsDep = Annotated[AccessClaims, Depends(access_claims)]
MetricsReaderDep = Annotated[None, Depends(metrics_reader)]
