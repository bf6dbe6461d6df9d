"""HTTP routes for a TSG's subject policy: which subjects the built-in CA certifies
in the TSG's subtree (signery.server.ca.subject_policy)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from signery import protocol as p
from signery.protocol import API_PREFIX
from signery.server.http.deps import ContextDep, PrincipalDep, ServicesDep

router = APIRouter(prefix=f"{API_PREFIX}/tsgs", tags=["tsgs"])


@router.get("/{tsg_id}/subject-policy", response_model=p.SubjectPolicy)
def get_subject_policy(
    tsg_id: str, principal: PrincipalDep, services: ServicesDep
) -> p.SubjectPolicy:
    """The TSG's own subject policy and those above it, which apply together, and
    their effect. Needs signery.tsg.read on the TSG."""
    return services.subject_policies.get(principal, tsg_id)


@router.put("/{tsg_id}/subject-policy", response_model=p.SubjectPolicy)
def set_subject_policy(
    tsg_id: str,
    body: p.SubjectPolicyRules,
    principal: PrincipalDep,
    services: ServicesDep,
    ctx: ContextDep,
) -> p.SubjectPolicy:
    """Replace the TSG's own subject policy. Needs signery.ca.subject_policy.manage
    at the root TSG (a superuser there)."""
    return services.subject_policies.set(principal, tsg_id, body, ctx)


@router.delete("/{tsg_id}/subject-policy", status_code=204)
def clear_subject_policy(
    tsg_id: str, principal: PrincipalDep, services: ServicesDep, ctx: ContextDep
) -> Response:
    """Remove the TSG's own subject policy (those above it keep applying). Needs
    signery.ca.subject_policy.manage at the root TSG."""
    services.subject_policies.clear(principal, tsg_id, ctx)
    return Response(status_code=204)
