"""Users (administrators), their API tokens, and role bindings of any principal."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, ForeignKey, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from signery.server.persistence.db import Base, UtcDateTime


class UserRow(Base):
    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    # argon2id PHC string; NULL means the user can only use API tokens.
    password_hash: Mapped[str | None] = mapped_column(String(256))
    tsg_id: Mapped[str] = mapped_column(ForeignKey("tsgs.id"), index=True)
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)


class ApiTokenRow(Base):
    __tablename__ = "api_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    # SHA-256 of the 256-bit secret. A fast hash is right for a high-entropy
    # random secret (no dictionary to search); passwords use argon2id instead.
    secret_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    # Every API token expires (api_token_max_lifetime_days); migration 0005 gave
    # the tokens that did not an expiry.
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime)
    last_used_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class RoleBindingRow(Base):
    __tablename__ = "role_bindings"
    __table_args__ = (UniqueConstraint("principal_type", "principal_id", "role", "tsg_id"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    principal_type: Mapped[str] = mapped_column(String(16))
    principal_id: Mapped[str] = mapped_column(String(36), index=True)
    role: Mapped[str] = mapped_column(String(32))
    tsg_id: Mapped[str] = mapped_column(ForeignKey("tsgs.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
