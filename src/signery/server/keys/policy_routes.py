"""HTTP routes for a signing key's policy (management plane)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from signery import protocol as p
from signery.protocol import API_PREFIX
from signery.server.http.deps import ContextDep, PrincipalDep, ServicesDep

router = APIRouter(prefix=f"{API_PREFIX}/keys", tags=["keys"])


@router.get("/{key}/policy", response_model=p.KeyPolicy | None)
def get_policy(
    key: str, principal: PrincipalDep, services: ServicesDep, tsg_id: str | None = None
) -> p.KeyPolicy | None:
    """The key's signing policy, with names; null when it has none."""
    return services.policies.get(principal, key, tsg_id)


@router.put("/{key}/policy", response_model=p.KeyPolicy | None)
def set_policy(
    key: str,
    body: p.KeyPolicy,
    principal: PrincipalDep,
    services: ServicesDep,
    ctx: ContextDep,
    tsg_id: str | None = None,
) -> p.KeyPolicy | None:
    """Replace the key's whole signing policy (names are resolved now)."""
    return services.policies.set(principal, key, body, ctx, tsg_id)


@router.delete("/{key}/policy", status_code=204)
def clear_policy(
    key: str,
    principal: PrincipalDep,
    services: ServicesDep,
    ctx: ContextDep,
    tsg_id: str | None = None,
) -> Response:
    """Remove the key's signing policy: only the TSG boundary remains."""
    services.policies.clear(principal, key, ctx, tsg_id)
    return Response(status_code=204)
