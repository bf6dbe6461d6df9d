"""The edge's own helpers: the facts of a request that services record
(``RequestContext``, proxies honoured), and the audit event of a refusal that no
service recorded. They live here, not in the composition root, so that
installation code and the job runner never import a web framework."""

from __future__ import annotations

from starlette.requests import HTTPConnection

from signery.errors import SigneryError
from signery.server.access.authz import Principal
from signery.server.access.context import RequestContext
from signery.server.audit.events import ANONYMOUS, Actor, AuditRecord, EventKind, outcome_of
from signery.server.container import Services

MAX_USER_AGENT = 256


def request_context(services: Services, conn: HTTPConnection) -> RequestContext:
    """Who sent the request and from where, as the audit trail records it."""
    client_ip = conn.client.host if conn.client else None
    trusted = services.settings.trusted_proxies
    if client_ip is not None and client_ip in trusted:
        forwarded = conn.headers.get("x-forwarded-for")
        if forwarded:
            # The right-most address not added by a trusted proxy is the client.
            hops = [h.strip() for h in forwarded.split(",") if h.strip()]
            while hops and hops[-1] in trusted:
                hops.pop()
            if hops:
                client_ip = hops[-1][:64]
    rid = conn.scope.get("state", {}).get("request_id")
    ua = conn.headers.get("user-agent")
    return RequestContext(
        request_id=rid if isinstance(rid, str) else None,
        client_ip=client_ip,
        user_agent=ua[:MAX_USER_AGENT] if ua else None,
    )


async def audit_refusal(services: Services, conn: HTTPConnection, error: SigneryError) -> None:
    """Record a refused request that no service recorded (validation, 403, 404, 413...)."""
    principal = conn.scope.get("state", {}).get("principal")
    known = principal if isinstance(principal, Principal) else None
    # An unauthenticated caller's refusals beyond its share are summed.
    await services.recorder.commit_refusal(
        AuditRecord(
            EventKind.REQUEST_REFUSED,
            outcome_of(error),
            Actor.of(known) if known is not None else ANONYMOUS,
            reason=error.code,
            tsg_id=known.tsg_id if known is not None else None,
            tsg_path=known.tsg_path if known is not None else None,
            context=request_context(services, conn),
            details={"method": conn.scope.get("method"), "path": conn.url.path[:256]},
        )
    )
    error.audited = True
