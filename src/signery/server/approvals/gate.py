"""The approval gate the signing plane calls for a key whose policy has ``approval``.

Such a key signs only for an account holding a valid grant for it. Without one,
the gate records a *signing request* (HTTP 202) that approvers decide on
(``approvals/service.py``). The account's other signings with the key join its
open request while no approver has decided on it yet (a batch of files is one
decision, up to ``MAX_REQUEST_DIGESTS``); from the first decision on the set is
fixed.

Consuming a grant use is ONE conditional UPDATE (still valid, this digest, uses
left), so a single-use grant signs exactly once however many requests race for
it, and never another digest; the database decides, on every replica. A digest
joins a request only under the request row's lock, the lock a decision takes,
so no digest joins a request while it is being decided.

Blocking database work throughout: the signing service calls it from a worker
thread, never the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import or_, select, true, update
from sqlalchemy.orm import Session

from signery import protocol as p
from signery.errors import ApprovalRequestNotFound
from signery.protocol import ApprovalStatus, AuditOutcome, GrantScope, PrincipalType
from signery.server.access.context import RequestContext
from signery.server.approvals.expiry import ApprovalExpiry
from signery.server.approvals.models import (
    ApprovalDecisionRow,
    SigningGrantRow,
    SigningRequestDigestRow,
    SigningRequestRow,
)
from signery.server.approvals.records import (
    ANY_DIGEST,
    DIGESTS,
    Item,
    digest_counts,
    digest_row,
    grant_status,
    matching_items,
    new_request,
)
from signery.server.approvals.wire import pending_wire
from signery.server.audit.events import Actor, AuditRecord, EventKind
from signery.server.audit.recorder import AuditRecorder
from signery.server.keys.models import SigningKeyRow
from signery.server.persistence.db import Database
from signery.server.runtime.clock import Clock

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


class ApprovalGate:
    """Admission of signings with keys that require approval (the signing service's
    one collaborator for approvals)."""

    def __init__(
        self, *, db: Database, recorder: AuditRecorder, clock: Clock, expiry: ApprovalExpiry
    ) -> None:
        self._db = db
        self._recorder = recorder
        self._clock = clock
        self._expiry = expiry

    def admit(self, attempt: SignAttempt, policy: p.ApprovalPolicy) -> GrantUse | p.SigningPending:
        """Take one use of a grant that covers this signing, or record the digest in
        a pending request (a new one, or the account's open one for the key).

        A grant covers a signing when it is live and either lists this exact
        (digest, digest_algorithm, scheme) with uses left, or is an ``any_digest``
        pre-approval with uses left. Bound grants are tried first (the narrowest
        permission), sooner-expiring first. Blocking database work: call from a
        worker thread, never the event loop."""
        now = self._clock.now()
        item = Item(attempt.digest_algorithm, attempt.digest_hex, attempt.scheme)
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
            counts = digest_counts(s, bound)
            matching = matching_items(s, bound, item)
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

    def _take_digest(self, g: SigningGrantRow, item_id: str, item: Item, now: datetime) -> bool:
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
        item: Item,
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
            live = self._live_requests(s, attempt, now)
            request, reused, digest_count = self._request_for(s, attempt, item, policy, live, now)
            self._audit_requested(s, attempt, request, reused, digest_count, lapsed)
            return pending_wire(s, request, attempt.key_name, now)

    def _live_requests(
        self, s: Session, attempt: SignAttempt, now: datetime
    ) -> list[SigningRequestRow]:
        """The account's pending requests for the key, locked, oldest first; those
        past their time are marked expired on the way."""
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
                self._expiry.mark_expired(s, r, attempt.tsg_path, now)
            else:
                live.append(r)
        return live

    def _request_for(
        self,
        s: Session,
        attempt: SignAttempt,
        item: Item,
        policy: p.ApprovalPolicy,
        live: list[SigningRequestRow],
        now: datetime,
    ) -> tuple[SigningRequestRow, bool, int]:
        """The request for this item among the live ones (the digest joining it if
        it did not list it), or a new one; whether it was reused, and how many
        digests it lists."""
        ids = [r.id for r in live]
        listed = matching_items(s, ids, item)
        counts = digest_counts(s, ids)
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
                request = new_request(
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
            s.add(digest_row(request.id, counts.get(request.id, 0), item, now))
            s.flush()
            counts[request.id] = counts.get(request.id, 0) + 1
        return request, reused, counts.get(request.id, 0)

    def _audit_requested(
        self,
        s: Session,
        attempt: SignAttempt,
        request: SigningRequestRow,
        reused: bool,
        digest_count: int,
        lapsed: str | None,
    ) -> None:
        details: dict[str, Any] = {
            "request_id": request.id,
            "reused": reused,
            "scope": request.scope,
            "digest_count": digest_count,
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

    def request_for_account(self, account_id: str, request_id: str) -> p.SigningPending:
        """``GET /api/v1/signing/requests/{id}``: the state of a request made for this
        account; any other request is indistinguishable from a missing one."""
        now = self._clock.now()
        with self._db.write() as s:
            r = s.get(SigningRequestRow, request_id)
            if r is None or r.account_id != account_id:
                raise ApprovalRequestNotFound()
            self._expiry.expire_if_due(s, r, now)
            key = s.get(SigningKeyRow, r.key_id)
            return pending_wire(s, r, key.name if key else r.key_id, now)
