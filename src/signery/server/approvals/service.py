"""The approvers' side of approvals: signing requests listed and decided,
pre-approvals, grants listed and revoked.

Who is eligible: a user holding ``signery.signing.approve`` on the key's TSG
and, when the policy names approvers, one of them. The requester (the account
that asked, or the user who made a pre-approval) never approves its own request.
``required_approvals`` distinct eligible approvers approving a request create the
grant; one deny denies it.

Grant terms are the most restrictive of the key policy's (``grant_max_uses``,
``grant_ttl_hours``) and of every approver's narrowing (``max_uses``,
``expires_in_hours``; ``unlimited`` narrows nothing about uses and needs an
expiry): an approver can only make a grant smaller than the policy allows,
never larger. The narrowed terms are kept on the request as decisions arrive,
so the grant is made from them when the last required approval comes in. The
lifetime counts from that moment.

Deciding locks the request row (``FOR UPDATE`` on PostgreSQL; SQLite's ``BEGIN
IMMEDIATE`` serializes writers), so two approvers approving at once cannot make
two grants, and no digest joins a request (``approvals/gate.py``) while it is
being decided.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from signery import protocol as p
from signery.crypto import Hashed, check_scheme
from signery.errors import (
    AccountNotFound,
    AlreadyDecided,
    ApprovalClosed,
    ApprovalRequestChanged,
    ApprovalRequestNotFound,
    GrantNotFound,
    InvalidRequest,
    KeyNameAmbiguous,
    KeyNotFound,
    NotAnApprover,
    SelfApprovalForbidden,
    SigneryError,
)
from signery.protocol import (
    Algorithm,
    ApprovalStatus,
    AuditOutcome,
    GrantScope,
    SignatureScheme,
)
from signery.server.access.authz import Authorizer, Denied, Permission, Principal
from signery.server.access.context import RequestContext
from signery.server.accounts.models import AccountRow
from signery.server.approvals.expiry import ApprovalExpiry
from signery.server.approvals.models import (
    ApprovalDecisionRow,
    SigningGrantRow,
    SigningRequestDigestRow,
    SigningRequestRow,
)
from signery.server.approvals.records import (
    APPROVE,
    DENY,
    Item,
    approval_policy,
    digest_counts,
    digest_row,
    items_of,
    new_request,
    request_items,
)
from signery.server.approvals.wire import grant_from, request_wire
from signery.server.audit.events import Actor, AuditRecord, EventKind, outcome_of
from signery.server.audit.recorder import AuditRecorder
from signery.server.keys.models import SigningKeyRow
from signery.server.persistence.db import Database, flush_unique, new_id
from signery.server.runtime.clock import Clock
from signery.server.tsg.models import TsgRow
from signery.server.tsg.tree import TsgDirectory, rows_by_ref, visible_rows_by_ref


def _digests_detail(items: Sequence[SigningRequestDigestRow]) -> list[dict[str, str]]:
    """The digests of a request, as audit events name them."""
    return [
        {"digest_algorithm": d.digest_algorithm, "digest": d.digest, "scheme": d.scheme}
        for d in items
    ]


def _narrowed(current: int | None, narrowing: int | None) -> int | None:
    """The smaller use limit; None is unlimited."""
    if narrowing is None:
        return current
    return narrowing if current is None else min(current, narrowing)


class ApprovalService:
    """What approvers (and key admins, for revocation) do through the API."""

    def __init__(
        self,
        *,
        db: Database,
        authz: Authorizer,
        recorder: AuditRecorder,
        clock: Clock,
        directory: TsgDirectory,
        expiry: ApprovalExpiry,
    ) -> None:
        self._db = db
        self._authz = authz
        self._recorder = recorder
        self._clock = clock
        self._directory = directory
        self._expiry = expiry

    # ------------------------------------------------------------ requests

    def list_requests(
        self, principal: Principal, status: ApprovalStatus | None
    ) -> list[p.ApprovalRequest]:
        """Requests in the TSGs where the caller may approve (all statuses when None)."""
        now = self._clock.now()
        scopes = self._authz.scopes(principal, Permission.SIGNING_APPROVE)
        out: list[p.ApprovalRequest] = []
        with self._db.write() as s:
            for scope in scopes:
                q = (
                    select(SigningRequestRow, TsgRow.path)
                    .join(TsgRow, TsgRow.id == SigningRequestRow.tsg_id)
                    .where(TsgRow.path.startswith(scope, autoescape=True))
                    .order_by(SigningRequestRow.created_at)
                )
                for r, path in s.execute(q).all():
                    self._expiry.expire_if_due(s, r, now, path)
                    if status is None or r.status == status.value:
                        out.append(request_wire(s, r, now))
        return sorted(out, key=lambda r: r.created_at)

    def get(self, principal: Principal, request_id: str) -> p.ApprovalRequest:
        now = self._clock.now()
        with self._db.write() as s:
            r, path = self._visible_request(s, principal, request_id)
            self._authz.require(
                principal, Permission.SIGNING_APPROVE, path, not_found=ApprovalRequestNotFound
            )
            self._expiry.expire_if_due(s, r, now, path)
            return request_wire(s, r, now)

    def decide(
        self,
        principal: Principal,
        request_id: str,
        body: p.ApprovalDecide,
        *,
        approve: bool,
        ctx: RequestContext,
    ) -> p.ApprovalRequest:
        """Approve or deny. Every refusal is audited (``signing.approval.refused``)."""
        known: dict[str, Any] = {}
        try:
            if approve:
                _check_terms(body.max_uses, body.unlimited, body.expires_in_hours)
            now = self._clock.now()
            expired = False
            with self._db.write() as s:
                r, path = self._visible_request(s, principal, request_id, lock=True)
                known.update(tsg_id=r.tsg_id, tsg_path=path, key_id=r.key_id)
                if r.status == ApprovalStatus.PENDING_APPROVAL.value and r.expires_at <= now:
                    self._expiry.mark_expired(s, r, path, now)
                    expired = True
                else:
                    wire = self._decide_locked(s, principal, r, path, body, approve, now, ctx)
            if expired:
                raise ApprovalClosed("the request expired before it was decided")
            return wire
        except SigneryError as e:
            self._refused(principal, request_id, e, known, ctx, APPROVE if approve else DENY)
            raise

    def _decide_locked(
        self,
        s: Session,
        principal: Principal,
        r: SigningRequestRow,
        path: str,
        body: p.ApprovalDecide,
        approve: bool,
        now: datetime,
        ctx: RequestContext,
    ) -> p.ApprovalRequest:
        if r.status != ApprovalStatus.PENDING_APPROVAL.value:
            raise ApprovalClosed(f"the request is {r.status}")
        self._check_approver(s, principal, r, path)
        if body.digest_count is not None:
            # The request row is locked: no digest joins between this check and the
            # decision, and none after it (a decided request takes no new digest).
            listed = digest_counts(s, [r.id]).get(r.id, 0)
            if listed != body.digest_count:
                raise ApprovalRequestChanged(
                    f"the request lists {listed} digests, not the {body.digest_count} you "
                    "reviewed; read it again"
                )
        if s.scalar(
            select(ApprovalDecisionRow.id).where(
                ApprovalDecisionRow.request_id == r.id,
                ApprovalDecisionRow.approver_id == principal.id,
            )
        ):
            raise AlreadyDecided()
        self._add_decision(s, principal, r, APPROVE if approve else DENY, body.comment, now)
        if approve:
            self._approved_by(s, principal, r, path, body.max_uses, body.expires_in_hours, now, ctx)
        else:
            r.status = ApprovalStatus.DENIED.value
            r.updated_at = now
            self._record(
                s,
                EventKind.APPROVAL_DENIED,
                principal,
                r,
                path,
                ctx,
                {"comment": body.comment},
            )
        s.flush()
        return request_wire(s, r, now)

    def _approved_by(
        self,
        s: Session,
        principal: Principal,
        r: SigningRequestRow,
        path: str,
        max_uses: int | None,
        expires_in_hours: int | None,
        now: datetime,
        ctx: RequestContext,
    ) -> None:
        """Count an approval, narrow the grant terms, and make the grant at M of N."""
        r.grant_max_uses = _narrowed(r.grant_max_uses, max_uses)
        if expires_in_hours is not None:
            r.grant_ttl_seconds = min(r.grant_ttl_seconds, expires_in_hours * 3600)
        r.updated_at = now
        approvals = self._approvals(s, r.id)
        complete = approvals >= r.required_approvals
        if complete:
            r.status = ApprovalStatus.APPROVED.value
        # What this approver approved: the scope and every digest (the set is fixed
        # from the first decision on, so each approval names the same set).
        covers = {"scope": r.scope, "digests": _digests_detail(request_items(s, r.id))}
        self._record(
            s,
            EventKind.APPROVAL_APPROVED,
            principal,
            r,
            path,
            ctx,
            {
                "approvals": approvals,
                "required": r.required_approvals,
                "status": r.status,
                **covers,
            },
        )
        if not complete:
            return
        grant = SigningGrantRow(
            id=new_id(),
            key_id=r.key_id,
            account_id=r.account_id,
            request_id=r.id,
            scope=r.scope,
            max_uses=r.grant_max_uses,
            uses=0,
            expires_at=now + timedelta(seconds=r.grant_ttl_seconds),
            revoked_at=None,
            created_at=now,
        )
        s.add(grant)
        r.grant_id = grant.id
        s.flush()
        self._record(
            s,
            EventKind.GRANT_CREATED,
            principal,
            r,
            path,
            ctx,
            {
                "grant_id": grant.id,
                "account_id": r.account_id,
                "max_uses": grant.max_uses,
                "expires_at": grant.expires_at.isoformat(),
                **covers,
            },
        )

    def pre_approve(
        self, principal: Principal, body: p.PreApprovalCreate, ctx: RequestContext
    ) -> p.ApprovalRequest:
        """An approver approves signing ahead of a release: a request for (key,
        account) made by that user and counting as its approval. It covers the
        digests it lists, or, when it says ``any_digest``, any digest."""
        _check_terms(body.max_uses, body.unlimited, body.expires_in_hours)
        items = _pre_approved_items(body)
        now = self._clock.now()
        with self._db.write() as s:
            key, path = self._approvable_key(s, principal, body.key, body.key_tsg_id)
            policy = approval_policy(key.policy_json)
            if policy is None:
                raise InvalidRequest("the key's policy does not require approval")
            for item in items:
                # A digest the key could never sign is refused now, not at signing.
                check_scheme(Algorithm(key.algorithm), SignatureScheme(item.scheme))
            if policy.approvers and principal.id not in policy.approvers:
                raise NotAnApprover("the key's policy names its approvers; you are not one")
            account = self._account_for(s, body.account, path)
            max_uses = None if body.unlimited else body.max_uses
            r = new_request(
                policy,
                now,
                key_id=key.id,
                tsg_id=key.tsg_id,
                account_id=account.id,
                requested_by_type=principal.type.value,
                requested_by_id=principal.id,
                requested_by_name=principal.name,
                scope=body.scope.value,
                client_machine=None,
                client_tool=None,
                justification=body.comment,
            )
            s.add(r)
            s.flush()
            rows = [digest_row(r.id, i, item, now) for i, item in enumerate(items)]
            s.add_all(rows)
            s.flush()
            self._record(
                s,
                EventKind.APPROVAL_REQUESTED,
                principal,
                r,
                path,
                ctx,
                {
                    "pre_approval": True,
                    "account_id": account.id,
                    "comment": body.comment,
                    "scope": r.scope,
                    "digests": _digests_detail(rows),
                },
            )
            self._add_decision(s, principal, r, APPROVE, body.comment, now)
            self._approved_by(s, principal, r, path, max_uses, body.expires_in_hours, now, ctx)
            s.flush()
            return request_wire(s, r, now)

    # ------------------------------------------------------------ grants

    def list_grants(
        self, principal: Principal, key: str | None = None, account: str | None = None
    ) -> list[p.SigningGrant]:
        now = self._clock.now()
        scopes = self._authz.scopes(principal, Permission.SIGNING_APPROVE)
        out: list[p.SigningGrant] = []
        with self._db.read() as s:
            for scope in scopes:
                q = (
                    select(SigningGrantRow, SigningKeyRow, AccountRow)
                    .join(SigningKeyRow, SigningKeyRow.id == SigningGrantRow.key_id)
                    .join(AccountRow, AccountRow.id == SigningGrantRow.account_id)
                    .join(TsgRow, TsgRow.id == SigningKeyRow.tsg_id)
                    .where(TsgRow.path.startswith(scope, autoescape=True))
                )
                if key:
                    q = q.where(or_(SigningKeyRow.id == key, SigningKeyRow.name == key))
                if account:
                    q = q.where(or_(AccountRow.id == account, AccountRow.name == account))
                found = s.execute(q).all()
                items = items_of(s, [g.request_id for g, _, _ in found if g.request_id])
                for g, k, a in found:
                    out.append(
                        grant_from(g, k.name, a.name, items.get(g.request_id or "", []), now)
                    )
        return sorted(out, key=lambda g: g.created_at)

    def revoke_grant(
        self, principal: Principal, grant_id: str, ctx: RequestContext
    ) -> p.SigningGrant:
        """Revoke a grant at once (an approver, or a key admin, of the key's TSG)."""
        now = self._clock.now()
        with self._db.write() as s:
            g = s.get(SigningGrantRow, grant_id, with_for_update=True)
            key = s.get(SigningKeyRow, g.key_id) if g else None
            path = self._directory.path(s, key.tsg_id) if key else None
            if g is None or key is None or path is None:
                raise GrantNotFound()
            approver = self._authz.decide(principal, Permission.SIGNING_APPROVE, path)
            if isinstance(approver, Denied):
                self._authz.require(principal, Permission.KEY_MANAGE, path, not_found=GrantNotFound)
            if g.revoked_at is None:
                g.revoked_at = now
                self._recorder.record(
                    s,
                    AuditRecord(
                        EventKind.GRANT_REVOKED,
                        AuditOutcome.SUCCEEDED,
                        Actor.of(principal),
                        tsg_id=key.tsg_id,
                        tsg_path=path,
                        key_id=key.id,
                        context=ctx,
                        details={
                            "grant_id": g.id,
                            "account_id": g.account_id,
                            "request_id": g.request_id,
                            "scope": g.scope,
                            "uses": g.uses,
                            "max_uses": g.max_uses,
                        },
                    ),
                )
            account = s.get(AccountRow, g.account_id)
            items = request_items(s, g.request_id) if g.request_id else []
            return grant_from(g, key.name, account.name if account else None, items, now)

    # ------------------------------------------------------------ helpers

    def _visible_request(
        self, s: Session, principal: Principal, request_id: str, *, lock: bool = False
    ) -> tuple[SigningRequestRow, str]:
        """The request, if the caller can see its TSG at all (else: not found)."""
        q = select(SigningRequestRow).where(SigningRequestRow.id == request_id)
        r = s.scalar(q.with_for_update() if lock else q)
        path = self._directory.path(s, r.tsg_id) if r else None
        if r is None or path is None or not any(path.startswith(v) for _, v in principal.grants()):
            raise ApprovalRequestNotFound()
        return r, path

    def _check_approver(
        self, s: Session, principal: Principal, r: SigningRequestRow, path: str
    ) -> None:
        # The requester first: the most precise reason, even for a caller (such as
        # the requesting account itself) that holds no approval right at all.
        if r.requested_by_type == principal.type.value and r.requested_by_id == principal.id:
            raise SelfApprovalForbidden()
        if isinstance(self._authz.decide(principal, Permission.SIGNING_APPROVE, path), Denied):
            raise NotAnApprover(f"{Permission.SIGNING_APPROVE.value} is not granted here")
        key = s.get(SigningKeyRow, r.key_id)
        policy = approval_policy(key.policy_json if key else None)
        if policy is not None and policy.approvers and principal.id not in policy.approvers:
            raise NotAnApprover("the key's policy names its approvers; you are not one")

    def _approvable_key(
        self, s: Session, principal: Principal, ref: str, tsg_id: str | None
    ) -> tuple[SigningKeyRow, str]:
        found = visible_rows_by_ref(s, principal, SigningKeyRow, ref, tsg_id)
        if not found:
            raise KeyNotFound()
        if len(found) > 1:
            raise KeyNameAmbiguous(
                f"{len(found)} visible keys are named {ref!r}; pass the key id or the TSG",
                candidates=[{"id": r.id, "tsg_id": r.tsg_id} for r, _ in found],
            )
        key, path = found[0]
        if isinstance(self._authz.decide(principal, Permission.SIGNING_APPROVE, path), Denied):
            self._authz.require(principal, Permission.KEY_READ, path, not_found=KeyNotFound)
            raise NotAnApprover(f"{Permission.SIGNING_APPROVE.value} is not granted here")
        return key, path

    def _account_for(self, s: Session, ref: str, key_path: str) -> AccountRow:
        """An account that can sign with the key: in the key's TSG or an ancestor's
        (the approver is authorized on the key, so these are its business)."""
        found = [a for a, path in rows_by_ref(s, AccountRow, ref) if key_path.startswith(path)]
        if not found:
            raise AccountNotFound("no account of that name or id can sign with this key")
        if len(found) > 1:
            raise InvalidRequest(
                f"{len(found)} accounts named {ref!r} can use the key; pass its id"
            )
        account: AccountRow = found[0]
        return account

    def _add_decision(
        self,
        s: Session,
        principal: Principal,
        r: SigningRequestRow,
        decision: str,
        comment: str | None,
        now: datetime,
    ) -> None:
        s.add(
            ApprovalDecisionRow(
                id=new_id(),
                request_id=r.id,
                approver_type=principal.type.value,
                approver_id=principal.id,
                approver_name=principal.name,
                decision=decision,
                comment=comment,
                created_at=now,
            )
        )
        # The unique (request, approver) constraint backs the check above.
        flush_unique(s, AlreadyDecided())

    def _approvals(self, s: Session, request_id: str) -> int:
        return int(
            s.scalar(
                select(func.count(func.distinct(ApprovalDecisionRow.approver_id))).where(
                    ApprovalDecisionRow.request_id == request_id,
                    ApprovalDecisionRow.decision == APPROVE,
                )
            )
            or 0
        )

    def _record(
        self,
        s: Session,
        kind: EventKind,
        principal: Principal,
        r: SigningRequestRow,
        path: str,
        ctx: RequestContext,
        details: dict[str, Any],
    ) -> None:
        self._recorder.record(
            s,
            AuditRecord(
                kind,
                AuditOutcome.SUCCEEDED,
                Actor.of(principal),
                tsg_id=r.tsg_id,
                tsg_path=path,
                key_id=r.key_id,
                context=ctx,
                details={"request_id": r.id, **details},
            ),
        )

    def _refused(
        self,
        principal: Principal,
        request_id: str,
        error: SigneryError,
        known: dict[str, Any],
        ctx: RequestContext,
        decision: str,
    ) -> None:
        outcome = outcome_of(error)
        if outcome not in (AuditOutcome.DENIED, AuditOutcome.INVALID):
            return  # a failure, not a refusal: reported by the edge as such
        self._recorder.commit_sync(
            AuditRecord(
                EventKind.APPROVAL_REFUSED,
                outcome,
                Actor.of(principal),
                reason=error.code,
                tsg_id=known.get("tsg_id", principal.tsg_id),
                tsg_path=known.get("tsg_path", principal.tsg_path),
                key_id=known.get("key_id"),
                context=ctx,
                details={"request_id": request_id[:64], "decision": decision},
            )
        )
        error.audited = True


def _pre_approved_items(body: p.PreApprovalCreate) -> list[Item]:
    """The digests a pre-approval lists: required with scope ``digests`` (each the
    right length for its algorithm), refused with ``any_digest``, which must be
    said on purpose and lists nothing."""
    if body.scope is GrantScope.ANY_DIGEST:
        if body.digests is not None:
            raise InvalidRequest("scope any_digest lists no digests; use scope digests")
        return []
    if not body.digests:
        raise InvalidRequest("scope digests needs the digests it approves")
    items: dict[Item, None] = {}
    for d in body.digests:
        try:
            raw = bytes.fromhex(d.digest)
        except ValueError:
            raise InvalidRequest("each digest is hexadecimal, two digits a byte") from None
        # DigestLengthMismatch for a digest of the wrong length for its algorithm.
        hashed = Hashed(d.digest_algorithm, raw)
        items[Item(hashed.algorithm.value, hashed.hex, d.scheme.value)] = None
    return list(items)


def _check_terms(max_uses: int | None, unlimited: bool, expires_in_hours: int | None) -> None:
    # Unlimited uses are only ever granted for a bounded time (the rule).
    if unlimited and expires_in_hours is None:
        raise InvalidRequest("unlimited uses need an expiry (expires_in_hours)")
    if unlimited and max_uses is not None and max_uses != 1:
        raise InvalidRequest("give either max_uses or unlimited, not both")
