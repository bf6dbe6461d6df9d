"""HTTP routes for TSGs."""

from __future__ import annotations

from fastapi import APIRouter

from signery import protocol as p
from signery.protocol import API_PREFIX
from signery.server.http.deps import ContextDep, PrincipalDep, ServicesDep

router = APIRouter(prefix=f"{API_PREFIX}/tsgs", tags=["tsgs"])


@router.post("", status_code=201, response_model=p.Tsg)
def create_tsg(
    body: p.TsgCreate, principal: PrincipalDep, services: ServicesDep, ctx: ContextDep
) -> p.Tsg:
    return services.tsgs.create(principal, body, ctx)


@router.get("", response_model=list[p.Tsg])
def list_tsgs(principal: PrincipalDep, services: ServicesDep) -> list[p.Tsg]:
    return services.tsgs.list_tsgs(principal)


@router.get("/tree", response_model=list[p.TsgTree])
def tsg_tree(
    principal: PrincipalDep, services: ServicesDep, root: str | None = None
) -> list[p.TsgTree]:
    return services.tsgs.tree(principal, root)


@router.get("/{tsg_id}", response_model=p.Tsg)
def get_tsg(tsg_id: str, principal: PrincipalDep, services: ServicesDep) -> p.Tsg:
    return services.tsgs.get(principal, tsg_id)
