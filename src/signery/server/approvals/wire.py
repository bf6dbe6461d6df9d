"""Approvals as the API shows them: a signing request to approvers, a grant, and
the pending answer (HTTP 202) an account polls. Built from rows in the caller's
session; nothing here writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy.orm import Session

from signery import protocol as p
from signery.protocol import ApprovalStatus, GrantScope, PrincipalType
from signery.server.accounts.models import AccountRow
from signery.server.approvals.models import (
    SigningGrantRow,
    SigningRequestDigestRow,
    SigningRequestRow,
)
from signery.server.approvals.records import (
    APPROVE,
    DENY,
    DIGESTS,
    decisions_of,
    grant_status,
    request_items,
)
from signery.server.keys.models import SigningKeyRow


def approved_digest(d: SigningRequestDigestRow) -> p.ApprovedDigest:
    """One item of a request or a grant, with the uses it has had."""
    return p.ApprovedDigest(
        digest_algorithm=p.DigestAlgorithm(d.digest_algorithm),
        digest=d.digest,
        scheme=p.SignatureScheme(d.scheme),
        uses=d.uses,
    )


def grant_from(
    g: SigningGrantRow,
    key_name: str,
    account_name: str | None,
    items: Sequence[SigningRequestDigestRow],
    now: datetime,
) -> p.SigningGrant:
    """A grant whose key and account names and items the caller has already read."""
    bound = g.scope == DIGESTS
    return p.SigningGrant(
        id=g.id,
        key_id=g.key_id,
        key_name=key_name,
        account_id=g.account_id,
        account_name=account_name,
        request_id=g.request_id,
        scope=GrantScope(g.scope),
        digests=[approved_digest(d) for d in items] if bound else [],
        max_uses=g.max_uses,
        uses=g.uses,
        expires_at=g.expires_at,
        revoked_at=g.revoked_at,
        created_at=g.created_at,
        status=grant_status(g, now, len(items)),
    )


def grant_wire(
    s: Session,
    g: SigningGrantRow,
    now: datetime,
    items: list[SigningRequestDigestRow] | None = None,
) -> p.SigningGrant:
    """A grant, reading its key, account and (unless given) items."""
    key = s.get(SigningKeyRow, g.key_id)
    account = s.get(AccountRow, g.account_id)
    if items is None:
        items = request_items(s, g.request_id) if g.request_id else []
    return grant_from(
        g, key.name if key else g.key_id, account.name if account else None, items, now
    )


def request_wire(s: Session, r: SigningRequestRow, now: datetime) -> p.ApprovalRequest:
    """A signing request as approvers see it: its items, decisions and grant."""
    key = s.get(SigningKeyRow, r.key_id)
    account = s.get(AccountRow, r.account_id)
    decisions = decisions_of(s, r.id)
    grant = s.get(SigningGrantRow, r.grant_id) if r.grant_id else None
    items = request_items(s, r.id)
    # The fields of older clients: filled only when they tell the whole story.
    only = items[0] if len(items) == 1 else None
    return p.ApprovalRequest(
        id=r.id,
        key_id=r.key_id,
        key_name=key.name if key else r.key_id,
        tsg_id=r.tsg_id,
        account_id=r.account_id,
        account_name=account.name if account else None,
        requested_by=p.AuditPrincipal(
            type=PrincipalType(r.requested_by_type),
            id=r.requested_by_id,
            name=r.requested_by_name,
        ),
        status=ApprovalStatus(r.status),
        required_approvals=r.required_approvals,
        approvals=sum(1 for d in decisions if d.decision == APPROVE),
        scope=GrantScope(r.scope),
        digests=[approved_digest(d) for d in items],
        digest_algorithm=only.digest_algorithm if only else None,
        digest=only.digest if only else None,
        scheme=only.scheme if only else None,
        client_machine=r.client_machine,
        client_tool=r.client_tool,
        justification=r.justification,
        grant_max_uses=r.grant_max_uses,
        grant_ttl_hours=r.grant_ttl_seconds / 3600,
        decisions=[
            p.ApprovalDecision(
                approver_type=PrincipalType(d.approver_type),
                approver_id=d.approver_id,
                approver_name=d.approver_name,
                decision=d.decision,
                comment=d.comment,
                created_at=d.created_at,
            )
            for d in decisions
        ],
        grant=grant_wire(s, grant, now, items) if grant else None,
        expires_at=r.expires_at,
        created_at=r.created_at,
        updated_at=r.updated_at,
    )


def pending_wire(
    s: Session, r: SigningRequestRow, key_name: str, now: datetime
) -> p.SigningPending:
    """A signing request as the account that asked sees it (HTTP 202, and polled)."""
    decisions = decisions_of(s, r.id)
    grant = s.get(SigningGrantRow, r.grant_id) if r.grant_id else None
    denial = next((d.comment for d in decisions if d.decision == DENY), None)
    return p.SigningPending(
        request_id=r.id,
        status=ApprovalStatus(r.status),
        key_id=r.key_id,
        key_name=key_name,
        required_approvals=r.required_approvals,
        approvals=sum(1 for d in decisions if d.decision == APPROVE),
        expires_at=r.expires_at,
        comment=denial,
        grant=grant_wire(s, grant, now) if grant else None,
    )
