"""HTTP routes for signing keys (management plane)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import PlainTextResponse

from signery import protocol as p
from signery.protocol import API_PREFIX
from signery.server.http.deps import ContextDep, PrincipalDep, ServicesDep
from signery.server.keys.service import MAX_EXPIRING_WITHIN_DAYS

router = APIRouter(prefix=f"{API_PREFIX}/keys", tags=["keys"])
PEM = "application/x-pem-file"


@router.post("", status_code=201, response_model=p.SigningKey)
def create_key(
    body: p.KeyCreate, principal: PrincipalDep, services: ServicesDep, ctx: ContextDep
) -> p.SigningKey:
    return services.keys.create(principal, body, ctx)


@router.get("", response_model=list[p.SigningKey])
def list_keys(
    principal: PrincipalDep,
    services: ServicesDep,
    tsg_id: str | None = None,
    expiring_within_days: Annotated[int | None, Query(ge=0, le=MAX_EXPIRING_WITHIN_DAYS)] = None,
) -> list[p.SigningKey]:
    """Keys you can see; ``expiring_within_days`` keeps those whose current
    certificate ends within that many days (expired ones included)."""
    return services.keys.list_keys(principal, tsg_id, expiring_within_days)


@router.get("/{key}", response_model=p.SigningKey)
def get_key(
    key: str, principal: PrincipalDep, services: ServicesDep, tsg_id: str | None = None
) -> p.SigningKey:
    return services.keys.get(principal, key, tsg_id)


@router.get("/{key}/public-key", response_class=PlainTextResponse)
def public_key(
    key: str, principal: PrincipalDep, services: ServicesDep, tsg_id: str | None = None
) -> PlainTextResponse:
    return PlainTextResponse(services.keys.public_key_pem(principal, key, tsg_id), media_type=PEM)


@router.get("/{key}/chain", response_class=PlainTextResponse)
def chain(
    key: str, principal: PrincipalDep, services: ServicesDep, tsg_id: str | None = None
) -> PlainTextResponse:
    """The current certificate chain as PEM, leaf first and root last."""
    return PlainTextResponse(services.keys.chain_pem(principal, key, tsg_id), media_type=PEM)


@router.get("/{key}/certificates", response_model=list[p.CertificateRecord])
def certificates(
    key: str, principal: PrincipalDep, services: ServicesDep, tsg_id: str | None = None
) -> list[p.CertificateRecord]:
    """Every certificate of the key, newest first."""
    return services.keys.certificates(principal, key, tsg_id)


@router.post("/{key}/renew", response_model=p.SigningKey)
def renew(
    key: str,
    body: p.CertificateRenew,
    principal: PrincipalDep,
    services: ServicesDep,
    ctx: ContextDep,
    tsg_id: str | None = None,
) -> p.SigningKey:
    """A new certificate for the same key pair and subject."""
    return services.keys.renew(principal, key, body, ctx, tsg_id)


@router.post("/{key}/reissue", response_model=p.SigningKey)
def reissue(
    key: str,
    body: p.CertificateReissue,
    principal: PrincipalDep,
    services: ServicesDep,
    ctx: ContextDep,
    tsg_id: str | None = None,
) -> p.SigningKey:
    """A new certificate for the same key pair, with another subject."""
    return services.keys.reissue(principal, key, body, ctx, tsg_id)


@router.post("/{key}/revoke-certificate", response_model=p.CertificateRecord)
def revoke_certificate(
    key: str,
    body: p.CertificateRevoke,
    principal: PrincipalDep,
    services: ServicesDep,
    ctx: ContextDep,
    tsg_id: str | None = None,
) -> p.CertificateRecord:
    """Revoke a certificate (the current one by default); built-in CA certificates go
    on the CRL at once."""
    return services.keys.revoke_certificate(principal, key, body, ctx, tsg_id)


@router.post("/{key}/rotate", response_model=p.SigningKey)
def rotate(
    key: str,
    body: p.KeyRotate,
    principal: PrincipalDep,
    services: ServicesDep,
    ctx: ContextDep,
    tsg_id: str | None = None,
) -> p.SigningKey:
    """A new key version (and certificate) becomes current; the previous one is
    archived and stays listed for verification."""
    return services.lifecycle.rotate(principal, key, body, ctx, tsg_id)


@router.post("/{key}/cancel-rotation", response_model=p.SigningKey)
def cancel_rotation(
    key: str,
    principal: PrincipalDep,
    services: ServicesDep,
    ctx: ContextDep,
    tsg_id: str | None = None,
) -> p.SigningKey:
    """Abandon a rotation that waits for its certificate from an external CA; the
    pending version's key pair is destroyed and the current version signs on."""
    return services.lifecycle.cancel_rotation(principal, key, ctx, tsg_id)


@router.put("/{key}/rotation", response_model=p.SigningKey)
def rotation(
    key: str,
    body: p.KeyRotationSchedule,
    principal: PrincipalDep,
    services: ServicesDep,
    ctx: ContextDep,
    tsg_id: str | None = None,
) -> p.SigningKey:
    """Rotate the key every ``rotation_period_days`` (null: never)."""
    return services.lifecycle.set_rotation(principal, key, body, ctx, tsg_id)


@router.post("/{key}/disable", response_model=p.SigningKey)
def disable(
    key: str,
    principal: PrincipalDep,
    services: ServicesDep,
    ctx: ContextDep,
    tsg_id: str | None = None,
) -> p.SigningKey:
    """Refuse every signing with the key from the next request on (every replica)."""
    return services.lifecycle.disable(principal, key, ctx, tsg_id)


@router.post("/{key}/enable", response_model=p.SigningKey)
def enable(
    key: str,
    principal: PrincipalDep,
    services: ServicesDep,
    ctx: ContextDep,
    tsg_id: str | None = None,
) -> p.SigningKey:
    return services.lifecycle.enable(principal, key, ctx, tsg_id)


@router.post("/{key}/destroy", response_model=p.SigningKey)
def destroy(
    key: str,
    body: p.KeyDestroy,
    principal: PrincipalDep,
    services: ServicesDep,
    ctx: ContextDep,
    tsg_id: str | None = None,
) -> p.SigningKey:
    """Disable the key now and destroy its key material after 7 to 30 days."""
    return services.lifecycle.schedule_destruction(principal, key, body, ctx, tsg_id)


@router.post("/{key}/cancel-destroy", response_model=p.SigningKey)
def cancel_destroy(
    key: str,
    principal: PrincipalDep,
    services: ServicesDep,
    ctx: ContextDep,
    tsg_id: str | None = None,
) -> p.SigningKey:
    """Cancel a scheduled destruction; the key gets its previous status back."""
    return services.lifecycle.cancel_destruction(principal, key, ctx, tsg_id)


keystores_router = APIRouter(prefix=f"{API_PREFIX}/keystores", tags=["keys"])


@keystores_router.get("", response_model=list[p.KeyStoreInfo])
def list_keystores(principal: PrincipalDep, services: ServicesDep) -> list[p.KeyStoreInfo]:
    """The key stores this server is configured with, with their health."""
    return services.keys.keystores(principal)
