"""HTTP routes of the time-stamping authority (RFC 3161 §3.4, "Time-Stamp Protocol via HTTP").

Unauthenticated by default, like public TSAs, and rate limited per client;
``tsa_access = "authenticated"`` asks for an API token or an account's access
token (the requester is then named in the audit events), ``"disabled"`` turns the
endpoints off (404 ``tsa_disabled``). Answers:

* 200 ``application/timestamp-reply``: a TimeStampResp, granted or a rejection
  with its failInfo (RFC 3161 §2.4.2). A refused *query* is still an RFC 3161
  answer, so that clients (``openssl ts``, rfc3161-client, signtool) report the
  reason the TSA gave; a 4xx would leave them only an HTTP status.
* a problem document (RFC 9457) when no RFC 3161 answer fits: 415 for a body
  that is not sent as a timestamp query, 413 when it is too large, 429 (with
  Retry-After) when the client is over its rate, 5xx when nothing could be
  issued (the key store or the audit trail is unavailable: fail closed).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from signery.errors import TsaDisabled
from signery.protocol import API_PREFIX
from signery.rfc3161 import QUERY_MEDIA_TYPE, REPLY_MEDIA_TYPE
from signery.server.audit.events import ANONYMOUS, Actor
from signery.server.config import TsaAccess
from signery.server.container import Services
from signery.server.http.deps import current_principal, services_of
from signery.server.http.edge import request_context

router = APIRouter(prefix=f"{API_PREFIX}/tsa", tags=["tsa"])
PEM_CHAIN_MEDIA_TYPE = "application/pem-certificate-chain"  # RFC 8555 §9.1


@router.post(
    "",
    response_class=Response,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {QUERY_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
        }
    },
    responses={
        200: {
            "description": "A DER TimeStampResp: granted, or a rejection with its failInfo",
            "content": {REPLY_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
        },
        415: {"description": "The body was not sent as application/timestamp-query"},
        429: {"description": "Over the per-client rate; see Retry-After"},
    },
)
async def timestamp(request: Request) -> Response:
    """Timestamp a message imprint (RFC 3161). The body is a DER TimeStampReq."""
    services = _enabled(request)
    actor = ANONYMOUS
    if services.tsa.config.access is TsaAccess.AUTHENTICATED:
        principal = await current_principal(request)  # a failure is audited and 401
        actor = Actor(principal.type, principal.id, principal.name)
    ctx = request_context(services, request)
    await services.tsa.admit(ctx, actor)
    body = await request.body()
    reply = await services.tsa.timestamp(request.headers.get("content-type"), body, ctx, actor)
    # Each reply is unique (serial, time): nothing for a cache to keep.
    return Response(reply, media_type=REPLY_MEDIA_TYPE, headers={"Cache-Control": "no-store"})


@router.get("/certificate", response_class=Response)
async def certificate_chain(request: Request) -> Response:
    """The TSA certificate, then the issuing CA, then the root CA (PEM), for verifiers."""
    pem = await _enabled(request).tsa.chain_pem()
    return Response(pem, media_type=PEM_CHAIN_MEDIA_TYPE)


def _enabled(request: Request) -> Services:
    services = services_of(request)
    if services.tsa.config.access is TsaAccess.DISABLED:
        raise TsaDisabled("set tsa_access to public or authenticated to enable it")
    return services
