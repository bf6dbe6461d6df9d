"""Signing keys, their versions (one key pair each) and certificates."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Integer, LargeBinary, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from signery.server.persistence.db import Base, UtcDateTime


class SigningKeyRow(Base):
    __tablename__ = "signing_keys"
    __table_args__ = (UniqueConstraint("tsg_id", "name"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), index=True)
    tsg_id: Mapped[str] = mapped_column(ForeignKey("tsgs.id"), index=True)
    algorithm: Mapped[str] = mapped_column(String(16))
    storage: Mapped[str] = mapped_column(String(32))
    certificate_authority: Mapped[str] = mapped_column(String(64))  # none | builtin | connector
    ca_connector_id: Mapped[str | None] = mapped_column(ForeignKey("ca_connectors.id"), index=True)
    status: Mapped[str] = mapped_column(String(16))
    current_version: Mapped[int] = mapped_column(Integer)
    description: Mapped[str | None] = mapped_column(Text)
    subject_json: Mapped[str] = mapped_column(Text)
    validity_days: Mapped[int] = mapped_column(Integer)
    created_by: Mapped[str | None] = mapped_column(String(36))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)
    # The per-key signing policy (signery.server.keys.policy.StoredPolicy as JSON,
    # names already resolved to ids); None = no restriction beyond the TSG boundary.
    policy_json: Mapped[str | None] = mapped_column(Text)
    # Scheduled rotation: every rotation_period_days, claimed by one replica
    # through a compare-and-set on next_rotation_at.
    rotation_period_days: Mapped[int | None] = mapped_column(Integer)
    next_rotation_at: Mapped[datetime | None] = mapped_column(UtcDateTime, index=True)
    # Scheduled destruction: the key is disabled until destroy_at, when its
    # material is erased in its store; status_before_destroy is what
    # cancel-destroy restores.
    destroy_at: Mapped[datetime | None] = mapped_column(UtcDateTime, index=True)
    status_before_destroy: Mapped[str | None] = mapped_column(String(16))
    destroyed_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class KeyVersionRow(Base):
    __tablename__ = "key_versions"
    __table_args__ = (UniqueConstraint("key_id", "version"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    key_id: Mapped[str] = mapped_column(ForeignKey("signing_keys.id"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    # Store-specific reference to the key pair; never key material.
    store_ref: Mapped[str] = mapped_column(String(512))
    public_key_der: Mapped[bytes] = mapped_column(LargeBinary)
    certificate_id: Mapped[str | None] = mapped_column(String(36))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    # When a rotation made another version current (the version stays listable).
    archived_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    # When its key material was erased in the store.
    destroyed_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class KeyUsageQuotaRow(Base):
    """Signatures counted against a key's usage limits, one row per period:
    ``total`` or a day (``YYYY-MM-DD`` in the policy's time zone). A signing
    reserves its slot here with one conditional UPDATE before signing, so the
    limit holds across threads, processes and replicas (the database decides)."""

    __tablename__ = "key_usage_quotas"

    key_id: Mapped[str] = mapped_column(ForeignKey("signing_keys.id"), primary_key=True)
    period: Mapped[str] = mapped_column(String(16), primary_key=True)
    used: Mapped[int] = mapped_column(Integer)


class CertificateRequestRow(Base):
    """A CSR sent (or to be sent) to an external CA for a key version."""

    __tablename__ = "certificate_requests"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    key_version_id: Mapped[str] = mapped_column(ForeignKey("key_versions.id"), index=True)
    connector_id: Mapped[str] = mapped_column(ForeignKey("ca_connectors.id"), index=True)
    purpose: Mapped[str] = mapped_column(String(16))  # enroll | renew | reissue | rotate
    subject_json: Mapped[str] = mapped_column(Text)
    csr_pem: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))  # pending | issued | failed
    error: Mapped[str | None] = mapped_column(Text)
    certificate_id: Mapped[str | None] = mapped_column(String(36))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)
