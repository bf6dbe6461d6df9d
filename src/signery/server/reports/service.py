"""Reading the audit trail and the usage counters (read-only, authorized by TSG)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import date, datetime
from typing import Any

from sqlalchemy import Row, Select, Subquery, false, func, literal, null, or_, select

from signery import protocol as p
from signery.errors import InvalidRequest
from signery.protocol import AuditOutcome, PrincipalType
from signery.server.access.authz import Authorizer, Permission, Principal
from signery.server.accounts.models import AccountRow
from signery.server.audit.models import AuditEventRow, UsageCounterRow, UsageDailyRow
from signery.server.audit.wire import event_to_wire
from signery.server.ca.models import CaAuthorityRow
from signery.server.keys.models import KeyVersionRow, SigningKeyRow
from signery.server.persistence.db import Database
from signery.server.tsa.authority import TSA
from signery.server.tsg.models import TsgRow

MAX_PAGE = 1000
MAX_SEQ = 2**63 - 1  # audit_events.seq: a signed 64-bit integer
JSONL = "application/jsonl"
CSV = "text/csv; charset=utf-8"
# A cell starting with one of these is taken for a formula by spreadsheets (OWASP
# "CSV injection"); such a cell gets a leading quote, and so does one that starts
# with a quote, so that the escaping can be undone without ambiguity.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")


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
    # Events up to this seq only (an export is a cut of the trail as it began).
    through_seq: int | None = None


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
        if f.through_seq is not None:
            q = q.where(ev.seq <= f.through_seq)
        if f.cursor:
            # A cursor is a seq: digits only (int() takes " +1_0" too), within
            # the 64-bit column (a larger number overflows the database driver).
            digits = f.cursor.isascii() and f.cursor.isdigit()
            if not digits or len(f.cursor) > len(str(MAX_SEQ)) or int(f.cursor) > MAX_SEQ:
                raise InvalidRequest("cursor is not valid")
            after = int(f.cursor)
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

    def export(
        self,
        principal: Principal,
        since: datetime | None,
        until: datetime | None,
        fmt: p.ExportFormat,
    ) -> Iterator[str]:
        """The events the principal may read, oldest first, as JSON lines or CSV, one
        page of events at a time (memory stays bounded whatever the trail's size).

        The first page is read before anything is sent, so that a refused or
        malformed request is an error response, not a truncated stream; the export
        stops at the newest event that existed when it began."""
        with self._db.read() as s:
            last = s.scalar(select(func.max(AuditEventRow.seq))) or 0
        f = EventFilter(since=since, until=until, limit=MAX_PAGE, through_seq=last)
        first = self.events(principal, f)
        return self._pages(principal, f, first, fmt)

    def _pages(
        self, principal: Principal, f: EventFilter, page: p.AuditEventPage, fmt: p.ExportFormat
    ) -> Iterator[str]:
        encode = _csv_page if fmt is p.ExportFormat.CSV else _jsonl_page
        if fmt is p.ExportFormat.CSV:
            yield _csv_rows([_csv_columns()])
        while True:
            yield encode(page.events)
            if page.next_cursor is None:
                return
            page = self.events(principal, replace(f, cursor=page.next_cursor))

    def usage(self, principal: Principal, q: UsageQuery) -> p.UsageReport:
        """Usage counters of the keys, key versions, accounts and TSAs the principal
        may see: the lifetime counters, or sums of the daily counters over a period
        (``since``/``until``, days inclusive), optionally one row per day; ``top``
        keeps the N subjects of each type with the most successes."""
        if q.top is not None and not 1 <= q.top <= MAX_PAGE:
            raise InvalidRequest(f"top must be between 1 and {MAX_PAGE}")
        if q.since and q.until and q.since > q.until:
            raise InvalidRequest("since is after until")
        scopes = self._authz.scopes(principal, Permission.USAGE_READ)
        daily = q.since is not None or q.until is not None or q.by_day
        out: list[p.UsageCounter] = []
        with self._db.read() as s:
            for kind in p.UsageScope:
                if q.scope not in (None, kind):
                    continue
                top_ids: list[str] | None = None
                if q.top is not None and q.by_day:
                    # The top subjects over the whole period, then their days.
                    totals = _subject_query(kind, _totals(q, by_day=False), scopes, q.tsg_id)
                    top_ids = [r.subject_id for r in s.execute(_top(totals, q.top)).all()]
                source = _totals(q, by_day=q.by_day) if daily else _lifetime()
                stmt = _subject_query(kind, source, scopes, q.tsg_id)
                if top_ids is not None:
                    stmt = stmt.where(source.c.subject_id.in_(top_ids))
                elif q.top is not None:
                    stmt = _top(stmt, q.top)
                out.extend(_counter(kind, r) for r in s.execute(stmt).all())
        out.sort(key=lambda c: (c.day or date.min, c.subject_type, -c.successes, c.name or ""))
        return p.UsageReport(since=q.since, until=q.until, counters=out)


def _jsonl_page(events: list[p.AuditEvent]) -> str:
    # ensure_ascii: every control character, and U+2028/U+2029 that some line
    # splitters honour, is escaped, so no client string can start a line.
    return "".join(
        json.dumps(e.model_dump(mode="json"), ensure_ascii=True, separators=(",", ":")) + "\n"
        for e in events
    )


def _csv_columns() -> list[str]:
    """The event's fields in wire order, the principal flattened into three."""
    columns: list[str] = []
    for name in p.AuditEvent.model_fields:
        if name == "principal":
            columns += ["principal_type", "principal_id", "principal_name"]
        else:
            columns.append(name)
    return columns


def _csv_cell(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def _csv_page(events: list[p.AuditEvent]) -> str:
    columns = _csv_columns()
    rows = []
    for e in events:
        data = e.model_dump(mode="json")
        principal = data.pop("principal")
        data["principal_type"] = principal["type"]
        data["principal_id"] = principal["id"]
        data["principal_name"] = principal["name"]
        data["details"] = json.dumps(data["details"], sort_keys=True, separators=(",", ":"))
        rows.append([_csv_cell(data[c]) for c in columns])
    return _csv_rows(rows)


def _csv_rows(rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    # RFC 4180: CRLF line ends; cells with a comma, quote or line break are quoted,
    # so a client string's newline stays inside its cell.
    csv.writer(buf, lineterminator="\r\n").writerows(rows)
    return buf.getvalue()


@dataclass(frozen=True, slots=True)
class UsageQuery:
    scope: p.UsageScope | None = None
    tsg_id: str | None = None
    since: date | None = None  # first day counted (UTC)
    until: date | None = None  # last day counted (UTC), inclusive
    top: int | None = None
    by_day: bool = False


_COUNTS = ("successes", "failures", "denied")


def _lifetime() -> Subquery:
    c = UsageCounterRow
    return select(
        c.scope,
        c.subject_id,
        c.successes,
        c.failures,
        c.denied,
        c.last_used_at,
        null().label("day"),
    ).subquery("counts")


def _totals(q: UsageQuery, *, by_day: bool) -> Subquery:
    d = UsageDailyRow
    day = d.day if by_day else null()
    stmt = select(
        d.scope,
        d.subject_id,
        *[func.sum(getattr(d, n)).label(n) for n in _COUNTS],
        null().label("last_used_at"),
        day.label("day"),
    )
    if q.since is not None:
        stmt = stmt.where(d.day >= q.since)
    if q.until is not None:
        stmt = stmt.where(d.day <= q.until)
    group = [d.scope, d.subject_id, d.day] if by_day else [d.scope, d.subject_id]
    return stmt.group_by(*group).subquery("counts")


def _subject_query(
    kind: p.UsageScope, counts: Subquery, scopes: list[str], tsg_id: str | None
) -> Select[Any]:
    """The counters of one kind of subject, with the subject's name and TSG, limited
    to the TSGs the caller may see."""
    name: Any
    extra: list[Any] = [null().label("key_id"), null().label("version")]
    if kind is p.UsageScope.KEY_VERSION:
        stmt = select(counts).join(KeyVersionRow, KeyVersionRow.id == counts.c.subject_id)
        stmt = stmt.join(SigningKeyRow, SigningKeyRow.id == KeyVersionRow.key_id)
        name, owner = SigningKeyRow.name, SigningKeyRow.tsg_id
        extra = [KeyVersionRow.key_id.label("key_id"), KeyVersionRow.version.label("version")]
        counted_as = "key_version"
    elif kind is p.UsageScope.TSA:
        # The TSA's counters are kept under its ca_authorities row id (scope "key").
        stmt = select(counts).join(CaAuthorityRow, CaAuthorityRow.id == counts.c.subject_id)
        stmt = stmt.where(CaAuthorityRow.role == TSA)
        name, owner = literal(TSA), CaAuthorityRow.tsg_id
        counted_as = "key"
    else:
        model = SigningKeyRow if kind is p.UsageScope.KEY else AccountRow
        stmt = select(counts).join(model, model.id == counts.c.subject_id)
        name, owner = model.name, model.tsg_id
        counted_as = kind.value
    stmt = (
        stmt.add_columns(name.label("name"), owner.label("owner_tsg"), *extra)
        .join(TsgRow, TsgRow.id == owner)
        .where(counts.c.scope == counted_as)
        .where(or_(false(), *[TsgRow.path.startswith(sc, autoescape=True) for sc in scopes]))
    )
    if tsg_id:
        stmt = stmt.where(owner == tsg_id)
    return stmt


def _top(stmt: Select[Any], n: int) -> Select[Any]:
    # Ties broken by id, so that the same data always gives the same top N.
    return stmt.order_by(
        stmt.selected_columns.successes.desc(), stmt.selected_columns.subject_id
    ).limit(n)


def _counter(kind: p.UsageScope, r: Row[Any]) -> p.UsageCounter:
    return p.UsageCounter(
        subject_type=kind.value,
        subject_id=r.subject_id,
        name=r.name,
        tsg_id=r.owner_tsg,
        key_id=r.key_id,
        version=r.version,
        # Sums come back as Decimal on PostgreSQL, dates as strings on SQLite subqueries.
        day=date.fromisoformat(r.day) if isinstance(r.day, str) else r.day,
        successes=int(r.successes or 0),
        failures=int(r.failures or 0),
        denied=int(r.denied or 0),
        last_used_at=r.last_used_at,
    )
