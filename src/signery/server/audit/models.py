"""Audit events and usage counters. Only the audit recorder writes these tables."""

from __future__ import annotations

from datetime import date, datetime

from sqlalchemy import BigInteger, Date, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from signery.server.db import Base, UtcDateTime

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets BIGINT identity.
_SEQ = BigInteger().with_variant(Integer(), "sqlite")


class AuditEventRow(Base):
    __tablename__ = "audit_events"

    seq: Mapped[int] = mapped_column(_SEQ, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(36), unique=True)
    time: Mapped[datetime] = mapped_column(UtcDateTime, index=True)
    kind: Mapped[str] = mapped_column(String(64), index=True)
    outcome: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str | None] = mapped_column(String(64))
    tsg_id: Mapped[str | None] = mapped_column(String(10))
    # Materialized path of tsg_id, so "events of this TSG's subtree" is a prefix match.
    tsg_path: Mapped[str | None] = mapped_column(String(1024), index=True)
    principal_type: Mapped[str] = mapped_column(String(16))
    principal_id: Mapped[str | None] = mapped_column(String(36), index=True)
    principal_name: Mapped[str | None] = mapped_column(String(256))
    key_id: Mapped[str | None] = mapped_column(String(36), index=True)
    key_version: Mapped[int | None] = mapped_column(Integer)
    algorithm: Mapped[str | None] = mapped_column(String(16))
    digest: Mapped[str | None] = mapped_column(String(128))
    client_ip: Mapped[str | None] = mapped_column(String(64))
    user_agent: Mapped[str | None] = mapped_column(String(256))
    client_machine: Mapped[str | None] = mapped_column(String(256))
    client_tool: Mapped[str | None] = mapped_column(String(256))
    request_id: Mapped[str | None] = mapped_column(String(64))
    node_id: Mapped[str] = mapped_column(String(128))
    details: Mapped[str] = mapped_column(Text)


class UsageCounterRow(Base):
    __tablename__ = "usage_counters"

    scope: Mapped[str] = mapped_column(String(16), primary_key=True)  # "key" | "account"
    subject_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    successes: Mapped[int] = mapped_column(BigInteger, default=0)
    failures: Mapped[int] = mapped_column(BigInteger, default=0)
    last_used_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class UsageDailyRow(Base):
    __tablename__ = "usage_daily"

    day: Mapped[date] = mapped_column(Date, primary_key=True)
    scope: Mapped[str] = mapped_column(String(16), primary_key=True)
    subject_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    successes: Mapped[int] = mapped_column(BigInteger, default=0)
    failures: Mapped[int] = mapped_column(BigInteger, default=0)
