"""RFC 9457 problem details: the one place where errors become HTTP statuses.

Every refusal that no service has audited yet is audited here, so each refused
request leaves exactly one audit event.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect, HTTPConnection
from starlette.responses import Response

from signery.errors import (
    ErrorKind,
    HttpError,
    MalformedJson,
    MethodNotAllowed,
    NotFound,
    SigneryError,
    ValidationFailed,
)
from signery.protocol import API_PREFIX, PROBLEM_MEDIA_TYPE, Problem
from signery.server.http.edge import audit_refusal

if TYPE_CHECKING:
    from signery.server.container import Services

log = logging.getLogger("signery.http")

STATUS_BY_KIND: dict[ErrorKind, int] = {
    ErrorKind.INVALID_INPUT: 400,
    ErrorKind.UNAUTHENTICATED: 401,
    ErrorKind.FORBIDDEN: 403,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.CONFLICT: 409,
    ErrorKind.TOO_LARGE: 413,
    ErrorKind.UNSUPPORTED_MEDIA_TYPE: 415,
    ErrorKind.TOO_MANY_REQUESTS: 429,
    ErrorKind.UNAVAILABLE: 503,
    ErrorKind.INTERNAL: 500,
}
TOKEN_PATH = f"{API_PREFIX}/oauth/token"
EST_PREFIX = "/.well-known/est/"
EST_REALM = "Signery EST"
RETRY_AFTER_SECONDS = "1"
# Refusals of the router itself (no such path, wrong method), by HTTP status.
ROUTING_ERRORS: dict[int, type[SigneryError]] = {404: NotFound, 405: MethodNotAllowed}


def status_of(error: SigneryError) -> int:
    return STATUS_BY_KIND[error.kind]


def problem_response(error: SigneryError, *, request_id: str | None, path: str | None) -> Response:
    status = status_of(error)
    body: dict[str, Any] = Problem(
        title=error.title,
        status=status,
        detail=error.detail,
        code=error.code,
        instance=path,
        request_id=request_id,
    ).model_dump(exclude_none=True)
    body.update({k: v for k, v in error.extra.items() if k not in body})
    headers: dict[str, str] = {}
    if path == TOKEN_PATH:
        # RFC 6749 §5.2: OAuth clients look for "error".
        body["error"] = getattr(error, "oauth_error", None) or (
            "invalid_request" if status < 500 else "server_error"
        )
        headers["Cache-Control"] = "no-store"
    if status == 401:
        # RFC 6750 §3; EST clients authenticate with HTTP basic auth (RFC 7030 §3.2.3).
        headers["WWW-Authenticate"] = (
            f'Basic realm="{EST_REALM}"'
            if path and path.startswith(EST_PREFIX)
            else 'Bearer error="invalid_token"'
        )
    if status in (429, 503):
        # RFC 9110 §10.2.3 (503) and RFC 6585 §4 (429): when to try again.
        retry_after = error.extra.get("retry_after")
        headers["Retry-After"] = (
            str(int(retry_after))
            if isinstance(retry_after, int | float) and retry_after > 0
            else RETRY_AFTER_SECONDS
        )
    return Response(
        json.dumps(body), status_code=status, media_type=PROBLEM_MEDIA_TYPE, headers=headers
    )


def from_validation_error(exc: RequestValidationError) -> SigneryError:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return MalformedJson()
    # Field locations and messages only: the rejected input is never echoed back,
    # because it may be a password or a key.
    fields = [
        {
            "field": ".".join(str(x) for x in e.get("loc", ()) if x != "body"),
            "message": str(e.get("msg", "")),
        }
        for e in errors
    ]
    return ValidationFailed(
        "; ".join(f"{f['field'] or 'body'}: {f['message']}" for f in fields)[:1000], errors=fields
    )


async def error_response(
    services: Services, request: HTTPConnection, error: SigneryError
) -> Response:
    """The answer to a refused or failed request, after auditing it if no service did."""
    if not error.audited and status_of(error) < 500:
        await audit_refusal(services, request, error)
    elif status_of(error) >= 500:
        log.warning("request failed", extra={"code": error.code, "path": request.url.path})
    return problem_response(error, request_id=_request_id(request), path=request.url.path)


def install_problem_handlers(app: FastAPI) -> None:
    async def audit_and_respond(request: Request, error: SigneryError) -> Response:
        return await error_response(app.state.services, request, error)

    @app.exception_handler(SigneryError)
    async def _signery(request: Request, exc: SigneryError) -> Response:
        return await audit_and_respond(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        return await audit_and_respond(request, from_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        # Routing errors (no such endpoint, wrong method): not a refusal of an
        # operation, so not audited; still answered as problem+json.
        err = ROUTING_ERRORS.get(exc.status_code, HttpError)(str(exc.detail))
        body = Problem(
            title=str(exc.detail),
            status=exc.status_code,
            code=err.code,
            request_id=_request_id(request),
        ).model_dump(exclude_none=True)
        return Response(
            json.dumps(body), status_code=exc.status_code, media_type=PROBLEM_MEDIA_TYPE
        )

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, exc: ClientDisconnect) -> Response:
        # The client hung up while sending its body: nobody will read an answer,
        # and it is not a server error worth a traceback in the log.
        log.debug("client disconnected", extra={"path": request.url.path})
        return Response(status_code=400)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        return unexpected_error_response(request, exc)


def unexpected_error_response(request: HTTPConnection, exc: Exception) -> Response:
    log.error("unhandled error", exc_info=exc, extra={"path": request.url.path})
    return problem_response(SigneryError(), request_id=_request_id(request), path=request.url.path)


def _request_id(request: HTTPConnection) -> str | None:
    rid = request.scope.get("state", {}).get("request_id")
    return rid if isinstance(rid, str) else None
