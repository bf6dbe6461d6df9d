"""The rows of approvals, read and made the same way by the gate, the approvers'
service and the wire conversions: requests and the digests they list, decisions,
the status of a grant.

What a grant signs is what its approvers saw. A request lists the (digest,
digest_algorithm, scheme) items it covers; the grant it makes (scope
``digests``) signs exactly those items, each at most ``max_uses`` times. Only a
pre-approval that says ``any_digest`` on purpose makes a grant for any digest;
its scope is shown to approvers, in the grant and in every audit event.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from signery import protocol as p
from signery.protocol import ApprovalStatus, GrantScope
from signery.server.approvals.models import (
    ApprovalDecisionRow,
    SigningGrantRow,
    SigningRequestDigestRow,
    SigningRequestRow,
)
from signery.server.keys.policy import KeyPolicy
from signery.server.persistence.db import new_id

APPROVE = "approve"
DENY = "deny"
DIGESTS = GrantScope.DIGESTS.value
ANY_DIGEST = GrantScope.ANY_DIGEST.value


def approval_policy(policy_json: str | None) -> p.ApprovalPolicy | None:
    """The approval a key's policy requires (from the parsed policy,
    ``KeyPolicy.of``), or None when the key requires none. A policy that cannot
    be read raises (``KeyPolicy.parse``): it never signs without approval."""
    policy = KeyPolicy.of(policy_json)
    return policy.approval if policy is not None else None


class Item(NamedTuple):
    """What a signing signs, as requests and grants record it (hex digest)."""

    digest_algorithm: str
    digest: str
    scheme: str


class Found(NamedTuple):
    """A request item that is exactly a signing: its id and the uses it has had."""

    id: str
    uses: int


def digest_counts(s: Session, request_ids: Sequence[str]) -> dict[str, int]:
    """How many digests each of these requests lists."""
    if not request_ids:
        return {}
    rows = s.execute(
        select(SigningRequestDigestRow.request_id, func.count())
        .where(SigningRequestDigestRow.request_id.in_(request_ids))
        .group_by(SigningRequestDigestRow.request_id)
    )
    return {request_id: int(n) for request_id, n in rows}


def matching_items(s: Session, request_ids: Sequence[str], item: Item) -> dict[str, Found]:
    """The item of each of these requests that is exactly this signing."""
    if not request_ids:
        return {}
    rows = s.execute(
        select(
            SigningRequestDigestRow.request_id,
            SigningRequestDigestRow.id,
            SigningRequestDigestRow.uses,
        ).where(
            SigningRequestDigestRow.request_id.in_(request_ids),
            SigningRequestDigestRow.digest_algorithm == item.digest_algorithm,
            SigningRequestDigestRow.digest == item.digest,
            SigningRequestDigestRow.scheme == item.scheme,
        )
    )
    return {request_id: Found(item_id, uses) for request_id, item_id, uses in rows}


def digest_row(
    request_id: str, position: int, item: Item, now: datetime
) -> SigningRequestDigestRow:
    return SigningRequestDigestRow(
        id=new_id(),
        request_id=request_id,
        position=position,
        digest_algorithm=item.digest_algorithm,
        digest=item.digest,
        scheme=item.scheme,
        uses=0,
        created_at=now,
    )


def new_request(policy: p.ApprovalPolicy, now: datetime, **fields: Any) -> SigningRequestRow:
    """A pending signing request; its approval terms are copied from the policy
    of the moment (a later policy change does not alter a request in flight)."""
    return SigningRequestRow(
        id=new_id(),
        status=ApprovalStatus.PENDING_APPROVAL.value,
        required_approvals=policy.required,
        grant_max_uses=policy.grant_max_uses,
        grant_ttl_seconds=policy.grant_ttl_hours * 3600,
        grant_id=None,
        expires_at=now + timedelta(hours=policy.request_ttl_hours),
        created_at=now,
        updated_at=now,
        **fields,
    )


def grant_status(g: SigningGrantRow, now: datetime, digest_count: int) -> str:
    """valid, used_up, expired or revoked. A bound grant is used up when each of its
    ``digest_count`` digests has had its ``max_uses`` (each item is capped, so the
    total tells)."""
    if g.revoked_at is not None:
        return "revoked"
    if g.expires_at <= now:
        return "expired"
    limit = g.max_uses if g.scope == ANY_DIGEST or g.max_uses is None else g.max_uses * digest_count
    if limit is not None and g.uses >= limit:
        return "used_up"
    return "valid"


def request_items(s: Session, request_id: str) -> list[SigningRequestDigestRow]:
    """The digests a request lists, in the order they arrived."""
    return items_of(s, [request_id]).get(request_id, [])


def items_of(s: Session, request_ids: Sequence[str]) -> dict[str, list[SigningRequestDigestRow]]:
    """The digests of each of these requests, in the order they arrived."""
    if not request_ids:
        return {}
    out: dict[str, list[SigningRequestDigestRow]] = {}
    for d in s.scalars(
        select(SigningRequestDigestRow)
        .where(SigningRequestDigestRow.request_id.in_(set(request_ids)))
        .order_by(SigningRequestDigestRow.request_id, SigningRequestDigestRow.position)
    ):
        out.setdefault(d.request_id, []).append(d)
    return out


def decisions_of(s: Session, request_id: str) -> list[ApprovalDecisionRow]:
    """The approvers' decisions on a request, oldest first."""
    return list(
        s.scalars(
            select(ApprovalDecisionRow)
            .where(ApprovalDecisionRow.request_id == request_id)
            .order_by(ApprovalDecisionRow.created_at)
        )
    )
