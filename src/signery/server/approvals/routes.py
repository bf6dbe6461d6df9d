"""HTTP routes of approvals: signing requests, approvers' decisions and grants."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter

from signery import protocol as p
from signery.protocol import API_PREFIX, ApprovalStatus
from signery.server.http.deps import ContextDep, PrincipalDep, ServicesDep

router = APIRouter(prefix=API_PREFIX, tags=["approvals"])


@router.get("/approvals", response_model=list[p.ApprovalRequest])
def list_approvals(
    principal: PrincipalDep,
    services: ServicesDep,
    status: ApprovalStatus | Literal["all"] = ApprovalStatus.PENDING_APPROVAL,
) -> list[p.ApprovalRequest]:
    """Signing requests in the TSGs where you may approve (default: the pending ones)."""
    return services.approvals.list_requests(
        principal, None if status == "all" else ApprovalStatus(status)
    )


@router.post("/approvals", status_code=201, response_model=p.ApprovalRequest)
def pre_approve(
    body: p.PreApprovalCreate, principal: PrincipalDep, services: ServicesDep, ctx: ContextDep
) -> p.ApprovalRequest:
    """Pre-approve an account's signing with a key (counts as your approval). The
    body says what it covers, with no default: ``scope: digests`` and the digests,
    or ``scope: any_digest`` for any digest."""
    return services.approvals.pre_approve(principal, body, ctx)


@router.get("/approvals/{request_id}", response_model=p.ApprovalRequest)
def get_approval(
    request_id: str, principal: PrincipalDep, services: ServicesDep
) -> p.ApprovalRequest:
    return services.approvals.get(principal, request_id)


@router.post("/approvals/{request_id}/approve", response_model=p.ApprovalRequest)
def approve(
    request_id: str,
    body: p.ApprovalDecide,
    principal: PrincipalDep,
    services: ServicesDep,
    ctx: ContextDep,
) -> p.ApprovalRequest:
    """Approve: the grant signs exactly the digests the request lists (``digest_count``
    refuses the approval if they are not the number you reviewed)."""
    return services.approvals.decide(principal, request_id, body, approve=True, ctx=ctx)


@router.post("/approvals/{request_id}/deny", response_model=p.ApprovalRequest)
def deny(
    request_id: str,
    body: p.ApprovalDecide,
    principal: PrincipalDep,
    services: ServicesDep,
    ctx: ContextDep,
) -> p.ApprovalRequest:
    return services.approvals.decide(principal, request_id, body, approve=False, ctx=ctx)


@router.get("/grants", response_model=list[p.SigningGrant])
def list_grants(
    principal: PrincipalDep,
    services: ServicesDep,
    key: str | None = None,
    account: str | None = None,
) -> list[p.SigningGrant]:
    """Grants in the TSGs where you may approve (filter by key and account, name or id)."""
    return services.approvals.list_grants(principal, key, account)


@router.post("/grants/{grant_id}/revoke", response_model=p.SigningGrant)
def revoke_grant(
    grant_id: str, principal: PrincipalDep, services: ServicesDep, ctx: ContextDep
) -> p.SigningGrant:
    return services.approvals.revoke_grant(principal, grant_id, ctx)
