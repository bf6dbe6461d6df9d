"""TSG table: a tree stored with a materialized path for subtree queries."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from signery.server.persistence.db import Base, UtcDateTime


class TsgRow(Base):
    __tablename__ = "tsgs"
    __table_args__ = (UniqueConstraint("parent_id", "name"),)

    id: Mapped[str] = mapped_column(String(10), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("tsgs.id"), index=True)
    # "/<root id>/<child id>/.../<own id>/": a TSG's subtree is every row whose path
    # starts with its own. Paths never change (TSGs do not move).
    path: Mapped[str] = mapped_column(String(1024), unique=True)
    depth: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
