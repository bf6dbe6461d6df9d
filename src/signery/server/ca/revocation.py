"""Revocation at the built-in CA, by serial number.

Any certificate the built-in issuing CA issued and Signery recorded can be
revoked here: those enrolled over EST, which belong to no signing key and so
are out of reach of ``POST /api/v1/keys/{key}/revoke-certificate``, and those
of signing keys. Revoking is an act of the CA itself, authorized by
``signery.ca.revoke`` at the root TSG (superusers there).

The effect is the same as the key's revoke-certificate: the certificate row is
marked, a new CRL is published and the event is audited in one transaction (if
the audit record cannot be written, nothing changes), and a key whose current
certificate it was can no longer sign (409 ``certificate_revoked``).

The CA does not read signing keys: which key version holds a certificate it
issued comes through the narrow :class:`CertificateHolders` interface, which the
keys package implements (signery.server.keys.certified).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from cryptography import x509
from sqlalchemy import select
from sqlalchemy.orm import Session

from signery import protocol as p
from signery.errors import CertificateNotFound, Conflict, InvalidRequest
from signery.protocol import AuditOutcome
from signery.server.access.authz import Authorizer, Permission, Principal
from signery.server.access.context import RequestContext
from signery.server.audit.events import Actor, AuditRecord, EventKind
from signery.server.audit.recorder import AuditRecorder
from signery.server.ca.models import CertificateRow
from signery.server.ca.service import BuiltinCa
from signery.server.persistence.db import Database
from signery.server.runtime.clock import Clock
from signery.server.tsg.tree import TsgDirectory

# RFC 5280 §4.1.2.2: conforming serial numbers are at most 20 octets.
SERIAL_MAX_OCTETS = 20
# Room for 20 octets written as 0x-prefixed hex or colon-separated, plus leading zeros.
SERIAL_MAX_TEXT = 128
# Plain hex with an optional 0x (`openssl x509 -serial` prints 1A2B...), or
# colon-separated octets (`openssl x509 -text` prints 1a:2b:...).
_SERIAL_RE = re.compile(r"(?:0x)?(?:[0-9a-f]+|[0-9a-f]{2}(?::[0-9a-f]{2})+)")
# Certificates of the built-in CA (others carry the id of their CA connector).
BUILTIN_SOURCE = "builtin"
# RFC 5280 §5.3.1 CRLReason names a certificate may be revoked with (removeFromCRL
# is for delta CRLs, which Signery does not publish).
REVOCATION_REASONS = frozenset(
    {
        "unspecified",
        "keyCompromise",
        "cACompromise",
        "affiliationChanged",
        "superseded",
        "cessationOfOperation",
        "certificateHold",
        "privilegeWithdrawn",
        "aACompromise",
    }
)


@dataclass(frozen=True, slots=True)
class CertificateHolder:
    """The signing key version a recorded certificate certifies."""

    key_id: str
    key_version: int
    tsg_id: str
    algorithm: str


class CertificateHolders(Protocol):
    """What revocation needs to know of signing keys."""

    def holder(self, s: Session, key_version_id: str) -> CertificateHolder | None:
        """The key version ``key_version_id`` (None when it no longer exists)."""
        ...


def cert_info(row: CertificateRow) -> p.CertificateInfo:
    return p.CertificateInfo(
        serial=row.serial,
        subject=row.subject,
        issuer=row.issuer,
        not_before=row.not_before,
        not_after=row.not_after,
        fingerprint_sha256=row.fingerprint_sha256,
    )


def parse_serial(text: str) -> str:
    """A serial number in the form the CA records it (lowercase hex, no leading
    zeros), from the hex forms people copy out of a certificate."""
    too_long = InvalidRequest(
        f"a certificate serial has at most {SERIAL_MAX_OCTETS} octets (RFC 5280 §4.1.2.2)"
    )
    candidate = text.strip().lower()
    if len(candidate) > SERIAL_MAX_TEXT:
        raise too_long
    if not _SERIAL_RE.fullmatch(candidate):
        raise InvalidRequest(
            "the serial must be hexadecimal, such as 1a2b, 0x1A2B or 1a:2b "
            "(openssl x509 -serial -noout -in CERT prints it)"
        )
    digits = candidate.removeprefix("0x").replace(":", "").lstrip("0") or "0"
    if len(digits) > 2 * SERIAL_MAX_OCTETS:
        raise too_long
    return digits


def ca_certificate(
    cert: CertificateRow, holder: CertificateHolder | None, now: datetime
) -> p.CaCertificate:
    if cert.revoked_at is not None:
        status = "revoked"
    elif cert.not_after <= now:
        status = "expired"
    else:
        status = "valid"
    return p.CaCertificate(
        **cert_info(cert).model_dump(),
        status=status,
        key_id=holder.key_id if holder is not None else None,
        key_version=holder.key_version if holder is not None else None,
        revoked_at=cert.revoked_at,
        revocation_reason=cert.revocation_reason,
    )


class RevocationService:
    def __init__(
        self,
        *,
        db: Database,
        authz: Authorizer,
        recorder: AuditRecorder,
        clock: Clock,
        directory: TsgDirectory,
        ca: BuiltinCa,
        holders: CertificateHolders,
    ) -> None:
        self._db = db
        self._authz = authz
        self._recorder = recorder
        self._clock = clock
        self._directory = directory
        self._ca = ca
        self._holders = holders

    def revoke(
        self,
        principal: Principal,
        serial: str,
        req: p.CaCertificateRevoke,
        ctx: RequestContext,
    ) -> p.CaCertificate:
        """Revoke the built-in CA's certificate with this serial and publish the CRL
        that lists it, in one transaction with the audit event."""
        wanted = parse_serial(serial)
        if req.reason not in REVOCATION_REASONS:
            raise InvalidRequest(f"reason must be one of {', '.join(sorted(REVOCATION_REASONS))}")
        with self._db.write() as s:
            root_id, root_path = self._directory.root(s)
            # Before the lookup: whoever may not revoke learns nothing about serials.
            self._authz.require(
                principal, Permission.CA_REVOKE, root_path, not_found=CertificateNotFound
            )
            cert = s.scalars(
                select(CertificateRow)
                .where(CertificateRow.serial == wanted, CertificateRow.source == BUILTIN_SOURCE)
                .with_for_update()
            ).first()
            if cert is None:
                raise CertificateNotFound(
                    f"the built-in CA has no record of a certificate with serial {wanted}"
                )
            if cert.revoked_at is not None:
                raise Conflict(f"certificate {cert.serial} is already revoked")
            holder = (
                self._holders.holder(s, cert.key_version_id)
                if cert.key_version_id is not None
                else None
            )
            now = self._clock.now()
            cert.revoked_at = now
            cert.revocation_reason = req.reason
            s.flush()
            crl = x509.load_der_x509_crl(self._ca.publish_crl(s))
            details: dict[str, object] = {
                "certificate_id": cert.id,
                "certificate_serial": cert.serial,
                "certificate_subject": cert.subject,
                "reason": req.reason,
                "crl_number": crl.extensions.get_extension_for_class(
                    x509.CRLNumber
                ).value.crl_number,
            }
            # A key's certificate is recorded in the key's TSG, so that the key's
            # own auditors see it; an EST certificate belongs to the CA's (root) TSG.
            if holder is not None:
                tsg_id, tsg_path = holder.tsg_id, self._directory.require_path(s, holder.tsg_id)
            else:
                tsg_id, tsg_path = root_id, root_path
            self._recorder.record(
                s,
                AuditRecord(
                    EventKind.CA_CERTIFICATE_REVOKED,
                    AuditOutcome.SUCCEEDED,
                    Actor.of(principal),
                    tsg_id=tsg_id,
                    tsg_path=tsg_path,
                    key_id=holder.key_id if holder is not None else None,
                    key_version=holder.key_version if holder is not None else None,
                    algorithm=holder.algorithm if holder is not None else None,
                    context=ctx,
                    details=details,
                ),
            )
            return ca_certificate(cert, holder, now)
