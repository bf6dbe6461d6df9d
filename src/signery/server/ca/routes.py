"""HTTP routes of the built-in CA. The CA certificates and the CRL are public (they
are meant to be fetched); revocation needs ``signery.ca.revoke``."""

from __future__ import annotations

from typing import Annotated

from cryptography.hazmat.primitives import serialization
from fastapi import APIRouter, Body
from fastapi.responses import PlainTextResponse, Response

from signery import protocol as p
from signery.protocol import API_PREFIX
from signery.server.http.deps import ContextDep, PrincipalDep, ServicesDep

router = APIRouter(prefix=f"{API_PREFIX}/ca", tags=["ca"])


@router.get("/chain", response_class=PlainTextResponse)
def ca_chain(services: ServicesDep) -> PlainTextResponse:
    """Issuing CA then root CA, PEM."""
    pem = "".join(
        c.public_bytes(serialization.Encoding.PEM).decode() for c in services.core.ca.chain()
    )
    return PlainTextResponse(pem, media_type="application/x-pem-file")


@router.get("/crl", response_class=Response)
def ca_crl(services: ServicesDep) -> Response:
    """The issuing CA's current CRL (DER, RFC 5280), made anew before nextUpdate."""
    return Response(services.core.ca.current_crl(), media_type="application/pkix-crl")


@router.get("/issuing.der", response_class=Response)
def issuing_certificate(services: ServicesDep) -> Response:
    """The issuing CA certificate (DER), as named by the AIA extension of leaf certificates."""
    der = services.core.ca.issuing_certificate().public_bytes(serialization.Encoding.DER)
    return Response(der, media_type="application/pkix-cert")


@router.post("/certificates/{serial}/revoke", response_model=p.CaCertificate)
def revoke_certificate(
    serial: str,
    principal: PrincipalDep,
    services: ServicesDep,
    ctx: ContextDep,
    body: Annotated[p.CaCertificateRevoke | None, Body()] = None,
) -> p.CaCertificate:
    """Revoke a certificate the built-in CA issued (over EST or for a signing key), by
    its hex serial; the CRL lists it at once. Needs signery.ca.revoke at the root TSG.
    The body is optional: reason ``unspecified`` by default."""
    return services.revocation.revoke(principal, serial, body or p.CaCertificateRevoke(), ctx)
