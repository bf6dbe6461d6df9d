"""The TSG tree as every domain reads it: where a TSG sits (its materialized
path, cached forever since paths never change), and the rows of a table that a
reference names within that tree. Ground floor: it imports no domain service, so
that keys, accounts, approvals, the CA and the connectors share it without
depending on the TSG service."""

from __future__ import annotations

import threading
from typing import Protocol, TypeVar, cast

from sqlalchemy import or_, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from signery.errors import ConfigurationError, TsgNotFound
from signery.refs import KeyRef
from signery.server.access.authz import Principal
from signery.server.persistence import meta
from signery.server.tsg.models import TsgRow


class InTsg(Protocol):
    """A row with an id and a name that belongs to one TSG (signing keys,
    accounts, CA connectors...)."""

    @property
    def id(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def tsg_id(self) -> str: ...


Row = TypeVar("Row", bound=InTsg)


class _Columns(Protocol):
    """The same, seen on the mapped class: its attributes are columns."""

    id: InstrumentedAttribute[str]
    name: InstrumentedAttribute[str]
    tsg_id: InstrumentedAttribute[str]


def rows_by_ref(
    s: Session, model: type[Row], ref: str, *, tsg_id: str | None = None
) -> list[tuple[Row, str]]:
    """Rows of ``model`` (a table with ``id``, ``name`` and ``tsg_id``) whose name is
    ``ref``, or whose id is ``ref`` when it looks like one (``KeyRef``), each with its TSG's
    path; only in TSG ``tsg_id`` when given. Who may see them is the caller's
    business (``visible_rows_by_ref``)."""
    table = cast(_Columns, model)  # a mapped class of InTsg rows
    is_id = KeyRef.parse(ref).is_id
    matches = or_(table.id == ref, table.name == ref) if is_id else table.name == ref
    q = select(model, TsgRow.path).join(TsgRow, TsgRow.id == table.tsg_id).where(matches)
    if tsg_id:
        q = q.where(table.tsg_id == tsg_id)
    return [(row, path) for row, path in s.execute(q).all()]


def visible_rows_by_ref(
    s: Session, principal: Principal, model: type[Row], ref: str, tsg_id: str | None = None
) -> list[tuple[Row, str]]:
    """``rows_by_ref`` limited to the subtrees where ``principal`` holds any role:
    what it may know exists (the permission is checked by the caller, once the
    row is chosen, so that an unseen row answers 404 like a missing one)."""
    visible = [scope for _, scope in principal.grants()]
    return [
        (row, path)
        for row, path in rows_by_ref(s, model, ref, tsg_id=tsg_id)
        if any(path.startswith(v) for v in visible)
    ]


class TsgDirectory:
    """TSG id -> materialized path. Paths never change, so they are cached forever."""

    def __init__(self) -> None:
        self._paths: dict[str, str] = {}
        self._lock = threading.Lock()

    def path(self, session: Session, tsg_id: str) -> str | None:
        cached = self._paths.get(tsg_id)
        if cached is not None:
            return cached
        found = session.scalar(select(TsgRow.path).where(TsgRow.id == tsg_id))
        if found is not None:
            with self._lock:
                self._paths[tsg_id] = found
        return found

    def require_path(self, session: Session, tsg_id: str) -> str:
        found = self.path(session, tsg_id)
        if found is None:
            raise TsgNotFound()
        return found

    def root(self, session: Session) -> tuple[str, str]:
        """The root TSG (id, path): where the installation itself, and its built-in
        CA, are administered."""
        root_id = meta.read_meta(session).get(meta.ROOT_TSG_ID)
        root_path = self.path(session, root_id) if root_id is not None else None
        if root_id is None or root_path is None:
            raise ConfigurationError("the installation has no root TSG; run `signery init`")
        return root_id, root_path
