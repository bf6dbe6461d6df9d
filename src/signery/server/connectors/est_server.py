"""Signery's built-in CA as an RFC 7030 EST server.

``cacerts`` is public (§4.1.1). ``simpleenroll`` and ``simplereenroll`` take a
PKCS#10 request from an authenticated user and answer with the certificate the
built-in CA issues under its code-signing profile: the subject comes from the
CSR (CN required; O, OU, C and an e-mail address are carried over; anything
else is refused rather than silently dropped), the key from the CSR after its
signature is checked (proof of possession), the validity from
``est_validity_days`` capped by ``leaf_max_validity_days``. Every issued
certificate is recorded (without a key version: Signery does not hold the key)
and audited, so it can be found, and revoked onto the CRL, like any other.

Certifying a key Signery does not hold is an act of the CA that every tenant
trusts, so it is authorized like revocation: ``signery.ca.enroll`` at the root
TSG (superusers there), never at a subtree. The path label
(``/.well-known/est/<tsg id>/...``) names the TSG the certificate is for: its
subject must satisfy the subject policies on that TSG's path
(signery.server.ca.subject_policy), and the event is recorded there. Without a
label the certificate is the root TSG's.
"""

from __future__ import annotations

import hashlib
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from pydantic import ValidationError
from sqlalchemy import select

from signery import protocol as p
from signery.crypto import PublicKey
from signery.errors import CsrInvalid, PermissionDenied, TsgNotFound
from signery.protocol import AuditOutcome
from signery.server.access.authz import Authorizer, Denied, Permission, Principal
from signery.server.access.context import RequestContext
from signery.server.audit.events import Actor, AuditRecord, EventKind
from signery.server.audit.recorder import AuditRecorder
from signery.server.ca.models import CertificateRow
from signery.server.ca.service import BuiltinCa, subject_name
from signery.server.ca.subject_policy import require_allowed_subject
from signery.server.connectors.est_client import certs_only, decode_base64
from signery.server.persistence.db import Database, new_id
from signery.server.runtime.clock import Clock
from signery.server.tsg.tree import TsgDirectory

MIN_RSA_BITS = 2048
EC_CURVES = frozenset({"secp256r1", "secp384r1", "secp521r1"})
MAX_CSR_BYTES = 64 * 1024
_SUBJECT_FIELDS = {
    NameOID.COMMON_NAME: "common_name",
    NameOID.ORGANIZATION_NAME: "organization",
    NameOID.ORGANIZATIONAL_UNIT_NAME: "organizational_unit",
    NameOID.COUNTRY_NAME: "country",
    NameOID.EMAIL_ADDRESS: "email",
}


def parse_csr(body: bytes) -> x509.CertificateSigningRequest:
    if len(body) > MAX_CSR_BYTES:
        raise CsrInvalid("the request is too large for a CSR")
    try:
        der = decode_base64(body)
    except ValueError:
        raise CsrInvalid(
            "the body must be a base64 DER PKCS#10 request (RFC 7030 §4.2.1)"
        ) from None
    try:
        csr = x509.load_der_x509_csr(der)
    except ValueError as e:
        raise CsrInvalid(f"not a PKCS#10 request: {e}") from None
    # RFC 7030 §4.2.1 / RFC 2986: the requester proves it holds the private key.
    if not csr.is_signature_valid:
        raise CsrInvalid("the CSR's signature does not verify (no proof of possession)")
    return csr


def csr_public_key(csr: x509.CertificateSigningRequest) -> PublicKey:
    key = csr.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise CsrInvalid(f"RSA keys need at least {MIN_RSA_BITS} bits")
        return key
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in EC_CURVES:
            raise CsrInvalid("EC keys must be on P-256, P-384 or P-521")
        return key
    raise CsrInvalid(f"{type(key).__name__} keys are not certified for code signing")


def csr_subject(csr: x509.CertificateSigningRequest) -> p.KeySubject:
    fields: dict[str, str] = {}
    for rdn in csr.subject.rdns:
        if len(rdn) != 1:
            raise CsrInvalid("multi-valued subject RDNs are not supported")
        attribute = next(iter(rdn))
        name = _SUBJECT_FIELDS.get(attribute.oid)
        if name is None:
            raise CsrInvalid(
                f"subject attribute {attribute.oid.dotted_string} is not supported: use CN, O, "
                "OU, C and emailAddress"
            )
        if name in fields:
            raise CsrInvalid(f"the subject has {name} twice")
        fields[name] = str(attribute.value)
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    if san is not None:
        emails = san.get_values_for_type(x509.RFC822Name)
        if len(emails) != len(list(san)) or len(emails) > 1:
            raise CsrInvalid("the only subjectAltName supported is one e-mail address")
        if emails:
            if fields.get("email", emails[0]) != emails[0]:
                raise CsrInvalid("the subject's emailAddress and subjectAltName differ")
            fields["email"] = emails[0]
    if not fields.get("common_name"):
        raise CsrInvalid("the CSR's subject needs a common name (CN)")
    try:
        return p.KeySubject(**fields)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors()
        )
        raise CsrInvalid(f"unsupported subject: {problems}") from None


