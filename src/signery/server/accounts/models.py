"""Built-in accounts (machine signing identities), their public keys, used assertion ids."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Integer, LargeBinary, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from signery.server.persistence.db import Base, UtcDateTime


class AccountRow(Base):
    __tablename__ = "accounts"
    __table_args__ = (UniqueConstraint("tsg_id", "name"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    client_id: Mapped[str] = mapped_column(String(36), unique=True)
    name: Mapped[str] = mapped_column(String(128))
    tsg_id: Mapped[str] = mapped_column(ForeignKey("tsgs.id"), index=True)
    status: Mapped[str] = mapped_column(String(16))
    valid_until: Mapped[datetime] = mapped_column(UtcDateTime)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)
    # Access tokens carry the epoch they were issued in and are refused once it
    # moves on: disabling the account or removing one of its keys increments it,
    # so re-enabling does not revive tokens issued before. A counter, not a time:
    # no clock (of this replica or another) decides whether a token is older.
    token_epoch: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class AccountKeyRow(Base):
    __tablename__ = "account_keys"
    __table_args__ = (UniqueConstraint("account_id", "fingerprint"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), index=True)
    algorithm: Mapped[str] = mapped_column(String(16))
    public_key_der: Mapped[bytes] = mapped_column(LargeBinary)
    fingerprint: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)


class UsedAssertionRow(Base):
    """RFC 7523 §3 item 7: a jti is accepted once. The primary key is the replay
    guard shared by every replica; rows are pruned once the assertion has expired."""

    __tablename__ = "used_assertions"

    client_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    jti: Mapped[str] = mapped_column(String(255), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)
