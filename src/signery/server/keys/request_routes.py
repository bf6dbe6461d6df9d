"""HTTP routes for certificates from external CA connectors (management plane)."""

from __future__ import annotations

import anyio.to_thread
from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from pydantic import ValidationError

from signery import protocol as p
from signery.errors import InvalidRequest, MalformedJson, UnsupportedMediaType
from signery.protocol import API_PREFIX
from signery.server.connectors.est_client import media_type
from signery.server.http.deps import ContextDep, PrincipalDep, ServicesDep

router = APIRouter(prefix=f"{API_PREFIX}/keys", tags=["keys"])
PEM = "application/x-pem-file"
# Media types a PEM chain may be sent as (RFC 8555 §9.1 names the chain type).
PEM_TYPES = frozenset({"application/x-pem-file", "application/pem-certificate-chain", "text/plain"})


@router.get("/{key}/csr", response_class=PlainTextResponse)
def csr(
    key: str, principal: PrincipalDep, services: ServicesDep, tsg_id: str | None = None
) -> PlainTextResponse:
    """The CSR of the key's pending certificate request (PEM, PKCS#10), signed by the
    key store: take it to the CA."""
    return PlainTextResponse(services.keys.csr_pem(principal, key, tsg_id), media_type=PEM)


@router.post(
    "/{key}/certificate",
    response_model=p.SigningKey,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": p.CertificateUpload.model_json_schema()},
                PEM: {"schema": {"type": "string"}},
                "application/pem-certificate-chain": {"schema": {"type": "string"}},
            },
        }
    },
)
async def upload_certificate(
    key: str,
    request: Request,
    principal: PrincipalDep,
    services: ServicesDep,
    ctx: ContextDep,
    tsg_id: str | None = None,
) -> p.SigningKey:
    """Install the chain the CA issued for the key's pending request: a PEM body, or
    JSON ``{"chain_pem": ...}``. It must certify the key, carry the codeSigning EKU
    and reach the connector's roots; anything else is refused and changes nothing."""
    body = await request.body()
    kind = media_type(request.headers.get("content-type"))
    if kind == "application/json":
        try:
            chain = p.CertificateUpload.model_validate_json(body).chain_pem
        except ValidationError as e:
            if any(err.get("type") == "json_invalid" for err in e.errors()):
                raise MalformedJson() from None
            raise InvalidRequest('the body must be {"chain_pem": "<PEM>"}') from None
    elif kind in PEM_TYPES:
        try:
            chain = body.decode("ascii")
        except UnicodeDecodeError:
            raise InvalidRequest("a PEM body is ASCII") from None
    else:
        raise UnsupportedMediaType(f"send {PEM} or application/json, not {kind or 'nothing'}")
    return await anyio.to_thread.run_sync(
        lambda: services.keys.upload_certificate(principal, key, chain, ctx, tsg_id)
    )


@router.post("/{key}/enroll", response_model=p.SigningKey)
def enroll(
    key: str,
    principal: PrincipalDep,
    services: ServicesDep,
    ctx: ContextDep,
    tsg_id: str | None = None,
) -> p.SigningKey:
    """Send the key's pending request to its EST connector again (after a failure, or
    once a CA that held it for approval has decided)."""
    return services.keys.enroll(principal, key, ctx, tsg_id)
