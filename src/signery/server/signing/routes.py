"""HTTP routes of the signing plane (built-in accounts with access tokens)."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect

from signery import protocol as p
from signery.errors import SigneryError
from signery.protocol import API_PREFIX
from signery.server.container import Services
from signery.server.http.deps import (
    ClaimsDep,
    ContextDep,
    ServicesDep,
    services_of,
    signing_claims,
)
from signery.server.http.edge import request_context
from signery.server.http.middleware import Receive, Scope, Send
from signery.server.http.problems import error_response, unexpected_error_response

router = APIRouter(prefix=f"{API_PREFIX}/signing", tags=["signing"])
SIGN_PATH = re.compile(rf"^{re.escape(API_PREFIX)}/signing/keys/([^/]+)/sign$")


@router.get("/keys", response_model=list[p.SigningKeySummary])
async def usable_keys(
    claims: ClaimsDep,
    services: ServicesDep,
    ctx: ContextDep,
    everything: Annotated[
        bool,
        Query(
            alias="all",
            description="Also the keys this account cannot sign with now, each with "
            "unusable_reason (their public keys still verify earlier signatures)",
        ),
    ] = False,
) -> list[p.SigningKeySummary]:
    """Keys this account can sign with now, with their public keys and certificate
    chains (``?all=true``: every key of its subtree, the others marked unusable)."""
    return await services.signing.usable_keys(claims, ctx, everything=everything)


async def sign_response(services: Services, key: str, request: Request) -> Response:
    """Authenticate, read the body, sign: the whole route, shared by both dispatchers."""
    claims = await signing_claims(services, request)
    body = await request.body()
    result = await services.signing.sign(claims, key, body, request_context(services, request))
    if isinstance(result, p.SigningPending):
        # RFC 9110 §15.3.3: accepted, not done; Location names what to poll.
        return Response(
            result.model_dump_json(),
            status_code=202,
            media_type="application/json",
            headers={"Location": f"{API_PREFIX}/signing/requests/{result.request_id}"},
        )
    return Response(result.model_dump_json(), media_type="application/json")


@router.post(
    "/keys/{key}/sign",
    response_model=p.SignResponse,
    responses={
        202: {
            "model": p.SigningPending,
            "description": "The key requires approval and the account has no valid grant: "
            "a signing request waits for approvers (Location: the request to poll)",
        }
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": p.SignRequest.model_json_schema()}},
        }
    },
)
async def sign(key: str, request: Request) -> Response:
    """Sign a digest. The body is parsed by the signing service, so that every
    malformed request is refused with its own code and audited as this account."""
    return await sign_response(services_of(request), key, request)


@router.get("/requests/{request_id}", response_model=p.SigningPending)
async def signing_request(
    request_id: str, claims: ClaimsDep, services: ServicesDep
) -> p.SigningPending:
    """The state of a signing request made for this account (after a 202): poll it,
    and sign again once it is approved."""
    return await services.signing.signing_request(claims, request_id)


class SignDispatcher:
    """The sign route as plain ASGI, for EdgeMiddleware to call directly.

    Signing is the hot path: going through the framework's router, dependency
    solver and exception middlewares costs about as much CPU as the signing
    itself. The route above stays the documented one (OpenAPI) and both run
    :func:`sign_response`; errors become the same problem documents.
    """

    path = f"{API_PREFIX}/signing/keys/{{key}}/sign"  # the metrics' route label

    def __init__(self, services: Services) -> None:
        self._services = services

    def match(self, scope: Scope) -> str | None:
        if scope.get("method") != "POST":
            return None
        # The ASGI server has percent-decoded the path already (as for the
        # framework's routes): decoding it again would turn %2500 into a NUL.
        m = SIGN_PATH.match(scope.get("path", ""))
        return m.group(1) if m else None

    async def __call__(self, key: str, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        try:
            response = await sign_response(self._services, key, request)
        except SigneryError as e:
            response = await error_response(self._services, request, e)
        except ClientDisconnect:
            return  # the client is gone; nothing was returned to anyone
        except Exception as e:
            response = unexpected_error_response(request, e)
        await response(scope, receive, send)