class EstService:
    def __init__(
        self,
        *,
        db: Database,
        authz: Authorizer,
        recorder: AuditRecorder,
        clock: Clock,
        directory: TsgDirectory,
        ca: BuiltinCa,
        validity_days: int,
    ) -> None:
        self._db = db
        self._authz = authz
        self._recorder = recorder
        self._clock = clock
        self._directory = directory
        self._ca = ca
        self._validity_days = min(validity_days, ca.max_leaf_validity_days)

    def cacerts(self) -> bytes:
        """The issuing and root CA certificates, certs-only (RFC 7030 §4.1.3)."""
        return certs_only(self._ca.chain())

    def enroll(
        self,
        principal: Principal,
        body: bytes,
        label: str | None,
        *,
        reenroll: bool,
        ctx: RequestContext,
    ) -> bytes:
        """Issue a code-signing certificate for the CSR in ``body``; the answer holds
        only the issued certificate (RFC 7030 §4.2.3)."""
        with self._db.read() as s:
            root_id, root_path = self._directory.root(s)
            # First: a caller who may not enroll learns nothing about labels or TSGs.
            decision = self._authz.decide(principal, Permission.CA_ENROLL, root_path)
            if isinstance(decision, Denied):
                raise PermissionDenied(
                    "EST enrollment certifies a key Signery does not hold with the built-in "
                    f"CA: it needs {Permission.CA_ENROLL.value} at the root TSG (a superuser "
                    "there)"
                )
            tsg_id = label or root_id
            path = self._directory.path(s, tsg_id)
            if path is None:
                raise TsgNotFound()
        csr = parse_csr(body)
        public_key = csr_public_key(csr)
        subject = csr_subject(csr)
        assert subject.common_name is not None
        with self._db.read() as s:
            require_allowed_subject(s, path, subject, subject.common_name)
        now = self._clock.now()
        if reenroll:
            self._check_reenrollment(subject_name(subject, subject.common_name), now)
        issued = self._ca.issue_code_signing(
            public_key, subject, subject.common_name, self._validity_days
        )
        cert = issued.certificate
        operation = "simplereenroll" if reenroll else "simpleenroll"
        with self._db.write() as s:
            row = CertificateRow(
                id=new_id(),
                key_version_id=None,
                serial=format(cert.serial_number, "x"),
                subject=cert.subject.rfc4514_string(),
                issuer=cert.issuer.rfc4514_string(),
                not_before=cert.not_valid_before_utc,
                not_after=cert.not_valid_after_utc,
                fingerprint_sha256=hashlib.sha256(
                    cert.public_bytes(serialization.Encoding.DER)
                ).hexdigest(),
                chain_pem=issued.chain_pem,
                source="builtin",
                created_at=now,
            )
            s.add(row)
            s.flush()
            self._recorder.record(
                s,
                AuditRecord(
                    EventKind.CERTIFICATE_ISSUED,
                    AuditOutcome.SUCCEEDED,
                    Actor.of(principal),
                    tsg_id=tsg_id,
                    tsg_path=path,
                    context=ctx,
                    details={
                        "protocol": "est",
                        "operation": operation,
                        "certificate_id": row.id,
                        "certificate_serial": row.serial,
                        "certificate_subject": row.subject,
                        "not_after": row.not_after.isoformat(),
                        "public_key_sha256": hashlib.sha256(
                            public_key.public_bytes(
                                serialization.Encoding.DER,
                                serialization.PublicFormat.SubjectPublicKeyInfo,
                            )
                        ).hexdigest(),
                    },
                ),
            )
        return certs_only([cert])

    def _check_reenrollment(self, name: x509.Name, now: datetime) -> None:
        # RFC 7030 §4.2.2: a re-enrollment renews a certificate this CA issued, with
        # the same subject. Without TLS client certificates the certificate being
        # renewed is found by its subject among those issued over EST.
        with self._db.read() as s:
            found = s.scalar(
                select(CertificateRow.id)
                .where(
                    CertificateRow.key_version_id.is_(None),
                    CertificateRow.source == "builtin",
                    CertificateRow.subject == name.rfc4514_string(),
                    CertificateRow.revoked_at.is_(None),
                    CertificateRow.not_after > now,
                )
                .limit(1)
            )
        if found is None:
            raise CsrInvalid(
                "simplereenroll renews a valid certificate this CA issued over EST with the "
                f"same subject; there is none for {name.rfc4514_string()}: use simpleenroll"
            )
