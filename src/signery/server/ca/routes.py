"""HTTP routes of the built-in CA (public: CA certificates are meant to be fetched)."""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization
from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from signery.protocol import API_PREFIX
from signery.server.deps import ServicesDep

router = APIRouter(prefix=f"{API_PREFIX}/ca", tags=["ca"])


@router.get("/chain", response_class=PlainTextResponse)
def ca_chain(services: ServicesDep) -> PlainTextResponse:
    """Issuing CA then root CA, PEM."""
    pem = "".join(
        c.public_bytes(serialization.Encoding.PEM).decode() for c in services.core.ca.chain()
    )
    return PlainTextResponse(pem, media_type="application/x-pem-file")
