"""Reading the audit trail and the usage counters (read-only, authorized by TSG)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import false, or_, select
from sqlalchemy.orm import Session

from signery import protocol as p
from signery.errors import InvalidRequest
from signery.protocol import AuditOutcome, PrincipalType
from signery.server.accounts.models import AccountRow
from signery.server.audit.models import AuditEventRow, UsageCounterRow
from signery.server.authz import Authorizer, Permission, Principal
from signery.server.ca.models import CaAuthorityRow
from signery.server.ca.tsa import TSA
from signery.server.db import Database
from signery.server.keys.models import SigningKeyRow
from signery.server.tsg.models import TsgRow

MAX_PAGE = 1000


@dataclass(frozen=True, slots=True)
class EventFilter:
    tsg_id: str | None = None
    key_id: str | None = None
    account_id: str | None = None
    outcome: AuditOutcome | None = None
    kind: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    limit: int = 100
    cursor: str | None = None
    descending: bool = False


def event_to_wire(row: AuditEventRow) -> p.AuditEvent:
    return p.AuditEvent(
        id=row.id,
        seq=row.seq,
        time=row.time,
        kind=row.kind,
        outcome=AuditOutcome(row.outcome),
        reason=row.reason,
        tsg_id=row.tsg_id,
        principal=p.AuditPrincipal(
            type=PrincipalType(row.principal_type), id=row.principal_id, name=row.principal_name
        ),
        key_id=row.key_id,
        key_version=row.key_version,
        algorithm=row.algorithm,
        digest=row.digest,
        client_ip=row.client_ip,
        user_agent=row.user_agent,
        client_machine=row.client_machine,
        client_tool=row.client_tool,
        request_id=row.request_id,
        node_id=row.node_id,
        details=json.loads(row.details or "{}"),
        tsg_path=row.tsg_path,
        node_seq=row.node_seq,
        prev_hash=row.prev_hash,
        hash=row.hash,
    )


class AuditService:
    def __init__(self, db: Database, authz: Authorizer) -> None:
        self._db = db
        self._authz = authz

    def events(self, principal: Principal, f: EventFilter) -> p.AuditEventPage:
        """Events the principal may read, oldest first (or newest first), paged by cursor.

        Events outside any TSG (e.g. failed logins by unknown callers) are shown
        only to auditors of the whole installation (a scope at the root TSG)."""
        if not 1 <= f.limit <= MAX_PAGE:
            raise InvalidRequest(f"limit must be between 1 and {MAX_PAGE}")
        scopes = self._authz.scopes(principal, Permission.AUDIT_READ)
        if not scopes:
            return p.AuditEventPage(events=[], next_cursor=None)
        ev = AuditEventRow
        conds = [ev.tsg_path.startswith(s, autoescape=True) for s in scopes]
        if any(s.count("/") == 2 for s in scopes):  # "/<root>/": the whole installation
            conds.append(ev.tsg_path.is_(None))
        q = select(ev).where(or_(*conds))
        if f.tsg_id:
            # Events of that TSG and its descendants (the scope check above still applies).
            tsg_path = select(TsgRow.path).where(TsgRow.id == f.tsg_id).scalar_subquery()
            q = q.where(ev.tsg_path.startswith(tsg_path))
        if f.key_id:
            q = q.where(ev.key_id == f.key_id)
        if f.account_id:
            q = q.where(
                ev.principal_type == PrincipalType.ACCOUNT.value, ev.principal_id == f.account_id
            )
        if f.outcome:
            q = q.where(ev.outcome == f.outcome.value)
        if f.kind:
            q = q.where(ev.kind.startswith(f.kind, autoescape=True))
        if f.since:
            q = q.where(ev.time >= f.since)
        if f.until:
            q = q.where(ev.time < f.until)
        if f.cursor:
            try:
                after = int(f.cursor)
            except ValueError:
                raise InvalidRequest("cursor is not valid") from None
            q = q.where(ev.seq < after if f.descending else ev.seq > after)
        q = q.order_by(ev.seq.desc() if f.descending else ev.seq).limit(f.limit + 1)
        with self._db.read() as s:
            rows = list(s.scalars(q))
        more = len(rows) > f.limit
        rows = rows[: f.limit]
        return p.AuditEventPage(
            events=[event_to_wire(r) for r in rows],
            next_cursor=str(rows[-1].seq) if more and rows else None,
        )

    def usage(
        self, principal: Principal, scope: str | None = None, tsg_id: str | None = None
    ) -> p.UsageReport:
        if scope not in (None, "key", "account", "tsa"):
            raise InvalidRequest("scope must be key, account or tsa")
        scopes = self._authz.scopes(principal, Permission.USAGE_READ)
        out: list[p.UsageCounter] = []
        with self._db.read() as s:
            for subject_scope, model in (("key", SigningKeyRow), ("account", AccountRow)):
                if scope not in (None, subject_scope):
                    continue
                q = (
                    select(UsageCounterRow, model.name, model.tsg_id)
                    .join(model, model.id == UsageCounterRow.subject_id)
                    .join(TsgRow, TsgRow.id == model.tsg_id)
                    .where(UsageCounterRow.scope == subject_scope)
                    .where(
                        or_(
                            false(), *[TsgRow.path.startswith(sc, autoescape=True) for sc in scopes]
                        )
                    )
                )
                if tsg_id:
                    q = q.where(model.tsg_id == tsg_id)
                for counter, name, owner_tsg in s.execute(q).all():
                    out.append(
                        p.UsageCounter(
                            subject_type=subject_scope,
                            subject_id=counter.subject_id,
                            name=name,
                            tsg_id=owner_tsg,
                            successes=counter.successes,
                            failures=counter.failures,
                            last_used_at=counter.last_used_at,
                        )
                    )
            if scope in (None, "tsa"):
                out.extend(self._tsa_usage(s, scopes, tsg_id))
        out.sort(key=lambda c: (c.subject_type, -c.successes, c.name or ""))
        return p.UsageReport(counters=out)

    @staticmethod
    def _tsa_usage(s: Session, scopes: list[str], tsg_id: str | None) -> list[p.UsageCounter]:
        """The time-stamping authority's counters: timestamps issued (successes) and
        queries refused (failures). The recorder counts them under the TSA's key id
        (scope "key"); the TSA is found by its ``ca_authorities`` row."""
        q = (
            select(UsageCounterRow, CaAuthorityRow.tsg_id)
            .join(CaAuthorityRow, CaAuthorityRow.id == UsageCounterRow.subject_id)
            .join(TsgRow, TsgRow.id == CaAuthorityRow.tsg_id)
            .where(UsageCounterRow.scope == "key", CaAuthorityRow.role == TSA)
            .where(or_(false(), *[TsgRow.path.startswith(sc, autoescape=True) for sc in scopes]))
        )
        if tsg_id:
            q = q.where(CaAuthorityRow.tsg_id == tsg_id)
        return [
            p.UsageCounter(
                subject_type="tsa",
                subject_id=counter.subject_id,
                name=TSA,
                tsg_id=owner_tsg,
                successes=counter.successes,
                failures=counter.failures,
                last_used_at=counter.last_used_at,
            )
            for counter, owner_tsg in s.execute(q).all()
        ]
