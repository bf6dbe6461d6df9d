"""The built-in CA's authorities (root, issuing, TSA), the certificates recorded for
signing keys and EST enrollments, CRLs, subject policies and external CA connectors."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, ForeignKey, Integer, LargeBinary, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from signery.server.persistence.db import Base, UtcDateTime


class CaAuthorityRow(Base):
    __tablename__ = "ca_authorities"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    role: Mapped[str] = mapped_column(String(16), unique=True)  # "root" | "issuing"
    algorithm: Mapped[str] = mapped_column(String(16))
    storage: Mapped[str] = mapped_column(String(32))
    store_ref: Mapped[str] = mapped_column(String(512))
    tsg_id: Mapped[str] = mapped_column(String(10))
    certificate_der: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)


class CrlRow(Base):
    """Certificate revocation lists of the issuing CA; the highest number is current."""

    __tablename__ = "crls"

    number: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    der: Mapped[bytes] = mapped_column(LargeBinary)
    this_update: Mapped[datetime] = mapped_column(UtcDateTime)
    next_update: Mapped[datetime] = mapped_column(UtcDateTime)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)


class CaConnectorRow(Base):
    """An external CA, configured on a TSG and usable by keys in its subtree."""

    __tablename__ = "ca_connectors"
    __table_args__ = (UniqueConstraint("tsg_id", "name"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    tsg_id: Mapped[str] = mapped_column(ForeignKey("tsgs.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # csr | est
    public: Mapped[bool] = mapped_column(Boolean, default=False)
    # Trust anchors the issued chains must reach (PEM bundle).
    roots_pem: Mapped[str] = mapped_column(Text)
    config_json: Mapped[str] = mapped_column(Text)  # non-secret settings (EST URL, username...)
    # Secrets (EST password, TLS client key) encrypted under the master key.
    secrets_wrapped: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)


class SubjectPolicyRow(Base):
    """A TSG's subject policy: which subjects the built-in CA certifies for keys in
    its subtree (signery.server.ca.subject_policy). At most one per TSG; the
    policies of every TSG on a key's path apply together."""

    __tablename__ = "subject_policies"

    tsg_id: Mapped[str] = mapped_column(ForeignKey("tsgs.id"), primary_key=True)
    # SubjectPolicyRules as JSON, validated when it was set.
    rules_json: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_by: Mapped[str | None] = mapped_column(String(36))


class CertificateRow(Base):
    """A certificate Signery recorded: issued by the built-in CA (for a key version,
    or over EST with no key version) or brought by an external CA connector."""

    __tablename__ = "certificates"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    key_version_id: Mapped[str | None] = mapped_column(ForeignKey("key_versions.id"), index=True)
    serial: Mapped[str] = mapped_column(String(64), unique=True)
    subject: Mapped[str] = mapped_column(String(1024))
    issuer: Mapped[str] = mapped_column(String(1024))
    not_before: Mapped[datetime] = mapped_column(UtcDateTime)
    not_after: Mapped[datetime] = mapped_column(UtcDateTime)
    fingerprint_sha256: Mapped[str] = mapped_column(String(64))
    # The whole chain as PEM, leaf first and root last: what clients embed.
    chain_pem: Mapped[str] = mapped_column(Text)
    # "builtin", or the id of the CA connector the certificate came through.
    source: Mapped[str] = mapped_column(String(64), default="builtin")
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    revocation_reason: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
