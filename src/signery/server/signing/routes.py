"""HTTP routes of the signing plane (built-in accounts with access tokens)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from signery import protocol as p
from signery.protocol import API_PREFIX
from signery.server.deps import ClaimsDep, ServicesDep, access_claims, services_of

router = APIRouter(prefix=f"{API_PREFIX}/signing", tags=["signing"])


@router.get("/keys", response_model=list[p.SigningKeySummary])
async def usable_keys(claims: ClaimsDep, services: ServicesDep) -> list[p.SigningKeySummary]:
    """Keys this account may sign with, with their public keys and certificate chains."""
    return await services.signing.usable_keys(claims)


@router.post(
    "/keys/{key}/sign",
    response_model=p.SignResponse,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": p.SignRequest.model_json_schema()}},
        }
    },
)
async def sign(key: str, request: Request) -> Response:
    """Sign a digest. The body is parsed by the signing service, so that every
    malformed request is refused with its own code and audited as this account.

    (The hot path: no dependency injection here; each dependency costs microseconds.)"""
    claims = await access_claims(request)
    services = services_of(request)
    body = await request.body()
    result = await services.signing.sign(claims, key, body, services.context(request))
    return Response(result.model_dump_json(), media_type="application/json")
