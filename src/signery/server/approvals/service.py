"""Approvals: signing requests, approvers' decisions and the grants they create.

A key whose policy has ``approval`` signs only for an account holding a valid
grant for it. Without one, the signing plane records a *signing request*
(HTTP 202) that approvers decide on; ``required_approvals`` distinct eligible
approvers approving it create the grant, one deny denies it.

What a grant signs is what its approvers saw. A request made by the signing
plane lists the (digest, digest_algorithm, scheme) items it covers: the
account's other signings with the key join its open request while no approver
has decided on it yet (a batch of files is one decision, up to
``MAX_REQUEST_DIGESTS``), and from the first decision on the set is fixed. The
grant it makes (scope ``digests``) signs exactly those items, each at most
``max_uses`` times. Only a pre-approval that says ``any_digest`` on purpose makes
a grant for any digest; its scope is shown to approvers, in the grant and in
every audit event.

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

Consuming a grant use is ONE conditional UPDATE (still valid, this digest,
uses left), so a single-use grant signs exactly once however many requests race
for it, and never another digest; the database decides, on every replica.
Deciding locks the request row (``FOR UPDATE`` on PostgreSQL; SQLite's ``BEGIN
IMMEDIATE`` serializes writers), so two approvers approving at once cannot make
two grants, and no digest joins a request while it is being decided.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import func, or_, select, true, update
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
    PrincipalType,
    SignatureScheme,
)
from signery.server.access.authz import Authorizer, Denied, Permission, Principal
from signery.server.access.context import RequestContext
from signery.server.accounts.models import AccountRow
from signery.server.approvals.models import (
    ApprovalDecisionRow,
    SigningGrantRow,
    SigningRequestDigestRow,
    SigningRequestRow,
)
from signery.server.audit.events import SYSTEM, Actor, AuditRecord, EventKind, outcome_of
from signery.server.audit.recorder import AuditRecorder
from signery.server.keys.models import SigningKeyRow
from signery.server.keys.policy import KeyPolicy
from signery.server.persistence.db import Database, flush_unique, new_id, table
from signery.server.runtime.clock import Clock
from signery.server.tsg.models import TsgRow
from signery.server.tsg.tree import TsgDirectory, rows_by_ref, visible_rows_by_ref

APPROVE = "approve"
DENY = "deny"
# Reasons recorded when an account had a grant for the key that no longer works.
GRANT_EXPIRED = "grant_expired"
GRANT_USED_UP = "grant_used_up"
GRANT_REVOKED = "grant_revoked"
GRANT_DIGEST_MISMATCH = "grant_digest_mismatch"
# Why the account's grants did not sign, most telling first (details.grant_state).
LAPSED = (
    ("digest_mismatch", GRANT_DIGEST_MISMATCH),
    ("used_up", GRANT_USED_UP),
    ("expired", GRANT_EXPIRED),
    ("revoked", GRANT_REVOKED),
)
APPROVAL_REQUIRED = "approval_required"
DIGESTS = GrantScope.DIGESTS.value
ANY_DIGEST = GrantScope.ANY_DIGEST.value

_G = table(SigningGrantRow)


# Requests expired per scheduler run (the rest wait for the next run).
EXPIRE_BATCH = 500


def approval_policy(policy_json: str | None) -> p.ApprovalPolicy | None:
    """The approval a key's policy requires (from the parsed policy,
    ``KeyPolicy.of``), or None when the key requires none. A policy that cannot
    be read raises (``KeyPolicy.parse``): it never signs without approval."""
    policy = KeyPolicy.of(policy_json)
    return policy.approval if policy is not None else None


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
    scope: GrantScope
    # The request item whose use was taken (bound grants).
    item_id: str | None = None


class _Item(NamedTuple):
    """What a signing signs, as requests and grants record it (hex digest)."""

    digest_algorithm: str
    digest: str
    scheme: str


class _Found(NamedTuple):
    id: str
    uses: int


def _digest_counts(s: Session, request_ids: Sequence[str]) -> dict[str, int]:
    """How many digests each of these requests lists."""
    if not request_ids:
        return {}
    rows = s.execute(
        select(SigningRequestDigestRow.request_id, func.count())
        .where(SigningRequestDigestRow.request_id.in_(request_ids))
        .group_by(SigningRequestDigestRow.request_id)
    )
    return {request_id: int(n) for request_id, n in rows}


def _matching_items(s: Session, request_ids: Sequence[str], item: _Item) -> dict[str, _Found]:
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
    return {request_id: _Found(item_id, uses) for request_id, item_id, uses in rows}


def _digest_row(
    request_id: str, position: int, item: _Item, now: datetime
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


def _digests_detail(items: Sequence[SigningRequestDigestRow]) -> list[dict[str, str]]:
    """The digests of a request, as audit events name them."""
    return [
        {"digest_algorithm": d.digest_algorithm, "digest": d.digest, "scheme": d.scheme}
        for d in items
    ]


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


def _narrowed(current: int | None, narrowing: int | None) -> int | None:
    """The smaller use limit; None is unlimited."""
    if narrowing is None:
        return current
    return narrowing if current is None else min(current, narrowing)


class ApprovalService:
    def __init__(
        self,
        *,
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
        """Take one use of a grant that covers this signing, or record the digest in
        a pending request (a new one, or the account's open one for the key).

        A grant covers a signing when it is live and either lists this exact
        (digest, digest_algorithm, scheme) with uses left, or is an ``any_digest``
        pre-approval with uses left. Bound grants are tried first (the narrowest
        permission), sooner-expiring first. Blocking database work: call from a
        worker thread, never the event loop."""
        now = self._clock.now()
        item = _Item(attempt.digest_algorithm, attempt.digest_hex, attempt.scheme)
        with self._db.read() as s:
            grants = list(
                s.scalars(
                    select(SigningGrantRow).where(
                        SigningGrantRow.key_id == attempt.key_id,
                        SigningGrantRow.account_id == attempt.account_id,
                    )
                )
            )
            bound = [g.request_id for g in grants if g.scope == DIGESTS and g.request_id]
            counts = _digest_counts(s, bound)
            matching = _matching_items(s, bound, item)
        states: set[str] = set()
        for g in sorted(grants, key=lambda g: (g.scope != DIGESTS, g.expires_at)):
            state = grant_status(g, now, counts.get(g.request_id or "", 0))
            if state == "valid" and g.scope == DIGESTS:
                found = matching.get(g.request_id or "")
                if found is None:
                    state = "digest_mismatch"
                elif g.max_uses is not None and found.uses >= g.max_uses:
                    state = "used_up"
                elif self._take_digest(g, found.id, item, now):
                    return GrantUse(g.id, GrantScope.DIGESTS, found.id)
            elif state == "valid" and self._take_any(g, now):
                return GrantUse(g.id, GrantScope.ANY_DIGEST)
            # Lost the race for its last use (or it was revoked meanwhile): try the next.
            states.add(state)
        lapsed = next((reason for state, reason in LAPSED if state in states), None)
        return self._pending(attempt, item, policy, lapsed, now)

    def _take_digest(self, g: SigningGrantRow, item_id: str, item: _Item, now: datetime) -> bool:
        """One use of a bound grant for exactly this item. The one conditional UPDATE
        checks, together, that the item is this (digest, algorithm, scheme) of the
        grant's request, that it has uses left and that the grant is still live, so
        neither a race nor a revocation lets a digest sign more often than granted."""
        g_live = (
            select(SigningGrantRow.id)
            .where(
                SigningGrantRow.id == g.id,
                SigningGrantRow.scope == DIGESTS,
                SigningGrantRow.revoked_at.is_(None),
                SigningGrantRow.expires_at > now,
            )
            .exists()
        )
        with self._db.write() as s:
            taken = s.execute(
                update(SigningRequestDigestRow)
                .where(
                    SigningRequestDigestRow.id == item_id,
                    SigningRequestDigestRow.request_id == g.request_id,
                    SigningRequestDigestRow.digest_algorithm == item.digest_algorithm,
                    SigningRequestDigestRow.digest == item.digest,
                    SigningRequestDigestRow.scheme == item.scheme,
                    true()
                    if g.max_uses is None  # max_uses never changes once granted
                    else SigningRequestDigestRow.uses < g.max_uses,
                    g_live,
                )
                .values(uses=SigningRequestDigestRow.uses + 1)
                .execution_options(synchronize_session=False)
            )
            if taken.rowcount != 1:  # type: ignore[attr-defined]
                return False
            # Same transaction: the grant's total follows its items.
            s.execute(
                update(SigningGrantRow)
                .where(SigningGrantRow.id == g.id)
                .values(uses=SigningGrantRow.uses + 1)
                .execution_options(synchronize_session=False)
            )
        return True

    def _take_any(self, g: SigningGrantRow, now: datetime) -> bool:
        """One use of an ``any_digest`` grant (one conditional UPDATE)."""
        with self._db.write() as s:
            taken = s.execute(
                update(SigningGrantRow)
                .where(
                    SigningGrantRow.id == g.id,
                    SigningGrantRow.scope == ANY_DIGEST,
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
        return bool(taken.rowcount == 1)  # type: ignore[attr-defined]

    def give_back(self, use: GrantUse) -> None:
        """Return a use taken by a signing that returned no signature."""
        with self._db.write() as s:
            if use.item_id is not None:
                s.execute(
                    update(SigningRequestDigestRow)
                    .where(
                        SigningRequestDigestRow.id == use.item_id,
                        SigningRequestDigestRow.uses > 0,
                    )
                    .values(uses=SigningRequestDigestRow.uses - 1)
                    .execution_options(synchronize_session=False)
                )
            s.execute(
                update(SigningGrantRow)
                .where(SigningGrantRow.id == use.grant_id, SigningGrantRow.uses > 0)
                .values(uses=SigningGrantRow.uses - 1)
                .execution_options(synchronize_session=False)
            )

    def _pending(
        self,
        attempt: SignAttempt,
        item: _Item,
        policy: p.ApprovalPolicy,
        lapsed: str | None,
        now: datetime,
    ) -> p.SigningPending:
        """The request approvers decide for this digest: one that already lists it,
        or a pending ``any_digest`` pre-approval of the account (approving it will
        cover this signing); else the account's open request for the key, which the
        digest joins (a batch of files is one decision) if no approver decided on
        it yet and it has room; else a new one."""
        with self._db.write() as s:
            # Serializes request creation per key on PostgreSQL (SQLite writers are
            # serialized already), so concurrent signings share one request. NO KEY
            # UPDATE: a decision inserting a grant (a foreign key to this row) is
            # not blocked by it, so it cannot deadlock with the request lock below.
            s.execute(
                select(SigningKeyRow.id)
                .where(SigningKeyRow.id == attempt.key_id)
                .with_for_update(key_share=True)
            )
            # Locked like a decision locks its request: a digest never joins a
            # request while an approver decides on it, and the decisions read below
            # include every one committed before (a decided request takes none).
            pending = list(
                s.scalars(
                    select(SigningRequestRow)
                    .where(
                        SigningRequestRow.key_id == attempt.key_id,
                        SigningRequestRow.account_id == attempt.account_id,
                        SigningRequestRow.status == ApprovalStatus.PENDING_APPROVAL.value,
                    )
                    .order_by(SigningRequestRow.created_at)
                    .with_for_update()
                )
            )
            live: list[SigningRequestRow] = []
            for r in pending:
                if r.expires_at <= now:
                    self._mark_expired(s, r, attempt.tsg_path, now)
                else:
                    live.append(r)
            ids = [r.id for r in live]
            listed = _matching_items(s, ids, item)
            counts = _digest_counts(s, ids)
            decided = set(
                s.scalars(
                    select(ApprovalDecisionRow.request_id).where(
                        ApprovalDecisionRow.request_id.in_(ids)
                    )
                )
            )
            request = next((r for r in live if r.id in listed), None) or next(
                (r for r in live if r.scope == ANY_DIGEST), None
            )
            reused = request is not None
            if request is None:
                # Only a request nobody decided on takes a new digest: an approver's
                # decision covers the set that approver saw, and nothing added later.
                request = next(
                    (
                        r
                        for r in live
                        if r.scope == DIGESTS
                        and r.id not in decided
                        and counts.get(r.id, 0) < p.MAX_REQUEST_DIGESTS
                    ),
                    None,
                )
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
                        scope=DIGESTS,
                        client_machine=attempt.context.machine,
                        client_tool=attempt.context.tool,
                        justification=attempt.justification,
                    )
                    s.add(request)
                    s.flush()
                request.updated_at = now
                s.add(_digest_row(request.id, counts.get(request.id, 0), item, now))
                s.flush()
                counts[request.id] = counts.get(request.id, 0) + 1
            details: dict[str, Any] = {
                "request_id": request.id,
                "reused": reused,
                "scope": request.scope,
                "digest_count": counts.get(request.id, 0),
            }
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
        if body.digest_count is not None:
            # The request row is locked: no digest joins between this check and the
            # decision, and none after it (a decided request takes no new digest).
            listed = _digest_counts(s, [r.id]).get(r.id, 0)
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
        # What this approver approved: the scope and every digest (the set is fixed
        # from the first decision on, so each approval names the same set).
        covers = {"scope": r.scope, "digests": _digests_detail(self._items(s, r.id))}
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
            r = _new_request(
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
            rows = [_digest_row(r.id, i, item, now) for i, item in enumerate(items)]
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
                found = s.execute(q).all()
                items = self._items_of(s, [g.request_id for g, _, _ in found if g.request_id])
                for g, k, a in found:
                    out.append(_grant(g, k.name, a.name, items.get(g.request_id or "", []), now))
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
            items = self._items(s, g.request_id) if g.request_id else []
            return _grant(g, key.name, account.name if account else None, items, now)

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

    def _wire(self, s: Session, r: SigningRequestRow, now: datetime) -> p.ApprovalRequest:
        key = s.get(SigningKeyRow, r.key_id)
        account = s.get(AccountRow, r.account_id)
        decisions = self._decisions(s, r.id)
        grant = s.get(SigningGrantRow, r.grant_id) if r.grant_id else None
        items = self._items(s, r.id)
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
            digests=[_approved(d) for d in items],
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
            grant=self._grant_wire(s, grant, now, items) if grant else None,
            expires_at=r.expires_at,
            created_at=r.created_at,
            updated_at=r.updated_at,
        )

    def _grant_wire(
        self,
        s: Session,
        g: SigningGrantRow,
        now: datetime,
        items: list[SigningRequestDigestRow] | None = None,
    ) -> p.SigningGrant:
        key = s.get(SigningKeyRow, g.key_id)
        account = s.get(AccountRow, g.account_id)
        if items is None:
            items = self._items(s, g.request_id) if g.request_id else []
        return _grant(
            g, key.name if key else g.key_id, account.name if account else None, items, now
        )

    def _items(self, s: Session, request_id: str) -> list[SigningRequestDigestRow]:
        """The digests a request lists, in the order they arrived."""
        return self._items_of(s, [request_id]).get(request_id, [])

    def _items_of(
        self, s: Session, request_ids: Sequence[str]
    ) -> dict[str, list[SigningRequestDigestRow]]:
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


def _approved(d: SigningRequestDigestRow) -> p.ApprovedDigest:
    return p.ApprovedDigest(
        digest_algorithm=p.DigestAlgorithm(d.digest_algorithm),
        digest=d.digest,
        scheme=p.SignatureScheme(d.scheme),
        uses=d.uses,
    )


def _grant(
    g: SigningGrantRow,
    key_name: str,
    account_name: str | None,
    items: Sequence[SigningRequestDigestRow],
    now: datetime,
) -> p.SigningGrant:
    bound = g.scope == DIGESTS
    return p.SigningGrant(
        id=g.id,
        key_id=g.key_id,
        key_name=key_name,
        account_id=g.account_id,
        account_name=account_name,
        request_id=g.request_id,
        scope=GrantScope(g.scope),
        digests=[_approved(d) for d in items] if bound else [],
        max_uses=g.max_uses,
        uses=g.uses,
        expires_at=g.expires_at,
        revoked_at=g.revoked_at,
        created_at=g.created_at,
        status=grant_status(g, now, len(items)),
    )


def _pre_approved_items(body: p.PreApprovalCreate) -> list[_Item]:
    """The digests a pre-approval lists: required with scope ``digests`` (each the
    right length for its algorithm), refused with ``any_digest``, which must be
    said on purpose and lists nothing."""
    if body.scope is GrantScope.ANY_DIGEST:
        if body.digests is not None:
            raise InvalidRequest("scope any_digest lists no digests; use scope digests")
        return []
    if not body.digests:
        raise InvalidRequest("scope digests needs the digests it approves")
    items: dict[_Item, None] = {}
    for d in body.digests:
        try:
            raw = bytes.fromhex(d.digest)
        except ValueError:
            raise InvalidRequest("each digest is hexadecimal, two digits a byte") from None
        # DigestLengthMismatch for a digest of the wrong length for its algorithm.
        hashed = Hashed(d.digest_algorithm, raw)
        items[_Item(hashed.algorithm.value, hashed.hex, d.scheme.value)] = None
    return list(items)


def _check_terms(max_uses: int | None, unlimited: bool, expires_in_hours: int | None) -> None:
    # Unlimited uses are only ever granted for a bounded time (the rule).
    if unlimited and expires_in_hours is None:
        raise InvalidRequest("unlimited uses need an expiry (expires_in_hours)")
    if unlimited and max_uses is not None and max_uses != 1:
        raise InvalidRequest("give either max_uses or unlimited, not both")
