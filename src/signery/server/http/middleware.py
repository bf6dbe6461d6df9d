"""The HTTP edge, as one pure-ASGI middleware (no per-request task switching):

* a request id for every request (``X-Request-ID`` kept when well-formed),
  returned in the response and attached to every log line and audit event;
* no control character in the path or the query string once percent-decoded
  (400 ``control_characters``): no name, id or parameter can hold one, and a NUL
  would otherwise reach the database, which PostgreSQL refuses with an error;
* request bodies bounded before any route reads them (413 otherwise);
* both refusals audited through ``on_refused``;
* one structured access-log line and Prometheus metrics per request.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Protocol
from urllib.parse import unquote

from starlette.responses import Response

from signery.errors import ControlCharacters, RequestTooLarge, SigneryError
from signery.protocol import has_control_characters
from signery.server.runtime.logging import request_id_var
from signery.server.runtime.metrics import Metrics

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

access_log = logging.getLogger("signery.access")


class FastRoute(Protocol):
    """A route served by the middleware itself, before the framework (see SignDispatcher)."""

    path: str

    def match(self, scope: Scope) -> str | None: ...

    async def __call__(self, key: str, scope: Scope, receive: Receive, send: Send) -> None: ...


REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


class EdgeMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: Metrics,
        max_body: int,
        limits_by_prefix: dict[str, int],
        on_refused: Callable[[Scope, SigneryError], Awaitable[Response]],
        access_log_enabled: bool = True,
        fast_route: FastRoute | None = None,
    ) -> None:
        self.fast_route = fast_route
        self.app = app
        self.metrics = metrics
        self.max_body = max_body
        self.limits = sorted(limits_by_prefix.items(), key=lambda kv: -len(kv[0]))
        self.on_refused = on_refused
        self.access_log_enabled = access_log_enabled

    def _limit(self, path: str) -> int:
        for prefix, limit in self.limits:
            if path.startswith(prefix):
                return limit
        return self.max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = scope.get("headers") or []
        request_id = None
        content_length: str | None = None
        for name, value in headers:
            if name == b"x-request-id":
                candidate = value.decode("latin-1")
                if REQUEST_ID_RE.match(candidate):
                    request_id = candidate
            elif name == b"content-length":
                content_length = value.decode("latin-1")
        request_id = request_id or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        token = request_id_var.set(request_id)
        status_holder = [500]

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder[0] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            limit = self._limit(scope.get("path", ""))
            too_large = False
            if content_length is not None:
                try:
                    too_large = int(content_length) > limit
                except ValueError:
                    too_large = True
            unreadable = _control_characters_in(scope)
            if unreadable is not None:
                await self._answer(scope, receive, send_wrapper, ControlCharacters(unreadable))
            elif too_large:
                await self._refuse(scope, receive, send_wrapper, limit)
            elif content_length is None and scope.get("method") in ("POST", "PUT", "PATCH"):
                # Chunked body: read it here (bounded) so no route sees more than the limit.
                body, over = await _read_bounded(receive, limit)
                if over:
                    await self._refuse(scope, receive, send_wrapper, limit)
                else:
                    await self.app(scope, _replay(body, receive), send_wrapper)
            else:
                fast_key = self.fast_route.match(scope) if self.fast_route else None
                if fast_key is not None and self.fast_route is not None:
                    scope["route"] = self.fast_route
                    await self.fast_route(fast_key, scope, _counting(receive, limit), send_wrapper)
                else:
                    await self.app(scope, _counting(receive, limit), send_wrapper)
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            route_path = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.request(method, route_path, status_holder[0], elapsed)
            if self.access_log_enabled:
                client = scope.get("client")
                access_log.info(
                    "request",
                    extra={
                        "method": method,
                        "path": scope.get("path", ""),  # no query string: it is not needed in logs
                        "route": route_path,
                        "status": status_holder[0],
                        "duration_ms": round(elapsed * 1000, 3),
                        "client_ip": client[0] if client else None,
                    },
                )
            request_id_var.reset(token)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        error = RequestTooLarge(f"request bodies here are limited to {limit} bytes")
        await self._answer(scope, receive, send, error)

    async def _answer(
        self, scope: Scope, receive: Receive, send: Send, error: SigneryError
    ) -> None:
        response = await self.on_refused(scope, error)
        await response(scope, receive, send)


def _control_characters_in(scope: Scope) -> str | None:
    """What holds a control character once percent-decoded (the path, the query
    string), or None. The ASGI server has decoded the path already; the query
    string is decoded as the framework will decode it (UTF-8, invalid bytes
    replaced), all of it at once: a character hidden in a name or a value is found
    either way."""
    if has_control_characters(scope.get("path", "")):
        return "the path holds a control character"
    query = scope.get("query_string", b"")
    if query and has_control_characters(unquote(query.decode("latin-1"))):
        return "the query string holds a control character"
    return None


async def _read_bounded(receive: Receive, limit: int) -> tuple[bytes, bool]:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"".join(chunks), False
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return b"", True
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks), False


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _counting(receive: Receive, limit: int) -> Receive:
    """Guard against a body longer than its Content-Length claimed."""
    size = 0

    async def counting() -> Message:
        nonlocal size
        message = await receive()
        if message["type"] == "http.request":
            size += len(message.get("body", b""))
            if size > limit:
                raise RequestTooLarge(f"request bodies here are limited to {limit} bytes")
        return message

    return counting
