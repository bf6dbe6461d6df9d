"""Signing requests waiting for approval, the approvers' decisions, and grants."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from signery.server.db import Base, UtcDateTime


class SigningRequestRow(Base):
    """A request to sign with a key whose policy requires approval.

    Made by the signing plane when an account signs without a valid grant (or
    by an approver ahead of a release: a pre-approval). It is approved once
    ``required_approvals`` distinct eligible approvers approved it, denied as
    soon as one denies, and expired when nobody decided in time."""

    __tablename__ = "signing_requests"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    key_id: Mapped[str] = mapped_column(ForeignKey("signing_keys.id"), index=True)
    tsg_id: Mapped[str] = mapped_column(ForeignKey("tsgs.id"), index=True)
    # The built-in account that will sign with the grant.
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), index=True)
    # Who asked: the account itself, or the user who made a pre-approval. A
    # requester never approves its own request.
    requested_by_type: Mapped[str] = mapped_column(String(16))
    requested_by_id: Mapped[str] = mapped_column(String(36))
    requested_by_name: Mapped[str | None] = mapped_column(String(256))
    # What the account first asked to sign, shown to approvers (hex digest).
    digest_algorithm: Mapped[str | None] = mapped_column(String(16))
    digest: Mapped[str | None] = mapped_column(String(128))
    scheme: Mapped[str | None] = mapped_column(String(16))
    client_machine: Mapped[str | None] = mapped_column(String(256))
    client_tool: Mapped[str | None] = mapped_column(String(256))
    justification: Mapped[str | None] = mapped_column(Text)
    # pending_approval | approved | denied | expired | cancelled
    status: Mapped[str] = mapped_column(String(24), index=True)
    required_approvals: Mapped[int] = mapped_column(Integer)
    # The grant an approval creates: max_uses None = unlimited (then an expiry
    # is mandatory); grant_ttl_seconds counts from the approval.
    grant_max_uses: Mapped[int | None] = mapped_column(Integer)
    grant_ttl_seconds: Mapped[int] = mapped_column(Integer)
    grant_id: Mapped[str | None] = mapped_column(String(36))
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class ApprovalDecisionRow(Base):
    """One approver's decision on a request (at most one per approver)."""

    __tablename__ = "approval_decisions"
    __table_args__ = (UniqueConstraint("request_id", "approver_id"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    request_id: Mapped[str] = mapped_column(ForeignKey("signing_requests.id"), index=True)
    approver_type: Mapped[str] = mapped_column(String(16))
    approver_id: Mapped[str] = mapped_column(String(36))
    approver_name: Mapped[str | None] = mapped_column(String(256))
    decision: Mapped[str] = mapped_column(String(16))  # approve | deny
    comment: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)


class SigningGrantRow(Base):
    """Permission for one account to sign with one approval-guarded key,
    bounded in uses (``max_uses``; None = unlimited) and always in time.
    A signing consumes a use with one conditional UPDATE, so a single-use
    grant signs exactly once however many requests race for it."""

    __tablename__ = "signing_grants"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    key_id: Mapped[str] = mapped_column(ForeignKey("signing_keys.id"), index=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), index=True)
    request_id: Mapped[str | None] = mapped_column(ForeignKey("signing_requests.id"))
    max_uses: Mapped[int | None] = mapped_column(Integer)
    uses: Mapped[int] = mapped_column(Integer)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
