"""RFC 7030 EST endpoints of the built-in CA under ``/.well-known/est``.

The optional path segment after ``est`` is the CA label of §3.2.2; Signery
reads it as the TSG the certificate is for: its subject policy applies, and the
event is recorded there. Enrollment itself is authorized at the root TSG.
"""

from __future__ import annotations

import re

import anyio.to_thread
from fastapi import APIRouter, Depends, Request, Response

from signery.errors import HttpsRequired, TsgNotFound, UnsupportedMediaType
from signery.server.connectors.est_client import CERTS_ONLY, PKCS10, WELL_KNOWN, media_type
from signery.server.http.deps import ContextDep, PasswordPrincipalDep, ServicesDep

router = APIRouter(prefix=WELL_KNOWN, tags=["est"])
LABEL_RE = re.compile(r"^[0-9]{10}$")
# RFC 7030 §4.1.3 / §4.2.3 (and RFC 8951 §3.2): base64 bodies, said so in a header.
_HEADERS = {"Content-Transfer-Encoding": "base64"}


def _certs_only(body: bytes) -> Response:
    return Response(body, media_type=CERTS_ONLY, headers=_HEADERS)


def _label(label: str | None) -> str | None:
    if label is not None and not LABEL_RE.match(label):
        raise TsgNotFound("the EST label is a TSG id (10 digits)")
    return label


@router.get("/cacerts", response_class=Response)
def cacerts(services: ServicesDep) -> Response:
    """The CA certificates (issuing and root), base64 PKCS#7 certs-only; public."""
    return _certs_only(services.est.cacerts())


@router.get("/{label}/cacerts", response_class=Response)
def labelled_cacerts(label: str, services: ServicesDep) -> Response:
    _label(label)
    return _certs_only(services.est.cacerts())


async def _https_only(request: Request, services: ServicesDep) -> None:
    # RFC 7030 §3.3: EST over HTTPS only (here, or at a TLS-terminating proxy that
    # is one of trusted_proxies). Checked before the credentials are looked at.
    client = request.client.host if request.client else None
    if request.url.scheme != "https" and client not in services.settings.trusted_proxies:
        raise HttpsRequired("EST enrollment needs HTTPS (RFC 7030 §3.3)")


HTTPS_ONLY = [Depends(_https_only)]


async def _enroll(
    request: Request,
    services: ServicesDep,
    principal: PasswordPrincipalDep,
    ctx: ContextDep,
    label: str | None,
    *,
    reenroll: bool,
) -> Response:
    tsg_label = _label(label)
    kind = media_type(request.headers.get("content-type"))
    if kind != PKCS10:
        raise UnsupportedMediaType(f"send the CSR as {PKCS10} (base64), not {kind or 'nothing'}")
    body = await request.body()
    issued = await anyio.to_thread.run_sync(
        lambda: services.est.enroll(principal, body, tsg_label, reenroll=reenroll, ctx=ctx)
    )
    return _certs_only(issued)


_ENROLL_DOC = (
    "Issue a code-signing certificate for a PKCS#10 request (application/pkcs10, base64). "
    "HTTP basic auth (a user's username and password) or a user's API token; the user needs "
    "signery.ca.enroll at the root TSG (a superuser there), and the subject must satisfy the "
    "subject policies of the label's TSG (the root TSG without a label). Answer: base64 "
    "PKCS#7 certs-only with the issued certificate."
)


@router.post(
    "/simpleenroll", response_class=Response, description=_ENROLL_DOC, dependencies=HTTPS_ONLY
)
async def simpleenroll(
    request: Request, services: ServicesDep, principal: PasswordPrincipalDep, ctx: ContextDep
) -> Response:
    return await _enroll(request, services, principal, ctx, None, reenroll=False)


@router.post(
    "/{label}/simpleenroll",
    response_class=Response,
    description=_ENROLL_DOC,
    dependencies=HTTPS_ONLY,
)
async def labelled_simpleenroll(
    label: str,
    request: Request,
    services: ServicesDep,
    principal: PasswordPrincipalDep,
    ctx: ContextDep,
) -> Response:
    return await _enroll(request, services, principal, ctx, label, reenroll=False)


@router.post(
    "/simplereenroll", response_class=Response, description=_ENROLL_DOC, dependencies=HTTPS_ONLY
)
async def simplereenroll(
    request: Request, services: ServicesDep, principal: PasswordPrincipalDep, ctx: ContextDep
) -> Response:
    return await _enroll(request, services, principal, ctx, None, reenroll=True)


@router.post(
    "/{label}/simplereenroll",
    response_class=Response,
    description=_ENROLL_DOC,
    dependencies=HTTPS_ONLY,
)
async def labelled_simplereenroll(
    label: str,
    request: Request,
    services: ServicesDep,
    principal: PasswordPrincipalDep,
    ctx: ContextDep,
) -> Response:
    return await _enroll(request, services, principal, ctx, label, reenroll=True)
