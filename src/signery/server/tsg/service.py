"""Tenant Security Groups: the access boundaries, arranged in a tree."""

from __future__ import annotations

import secrets
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from signery import protocol as p
from signery.errors import InvalidRequest, NameTaken, TsgNotFound
from signery.protocol import AuditOutcome
from signery.server.access.authz import Authorizer, Permission, Principal
from signery.server.access.context import RequestContext
from signery.server.audit.events import Actor, AuditRecord, EventKind
from signery.server.audit.recorder import AuditRecorder
from signery.server.persistence.db import Database, flush_unique
from signery.server.runtime.clock import Clock
from signery.server.tsg.models import TsgRow
from signery.server.tsg.tree import TsgDirectory

TSG_ID_MIN = 1_000_000_000  # 10 digits, no leading zero
TSG_ID_SPAN = 9_000_000_000
MAX_DEPTH = 16


def new_tsg_id() -> str:
    return str(TSG_ID_MIN + secrets.randbelow(TSG_ID_SPAN))


def to_wire(row: TsgRow) -> p.Tsg:
    return p.Tsg(
        id=row.id,
        name=row.name,
        parent_id=row.parent_id,
        depth=row.depth,
        created_at=row.created_at,
    )


def insert_tsg(
    session: Session, name: str, parent: TsgRow | None, now: datetime, *, tsg_id: str | None = None
) -> TsgRow:
    """Insert a TSG row with a fresh 10-digit id (retrying on the rare collision)."""
    chosen = tsg_id
    for _ in range(8):
        tsg_id = chosen or new_tsg_id()
        if session.get(TsgRow, tsg_id) is not None:
            if chosen:
                raise NameTaken(f"TSG id {chosen} is taken")
            continue
        path = f"{parent.path if parent else '/'}{tsg_id}/"
        row = TsgRow(
            id=tsg_id,
            name=name,
            parent_id=parent.id if parent else None,
            path=path,
            depth=(parent.depth + 1) if parent else 0,
            created_at=now,
        )
        session.add(row)
        return row
    raise RuntimeError("could not find a free TSG id")  # pragma: no cover - 1 in 10^9 odds, 8 times


class TsgService:
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

    def create(self, principal: Principal, req: p.TsgCreate, ctx: RequestContext) -> p.Tsg:
        parent_id = req.parent_id or principal.tsg_id
        with self._db.write() as s:
            parent = s.get(TsgRow, parent_id)
            if parent is None:
                raise TsgNotFound()
            self._authz.require(
                principal, Permission.TSG_CREATE, parent.path, not_found=TsgNotFound
            )
            if parent.depth + 1 >= MAX_DEPTH:
                raise InvalidRequest(f"TSG trees are limited to {MAX_DEPTH} levels")
            if s.scalar(
                select(TsgRow.id).where(TsgRow.parent_id == parent.id, TsgRow.name == req.name)
            ):
                raise NameTaken(f"a TSG named {req.name!r} already exists under {parent.id}")
            row = insert_tsg(s, req.name, parent, self._clock.now())
            flush_unique(s, NameTaken(f"a TSG named {req.name!r} already exists there"))
            self._recorder.record(
                s,
                AuditRecord(
                    EventKind.TSG_CREATED,
                    AuditOutcome.SUCCEEDED,
                    Actor.of(principal),
                    tsg_id=row.id,
                    tsg_path=row.path,
                    context=ctx,
                    details={"name": row.name, "parent_id": parent.id},
                ),
            )
            return to_wire(row)

    def get(self, principal: Principal, tsg_id: str) -> p.Tsg:
        with self._db.read() as s:
            row = s.get(TsgRow, tsg_id)
            if row is None:
                raise TsgNotFound()
            self._authz.require(principal, Permission.TSG_READ, row.path, not_found=TsgNotFound)
            return to_wire(row)

    def list_tsgs(self, principal: Principal) -> list[p.Tsg]:
        scopes = self._authz.scopes(principal, Permission.TSG_READ)
        with self._db.read() as s:
            rows: list[TsgRow] = []
            for scope in scopes:
                rows.extend(
                    s.scalars(select(TsgRow).where(TsgRow.path.startswith(scope, autoescape=True)))
                )
        rows.sort(key=lambda r: (r.path.count("/"), r.path))
        return [to_wire(r) for r in rows]

    def tree(self, principal: Principal, tsg_id: str | None = None) -> list[p.TsgTree]:
        """The visible forest (or the subtree under ``tsg_id``), children sorted by name."""
        tsgs = self.list_tsgs(principal)
        if tsg_id is not None:
            self.get(principal, tsg_id)
        by_parent: dict[str | None, list[p.Tsg]] = {}
        ids = {t.id for t in tsgs}
        for t in tsgs:
            by_parent.setdefault(t.parent_id if t.parent_id in ids else None, []).append(t)

        def build(t: p.Tsg) -> p.TsgTree:
            kids = sorted(by_parent.get(t.id, []), key=lambda c: c.name)
            return p.TsgTree(id=t.id, name=t.name, children=[build(k) for k in kids])

        if tsg_id is not None:
            return [build(next(t for t in tsgs if t.id == tsg_id))]
        return [build(t) for t in sorted(by_parent.get(None, []), key=lambda c: c.name)]
