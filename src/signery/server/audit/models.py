"""Audit events and usage counters. Only the audit recorder writes these tables."""

from __future__ import annotations

from datetime import date, datetime

from sqlalchemy import BigInteger, Date, Index, Integer, LargeBinary, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from signery.server.persistence.db import Base, UtcDateTime

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
    # Hash chain per node (issue 7): the node's sequence number of the event, the
    # hash of the node's previous event and this event's hash over its canonical
    # encoding. NULL on events written before the chain existed.
    node_seq: Mapped[int | None] = mapped_column(BigInteger)
    prev_hash: Mapped[str | None] = mapped_column(String(64))
    hash: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (Index("ix_audit_events_node_chain", "node_id", "node_seq", unique=True),)


class AuditChainHeadRow(Base):
    """The head of each node's hash chain: updated in the same transaction as the
    events it covers, under the row's lock, so a rolled-back transaction leaves
    no gap and two writers of one node never fork its chain."""

    __tablename__ = "audit_chain_heads"

    node_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    hash: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class AuditSigningKeyRow(Base):
    """A key that signs audit checkpoints, held in a key store (never its material)."""

    __tablename__ = "audit_signing_keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    storage: Mapped[str] = mapped_column(String(32))
    store_ref: Mapped[str] = mapped_column(String(512))
    algorithm: Mapped[str] = mapped_column(String(16))
    public_key_der: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)


class AuditCheckpointRow(Base):
    """A signed statement of a node's chain head: (node, seq, head hash, time)."""

    __tablename__ = "audit_checkpoints"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    node_id: Mapped[str] = mapped_column(String(128), index=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    head_hash: Mapped[str] = mapped_column(String(64))
    # The canonical JSON that was signed, and the signature over it.
    payload: Mapped[str] = mapped_column(Text)
    signature: Mapped[bytes] = mapped_column(LargeBinary)
    signing_key_id: Mapped[str] = mapped_column(String(36))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)


class AuditSinkCursorRow(Base):
    """How far an external sink (syslog, webhook) has received the audit trail,
    by ``audit_events.seq``; the replica holding the lease forwards."""

    __tablename__ = "audit_sink_cursors"

    sink: Mapped[str] = mapped_column(String(64), primary_key=True)
    last_seq: Mapped[int] = mapped_column(BigInteger)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_until: Mapped[datetime | None] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class AuditSinkGapRow(Base):
    """Numbers a sink went past without their event, still watched for.

    On PostgreSQL ``seq`` is drawn before commit, so a transaction can commit its
    event after the sink sent later ones. The range is looked for again at every
    poll (an event found is sent, late, with its id) and forgotten once no
    transaction that could still commit it is running: ``horizon`` is the xmax
    (``xid8``) of a snapshot taken after the gap was seen, and the numbers are
    final once every transaction id below it has ended. Only the lease holder
    writes these rows, in the transaction that moves the cursor."""

    __tablename__ = "audit_sink_gaps"

    sink: Mapped[str] = mapped_column(String(64), primary_key=True)
    first_seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    last_seq: Mapped[int] = mapped_column(BigInteger)
    horizon: Mapped[int] = mapped_column(BigInteger)
    seen_at: Mapped[datetime] = mapped_column(UtcDateTime)


class UsageCounterRow(Base):
    __tablename__ = "usage_counters"

    # "key" | "account" | "key_version" (subject: the key_versions row id)
    scope: Mapped[str] = mapped_column(String(16), primary_key=True)
    subject_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    successes: Mapped[int] = mapped_column(BigInteger, default=0)
    failures: Mapped[int] = mapped_column(BigInteger, default=0)
    # Refused by a decision (authorization, policy, limits), counted apart from
    # failures (errors, invalid requests).
    denied: Mapped[int] = mapped_column(BigInteger, server_default="0")
    last_used_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class UsageDailyRow(Base):
    __tablename__ = "usage_daily"

    day: Mapped[date] = mapped_column(Date, primary_key=True)
    scope: Mapped[str] = mapped_column(String(16), primary_key=True)
    subject_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    successes: Mapped[int] = mapped_column(BigInteger, default=0)
    failures: Mapped[int] = mapped_column(BigInteger, default=0)
    denied: Mapped[int] = mapped_column(BigInteger, server_default="0")
