"""HTTP routes for external CA connectors (management plane)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from signery import protocol as p
from signery.protocol import API_PREFIX
from signery.server.http.deps import ContextDep, PrincipalDep, ServicesDep

router = APIRouter(prefix=f"{API_PREFIX}/ca-connectors", tags=["ca"])


@router.post("", status_code=201, response_model=p.CaConnector)
def create_connector(
    body: p.CaConnectorCreate, principal: PrincipalDep, services: ServicesDep, ctx: ContextDep
) -> p.CaConnector:
    """Configure an external CA on a TSG; keys in its subtree may use it. Secrets
    (EST password, TLS client key) are stored encrypted and never returned."""
    return services.connectors.create(principal, body, ctx)


@router.get("", response_model=list[p.CaConnector])
def list_connectors(
    principal: PrincipalDep, services: ServicesDep, tsg_id: str | None = None
) -> list[p.CaConnector]:
    return services.connectors.list_connectors(principal, tsg_id)


@router.get("/{connector}", response_model=p.CaConnector)
def get_connector(
    connector: str, principal: PrincipalDep, services: ServicesDep, tsg_id: str | None = None
) -> p.CaConnector:
    return services.connectors.get(principal, connector, tsg_id)


@router.patch("/{connector}", response_model=p.CaConnector)
def update_connector(
    connector: str,
    body: p.CaConnectorUpdate,
    principal: PrincipalDep,
    services: ServicesDep,
    ctx: ContextDep,
    tsg_id: str | None = None,
) -> p.CaConnector:
    """Change the roots, the public flag or the EST settings (a secret left out keeps
    its stored value)."""
    return services.connectors.update(principal, connector, body, ctx, tsg_id)


@router.delete("/{connector}", status_code=204, response_class=Response)
def delete_connector(
    connector: str,
    principal: PrincipalDep,
    services: ServicesDep,
    ctx: ContextDep,
    tsg_id: str | None = None,
) -> Response:
    """Remove a connector no key uses."""
    services.connectors.delete(principal, connector, ctx, tsg_id)
    return Response(status_code=204)
