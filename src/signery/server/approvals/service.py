"""Approvals: signing requests, approvers' decisions and the grants they create.

A key whose policy has ``approval`` signs only for an account holding a valid
grant for it. Without one, the signing plane records a *signing request*
(HTTP 202) that approvers decide on; ``required_approvals`` distinct eligible
approvers approving it create the grant, one deny denies it.

Who is eligible: a user holding ``signery.signing.approve`` on the key's TSG
and, when the policy names approvers, one of them. The requester (the account
that asked, or the user who made a pre-approval) never approves its own request.

Grant terms are the most restrictive of the key policy's (``grant_max_uses``,
``grant_ttl_hours``) and of every approver's narrowing (``max_uses``,
``expires_in_hours``; ``unlimited`` narrows nothing about uses and needs an
expiry): an approver can only make a grant smaller than the policy allows,
never larger. The narrowed terms are kept on the request as decisions arrive,
so the grant is made from them when the last required approval comes in. The
lifetime counts from that moment.

Consuming a grant use is ONE conditional UPDATE (still valid, uses left), so a
single-use grant signs exactly once however many requests race for it; the
database decides, on every replica. Deciding locks the request row (``FOR
UPDATE`` on PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` serializes writers), so two
approvers approving at once cannot make two grants.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError
from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from signery import protocol as p
from signery.errors import (
    AccountNotFound,
    AlreadyDecided,
    ApprovalClosed,
    ApprovalRequestNotFound,
    GrantNotFound,
    InvalidRequest,
    KeyNameAmbiguous,
    KeyNotFound,
    NotAnApprover,
    SelfApprovalForbidden,
    SigneryError,
)
from signery.protocol import ApprovalStatus, AuditOutcome, PrincipalType
from signery.server.accounts.models import AccountRow
from signery.server.approvals.models import (
    ApprovalDecisionRow,
    SigningGrantRow,
    SigningRequestRow,
)
from signery.server.audit.recorder import (
    SYSTEM,
    Actor,
    AuditRecord,
    AuditRecorder,
    EventKind,
    outcome_of,
)
from signery.server.authz import Authorizer, Denied, Permission, Principal
from signery.server.clock import Clock
from signery.server.context import RequestContext
from signery.server.db import Database, flush_unique, new_id, table
from signery.server.keys.models import SigningKeyRow
from signery.server.tsg.models import TsgRow
from signery.server.tsg.service import TsgDirectory, actor_of, rows_by_ref, visible_rows_by_ref

APPROVE = "approve"
DENY = "deny"
# Reasons recorded when an account had a grant for the key that no longer works.
GRANT_EXPIRED = "grant_expired"
GRANT_USED_UP = "grant_used_up"
GRANT_REVOKED = "grant_revoked"
APPROVAL_REQUIRED = "approval_required"
POLICY_CACHE_SIZE = 1024

_G = table(SigningGrantRow)


# Requests expired per scheduler run (the rest wait for the next run).
EXPIRE_BATCH = 500


@functools.lru_cache(maxsize=POLICY_CACHE_SIZE)
def approval_policy(policy_json: str | None) -> p.ApprovalPolicy | None:
    """The ``approval`` part of a key's policy JSON (cached: policies are few and
    immutable strings), or None when the key requires no approval."""
    if not policy_json:
        return None
    try:
        raw = json.loads(policy_json).get("approval")
        return None if raw is None else p.ApprovalPolicy.model_validate(raw)
    except (ValueError, AttributeError, ValidationError) as e:
        # A policy that cannot be read must not sign without approval: fail closed.
        raise InvalidRequest("the key's approval policy cannot be read") from e


@dataclass(frozen=True, slots=True)
class SignAttempt:
    """What the signing plane knows of a signing that needs a grant."""

    key_id: str
    key_name: str
    key_version: int
    algorithm: str
    tsg_id: str
    tsg_path: str
    account_id: str
    account_name: str
    digest_algorithm: str
    digest_hex: str
    scheme: str
    justification: str | None
    context: RequestContext


@dataclass(frozen=True, slots=True)
class GrantUse:
    """A grant use taken for a signing (given back if no signature leaves)."""

    grant_id: str


def _new_request(policy: p.ApprovalPolicy, now: datetime, **fields: Any) -> SigningRequestRow:
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


def grant_status(g: SigningGrantRow, now: datetime) -> str:
    if g.revoked_at is not None:
        return "revoked"
    if g.expires_at <= now:
        return "expired"
    if g.max_uses is not None and g.uses >= g.max_uses:
        return "used_up"
    return "valid"


def _narrowed(current: int | None, narrowing: int | None) -> int | None:
    """The smaller use limit; None is unlimited."""
    if narrowing is None:
        return current
    return narrowing if current is None else min(current, narrowing)


class ApprovalService:
    def __init__(
        self,
        db: Database,
        authz: Authorizer,
        recorder: AuditRecorder,
        clock: Clock,
        directory: TsgDirectory,
    ) -> None:
        self._db = db
        self._authz = authz
        self._recorder = recorder
        self._clock = clock
        self._directory = directory

    # ------------------------------------------------------------ signing plane (worker threads)

    def admit(self, attempt: SignAttempt, policy: p.ApprovalPolicy) -> GrantUse | p.SigningPending:
        """Take one use of a valid grant, or record (or reuse) a pending request.

        Blocking database work: call from a worker thread, never the event loop."""
        now = self._clock.now()
        with self._db.read() as s:
            grants = list(
                s.scalars(
                    select(SigningGrantRow)
                    .where(
                        SigningGrantRow.key_id == attempt.key_id,
                        SigningGrantRow.account_id == attempt.account_id,
                    )
                    .order_by(SigningGrantRow.expires_at)
                )
            )
        for g in grants:
            if grant_status(g, now) != "valid":
                continue
            with self._db.write() as s:
                taken = s.execute(
                    update(SigningGrantRow)
                    .where(
                        SigningGrantRow.id == g.id,
                        SigningGrantRow.revoked_at.is_(None),
                        SigningGrantRow.expires_at > now,
                        or_(
                            SigningGrantRow.max_uses.is_(None),
                            SigningGrantRow.uses < SigningGrantRow.max_uses,
                        ),
                    )
                    .values(uses=SigningGrantRow.uses + 1)
                    .execution_options(synchronize_session=False)
                )
            if taken.rowcount == 1:  # type: ignore[attr-defined]
                return GrantUse(g.id)
            # Lost the race for its last use (or it was revoked meanwhile): try the next.
        states = {grant_status(g, now) for g in grants}
        lapsed = next(
            (
                reason
                for state, reason in (
                    ("used_up", GRANT_USED_UP),
                    ("expired", GRANT_EXPIRED),
                    ("revoked", GRANT_REVOKED),
                )
                if state in states
            ),
            None,
        )
        return self._pending(attempt, policy, lapsed, now)

    def give_back(self, use: GrantUse) -> None:
        """Return a use taken by a signing that returned no signature."""
        with self._db.write() as s:
            s.execute(
                update(SigningGrantRow)
                .where(SigningGrantRow.id == use.grant_id, SigningGrantRow.uses > 0)
                .values(uses=SigningGrantRow.uses - 1)
                .execution_options(synchronize_session=False)
            )

    def _pending(
        self,
        attempt: SignAttempt,
        policy: p.ApprovalPolicy,
        lapsed: str | None,
        now: datetime,
    ) -> p.SigningPending:
        with self._db.write() as s:
            # Serializes request creation per key on PostgreSQL (SQLite writers are
            # serialized already), so concurrent signings share one request.
            s.execute(
                select(SigningKeyRow.id).where(SigningKeyRow.id == attempt.key_id).with_for_update()
            )
            pending = list(
                s.scalars(
                    select(SigningRequestRow).where(
                        SigningRequestRow.key_id == attempt.key_id,
                        SigningRequestRow.account_id == attempt.account_id,
                        SigningRequestRow.status == ApprovalStatus.PENDING_APPROVAL.value,
                    )
                )
            )
            request: SigningRequestRow | None = None
            for r in sorted(pending, key=lambda r: r.created_at):
                if r.expires_at <= now:
                    self._mark_expired(s, r, attempt.tsg_path, now)
                elif request is None:
                    request = r
            reused = request is not None
            if request is None:
                request = _new_request(
                    policy,
                    now,
                    key_id=attempt.key_id,
                    tsg_id=attempt.tsg_id,
                    account_id=attempt.account_id,
                    requested_by_type=PrincipalType.ACCOUNT.value,
                    requested_by_id=attempt.account_id,
                    requested_by_name=attempt.account_name,
                    digest_algorithm=attempt.digest_algorithm,
                    digest=attempt.digest_hex,
                    scheme=attempt.scheme,
                    client_machine=attempt.context.machine,
                    client_tool=attempt.context.tool,
                    justification=attempt.justification,
                )
                s.add(request)
                s.flush()
            details: dict[str, Any] = {"request_id": request.id, "reused": reused}
            if lapsed is not None:
                details["grant_state"] = lapsed
            if attempt.justification:
                details["justification"] = attempt.justification[:256]
            # The signing attempt's one audit event: not a signature, not counted as one.
            self._recorder.record(
                s,
                AuditRecord(
                    EventKind.APPROVAL_REQUESTED,
                    AuditOutcome.DENIED,
                    Actor(PrincipalType.ACCOUNT, attempt.account_id, attempt.account_name),
                    reason=APPROVAL_REQUIRED,
                    tsg_id=attempt.tsg_id,
                    tsg_path=attempt.tsg_path,
                    key_id=attempt.key_id,
                    key_version=attempt.key_version,
                    algorithm=attempt.algorithm,
                    digest=attempt.digest_hex,
                    context=attempt.context,
                    details=details,
                ),
            )
            return self._pending_wire(s, request, attempt.key_name, now)

    def request_for_account(self, account_id: str, request_id: str) -> p.SigningPending:
        """``GET /api/v1/signing/requests/{id}``: the state of a request made for this
        account; any other request is indistinguishable from a missing one."""
        now = self._clock.now()
        with self._db.write() as s:
            r = s.get(SigningRequestRow, request_id)
            if r is None or r.account_id != account_id:
                raise ApprovalRequestNotFound()
            self._expire_if_due(s, r, now)
            key = s.get(SigningKeyRow, r.key_id)
            return self._pending_wire(s, r, key.name if key else r.key_id, now)

    def _pending_wire(
        self, s: Session, r: SigningRequestRow, key_name: str, now: datetime
    ) -> p.SigningPending:
        decisions = self._decisions(s, r.id)
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
            grant=self._grant_wire(s, grant, now) if grant else None,
        )

    # ------------------------------------------------------------ approvers

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
                    self._expire_if_due(s, r, now, path)
                    if status is None or r.status == status.value:
                        out.append(self._wire(s, r, now))
        return sorted(out, key=lambda r: r.created_at)

    def get(self, principal: Principal, request_id: str) -> p.ApprovalRequest:
        now = self._clock.now()
        with self._db.write() as s:
            r, path = self._visible_request(s, principal, request_id)
            self._authz.require(
                principal, Permission.SIGNING_APPROVE, path, not_found=ApprovalRequestNotFound
            )
            self._expire_if_due(s, r, now, path)
            return self._wire(s, r, now)

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
                    self._mark_expired(s, r, path, now)
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
        return self._wire(s, r, now)

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
        self._record(
            s,
            EventKind.APPROVAL_APPROVED,
            principal,
            r,
            path,
            ctx,
            {"approvals": approvals, "required": r.required_approvals, "status": r.status},
        )
        if not complete:
            return
        grant = SigningGrantRow(
            id=new_id(),
            key_id=r.key_id,
            account_id=r.account_id,
            request_id=r.id,
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
            },
        )

    def pre_approve(
        self, principal: Principal, body: p.PreApprovalCreate, ctx: RequestContext
    ) -> p.ApprovalRequest:
        """An approver approves signing ahead of a release: a request for (key,
        account) made by that user and counting as its approval."""
        _check_terms(body.max_uses, body.unlimited, body.expires_in_hours)
        now = self._clock.now()
        with self._db.write() as s:
            key, path = self._approvable_key(s, principal, body.key, body.key_tsg_id)
            policy = approval_policy(key.policy_json)
            if policy is None:
                raise InvalidRequest("the key's policy does not require approval")
            if policy.approvers and principal.id not in policy.approvers:
                raise NotAnApprover("the key's policy names its approvers; you are not one")
            account = self._account_for(s, body.account, path)
            max_uses = None if body.unlimited else body.max_uses
            r = _new_request(
                policy,
                now,
                key_id=key.id,
                tsg_id=key.tsg_id,
                account_id=account.id,
                requested_by_type=principal.type.value,
                requested_by_id=principal.id,
                requested_by_name=principal.name,
                justification=body.comment,
            )
            s.add(r)
            s.flush()
            self._record(
                s,
                EventKind.APPROVAL_REQUESTED,
                principal,
                r,
                path,
                ctx,
                {"pre_approval": True, "account_id": account.id, "comment": body.comment},
            )
            self._add_decision(s, principal, r, APPROVE, body.comment, now)
            self._approved_by(s, principal, r, path, max_uses, body.expires_in_hours, now, ctx)
            s.flush()
            return self._wire(s, r, now)

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
                for g, k, a in s.execute(q).all():
                    out.append(_grant(g, k.name, a.name, now))
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
                        actor_of(principal),
                        tsg_id=key.tsg_id,
                        tsg_path=path,
                        key_id=key.id,
                        context=ctx,
                        details={
                            "grant_id": g.id,
                            "account_id": g.account_id,
                            "request_id": g.request_id,
                            "uses": g.uses,
                            "max_uses": g.max_uses,
                        },
                    ),
                )
            account = s.get(AccountRow, g.account_id)
            return _grant(g, key.name, account.name if account else None, now)

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

    def _decisions(self, s: Session, request_id: str) -> list[ApprovalDecisionRow]:
        return list(
            s.scalars(
                select(ApprovalDecisionRow)
                .where(ApprovalDecisionRow.request_id == request_id)
                .order_by(ApprovalDecisionRow.created_at)
            )
        )

    def expire_due(self, now: datetime) -> dict[str, int]:
        """Mark pending requests past their deadline expired (a scheduler job).

        Each request is claimed by a conditional UPDATE, so when several replicas
        sweep at once every request is expired, and audited, exactly once."""
        expired = 0
        with self._db.write() as s:
            due = s.execute(
                select(SigningRequestRow.id, SigningRequestRow.tsg_id)
                .where(
                    SigningRequestRow.status == ApprovalStatus.PENDING_APPROVAL.value,
                    SigningRequestRow.expires_at <= now,
                )
                .limit(EXPIRE_BATCH)
            ).all()
            for request_id, tsg_id in due:
                claimed = s.execute(
                    update(SigningRequestRow)
                    .where(
                        SigningRequestRow.id == request_id,
                        SigningRequestRow.status == ApprovalStatus.PENDING_APPROVAL.value,
                    )
                    .values(status=ApprovalStatus.EXPIRED.value, updated_at=now)
                    .execution_options(synchronize_session=False)
                )
                if claimed.rowcount != 1:  # type: ignore[attr-defined]  # another replica got there
                    continue
                row = s.get(SigningRequestRow, request_id)
                assert row is not None
                s.refresh(row)
                self._audit_expired(s, row, self._directory.require_path(s, tsg_id))
                expired += 1
        return {"expired": expired}

    def _expire_if_due(
        self, s: Session, r: SigningRequestRow, now: datetime, path: str | None = None
    ) -> None:
        if r.status == ApprovalStatus.PENDING_APPROVAL.value and r.expires_at <= now:
            self._mark_expired(s, r, path or self._directory.require_path(s, r.tsg_id), now)

    def _mark_expired(self, s: Session, r: SigningRequestRow, path: str, now: datetime) -> None:
        r.status = ApprovalStatus.EXPIRED.value
        r.updated_at = now
        self._audit_expired(s, r, path)

    def _audit_expired(self, s: Session, r: SigningRequestRow, path: str) -> None:
        self._recorder.record(
            s,
            AuditRecord(
                EventKind.APPROVAL_EXPIRED,
                AuditOutcome.SUCCEEDED,
                SYSTEM,
                tsg_id=r.tsg_id,
                tsg_path=path,
                key_id=r.key_id,
                details={"request_id": r.id, "account_id": r.account_id},
            ),
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
                actor_of(principal),
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
                actor_of(principal),
                reason=error.code,
                tsg_id=known.get("tsg_id", principal.tsg_id),
                tsg_path=known.get("tsg_path", principal.tsg_path),
                key_id=known.get("key_id"),
                context=ctx,
                details={"request_id": request_id[:64], "decision": decision},
            )
        )
        error.audited = True

    def _wire(self, s: Session, r: SigningRequestRow, now: datetime) -> p.ApprovalRequest:
        key = s.get(SigningKeyRow, r.key_id)
        account = s.get(AccountRow, r.account_id)
        decisions = self._decisions(s, r.id)
        grant = s.get(SigningGrantRow, r.grant_id) if r.grant_id else None
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
            digest_algorithm=r.digest_algorithm,
            digest=r.digest,
            scheme=r.scheme,
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
            grant=self._grant_wire(s, grant, now) if grant else None,
            expires_at=r.expires_at,
            created_at=r.created_at,
            updated_at=r.updated_at,
        )

    def _grant_wire(self, s: Session, g: SigningGrantRow, now: datetime) -> p.SigningGrant:
        key = s.get(SigningKeyRow, g.key_id)
        account = s.get(AccountRow, g.account_id)
        return _grant(g, key.name if key else g.key_id, account.name if account else None, now)


def _grant(
    g: SigningGrantRow, key_name: str, account_name: str | None, now: datetime
) -> p.SigningGrant:
    return p.SigningGrant(
        id=g.id,
        key_id=g.key_id,
        key_name=key_name,
        account_id=g.account_id,
        account_name=account_name,
        request_id=g.request_id,
        max_uses=g.max_uses,
        uses=g.uses,
        expires_at=g.expires_at,
        revoked_at=g.revoked_at,
        created_at=g.created_at,
        status=grant_status(g, now),
    )


def _check_terms(max_uses: int | None, unlimited: bool, expires_in_hours: int | None) -> None:
    # Unlimited uses are only ever granted for a bounded time (the rule).
    if unlimited and expires_in_hours is None:
        raise InvalidRequest("unlimited uses need an expiry (expires_in_hours)")
    if unlimited and max_uses is not None and max_uses != 1:
        raise InvalidRequest("give either max_uses or unlimited, not both")
