"""Signing requests waiting for approval, the approvers' decisions, and grants."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from signery.protocol import GrantScope
from signery.server.persistence.db import Base, UtcDateTime


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
    # digests: approving it signs exactly its SigningRequestDigestRow items;
    # any_digest: a pre-approval that said so (signery.protocol.GrantScope).
    scope: Mapped[str] = mapped_column(String(16), server_default=GrantScope.DIGESTS.value)
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


class SigningRequestDigestRow(Base):
    """One artifact a request covers: (digest, digest_algorithm, scheme), shown to
    approvers. Items join a pending request until its first decision (a batch of
    files is one request); from then on the set is fixed, and the grant the
    approval makes signs exactly these items, each at most the grant's
    ``max_uses`` times (counted in ``uses``, taken by one conditional UPDATE)."""

    __tablename__ = "signing_request_digests"
    __table_args__ = (
        # Named by hand: the conventional name is longer than PostgreSQL's 63 bytes.
        UniqueConstraint(
            "request_id",
            "digest_algorithm",
            "digest",
            "scheme",
            name="uq_signing_request_digests_item",
        ),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    request_id: Mapped[str] = mapped_column(ForeignKey("signing_requests.id"), index=True)
    # Order of arrival, for approvers reading a batch in the order it was signed.
    position: Mapped[int] = mapped_column(Integer)
    digest_algorithm: Mapped[str] = mapped_column(String(16))
    digest: Mapped[str] = mapped_column(String(128))  # hex, lowercase
    scheme: Mapped[str] = mapped_column(String(16))
    uses: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)


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
    """Permission for one account to sign with one approval-guarded key: the
    digests its request lists (or, for an ``any_digest`` pre-approval, any
    digest), bounded in uses (``max_uses``; None = unlimited) and always in time.
    A signing takes a use with one conditional UPDATE that also checks the
    digest, so a single-use grant signs exactly once however many requests race
    for it, and never anything its approvers did not see."""

    __tablename__ = "signing_grants"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    key_id: Mapped[str] = mapped_column(ForeignKey("signing_keys.id"), index=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), index=True)
    request_id: Mapped[str | None] = mapped_column(ForeignKey("signing_requests.id"))
    # digests: only its request's items (max_uses is per item); any_digest: any
    # digest (max_uses in all). signery.protocol.GrantScope.
    scope: Mapped[str] = mapped_column(String(16), server_default=GrantScope.DIGESTS.value)
    max_uses: Mapped[int | None] = mapped_column(Integer)
    uses: Mapped[int] = mapped_column(Integer)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
