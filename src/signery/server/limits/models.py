"""Failure counters of the rate limits, one row per bucket and fixed window."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from signery.server.persistence.db import Base, UtcDateTime


class RateLimitCounterRow(Base):
    """Attempts counted against one limit (``scope``) for one ``subject`` (a client
    address or /64, or the SHA-256 of a username) in the window that starts at
    ``window_start``. Counted with one conditional upsert, so a limit holds across
    threads, processes and replicas (the database serializes the updates of a row);
    rows are deleted once ``expires_at`` (the end of the window) has passed."""

    __tablename__ = "rate_limit_counters"

    scope: Mapped[str] = mapped_column(String(32), primary_key=True)
    subject: Mapped[str] = mapped_column(String(64), primary_key=True)
    window_start: Mapped[datetime] = mapped_column(UtcDateTime, primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)
    count: Mapped[int] = mapped_column(Integer)
