"""The built-in CA: a root and an issuing CA whose keys live in a key store.

The CA never holds key bytes: certificates are signed through the key-store
interface (``remote_private_key``). Code-signing certificates follow the
CA/Browser Forum code-signing baseline where it applies to a private CA:
EKU codeSigning, KU digitalSignature (critical), CA:FALSE, SKI/AKI, 16-byte
random serials, bounded validity.
"""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass
from datetime import timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import AuthorityInformationAccessOID, NameOID
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from signery import protocol as p
from signery.crypto import PublicKey
from signery.errors import ConfigurationError, DatabaseError, InvalidRequest
from signery.keystores import (
    Destroyable,
    GeneratedKey,
    KeyContext,
    KeyHandle,
    KeyStoreRegistry,
    remote_private_key,
)
from signery.protocol import Algorithm
from signery.server.ca.models import CaAuthorityRow, CertificateRow, CrlRow
from signery.server.ca.profiles import CODE_SIGNING, ISSUING_CA, ROOT_CA
from signery.server.persistence.db import Database, new_id
from signery.server.runtime.clock import Clock

ROOT_VALIDITY = timedelta(days=20 * 365)
ISSUING_VALIDITY = timedelta(days=10 * 365)
# Tolerate verifiers whose clocks run a little behind ours.
BACKDATE = timedelta(minutes=5)
SERIAL_BYTES = 16
ROOT = "root"
ISSUING = "issuing"
CRL_PATH = "/api/v1/ca/crl"
ISSUER_CERT_PATH = "/api/v1/ca/issuing.der"
# Publish the next CRL this long before the current one's nextUpdate, so relying
# parties never see an expired one.
CRL_REFRESH_MARGIN = timedelta(hours=12)
REASONS: dict[str, x509.ReasonFlags] = {r.value: r for r in x509.ReasonFlags}


def random_serial() -> int:
    # RFC 5280 §4.1.2.2: positive, at most 20 octets. 16 random bytes with the top
    # bit cleared stay positive in 16 octets; CA/B BR §7.1 asks for >= 64 random bits.
    return int.from_bytes(secrets.token_bytes(SERIAL_BYTES), "big") >> 1 | 1


def signature_hash(algorithm: Algorithm) -> hashes.SHA256 | hashes.SHA384 | hashes.SHA512:
    if algorithm is Algorithm.EC_P384:
        return hashes.SHA384()
    if algorithm is Algorithm.EC_P521:
        return hashes.SHA512()
    return hashes.SHA256()


@dataclass(frozen=True, slots=True)
class Authority:
    role: str
    algorithm: Algorithm
    handle: KeyHandle
    certificate: x509.Certificate


@dataclass(frozen=True, slots=True)
class CreatedCa:
    root: x509.Certificate
    issuing: x509.Certificate
    handles: tuple[KeyHandle, ...]
    rows: tuple[CaAuthorityRow, ...]


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]  # leaf first, root last

    @property
    def chain_pem(self) -> str:
        return "".join(
            c.public_bytes(serialization.Encoding.PEM).decode("ascii") for c in self.chain
        )


def subject_name(subject: p.KeySubject, default_cn: str) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, subject.common_name or default_cn)]
    if subject.organizational_unit:
        attrs.append(
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, subject.organizational_unit)
        )
    if subject.organization:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, subject.organization))
    if subject.country:
        if not subject.country.isalpha() or not subject.country.isupper():
            raise InvalidRequest("subject.country must be a two-letter ISO 3166 code such as US")
        attrs.append(x509.NameAttribute(NameOID.COUNTRY_NAME, subject.country))
    try:
        return x509.Name(attrs)
    except ValueError as e:
        raise InvalidRequest(f"invalid certificate subject: {e}") from e


class BuiltinCa:
    def __init__(
        self,
        *,
        db: Database,
        keystores: KeyStoreRegistry,
        clock: Clock,
        max_leaf_validity_days: int,
        storage: str = "builtin",
        public_url: str | None = None,
        crl_validity: timedelta = timedelta(days=7),
    ) -> None:
        self.public_url = public_url
        self.crl_validity = crl_validity
        self._db = db
        self._keystores = keystores
        self._clock = clock
        self.max_leaf_validity_days = max_leaf_validity_days
        self._storage = storage
        self._authorities: dict[str, Authority] | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------ creation (signery init)

    def create(
        self, *, root_tsg_id: str, algorithm: Algorithm, organization: str, installation: str
    ) -> CreatedCa:
        """Generate the root and issuing CA keys in the key store and certify them.

        Returns the rows for the caller to add in its own transaction. If anything
        fails here the keys are destroyed again; if the caller's transaction fails
        later, the caller destroys ``CreatedCa.handles``: no half-created CA."""
        store = self._keystores.get(self._storage)
        root_id, issuing_id = new_id(), new_id()
        handles: list[KeyHandle] = []
        try:
            root_key = store.generate(algorithm, KeyContext(root_id, 1, root_tsg_id))
            handles.append(root_key.handle)
            issuing_key = store.generate(algorithm, KeyContext(issuing_id, 1, root_tsg_id))
            handles.append(issuing_key.handle)
            return self._certify(
                store.name,
                algorithm,
                organization,
                installation,
                root_tsg_id,
                (root_id, root_key),
                (issuing_id, issuing_key),
                tuple(handles),
            )
        except BaseException:
            if isinstance(store, Destroyable):
                for handle in handles:
                    store.destroy(handle)
            raise

    def _certify(
        self,
        storage: str,
        algorithm: Algorithm,
        organization: str,
        installation: str,
        root_tsg_id: str,
        root: tuple[str, GeneratedKey],
        issuing: tuple[str, GeneratedKey],
        handles: tuple[KeyHandle, ...],
    ) -> CreatedCa:
        store = self._keystores.get(storage)
        now = self._clock.now()
        org = x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization)
        root_id, root_key = root
        issuing_id, issuing_key = issuing
        root_name = x509.Name(
            [org, x509.NameAttribute(NameOID.COMMON_NAME, f"Signery Root CA {installation}")]
        )
        issuing_name = x509.Name(
            [
                org,
                x509.NameAttribute(NameOID.COMMON_NAME, f"Signery Code Signing CA {installation}"),
            ]
        )
        root_ski = x509.SubjectKeyIdentifier.from_public_key(root_key.public_key)
        root_builder = (
            x509.CertificateBuilder()
            .subject_name(root_name)
            .issuer_name(root_name)
            .public_key(root_key.public_key)
            .serial_number(random_serial())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + ROOT_VALIDITY)
        )
        root_cert = (
            ROOT_CA.apply(root_builder)
            .add_extension(root_ski, critical=False)
            .sign(
                remote_private_key(store, root_key.handle, root_key.public_key),
                signature_hash(algorithm),
            )
        )
        issuing_builder = (
            x509.CertificateBuilder()
            .subject_name(issuing_name)
            .issuer_name(root_name)
            .public_key(issuing_key.public_key)
            .serial_number(random_serial())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + ISSUING_VALIDITY)
        )
        issuing_cert = (
            ISSUING_CA.apply(issuing_builder)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(issuing_key.public_key), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(root_ski),
                critical=False,
            )
            .sign(
                remote_private_key(store, root_key.handle, root_key.public_key),
                signature_hash(algorithm),
            )
        )
        rows = tuple(
            CaAuthorityRow(
                id=row_id,
                role=role,
                algorithm=algorithm.value,
                storage=storage,
                store_ref=handle.ref,
                tsg_id=root_tsg_id,
                certificate_der=cert.public_bytes(serialization.Encoding.DER),
                created_at=now,
            )
            for role, row_id, handle, cert in (
                (ROOT, root_id, root_key.handle, root_cert),
                (ISSUING, issuing_id, issuing_key.handle, issuing_cert),
            )
        )
        return CreatedCa(root_cert, issuing_cert, handles, rows)

    # ------------------------------------------------------------ use

    def _load(self) -> dict[str, Authority]:
        with self._lock:
            if self._authorities is not None:
                return self._authorities
            with self._db.read() as s:
                rows = s.scalars(select(CaAuthorityRow)).all()
            found: dict[str, Authority] = {}
            for row in rows:
                algorithm = Algorithm(row.algorithm)
                found[row.role] = Authority(
                    role=row.role,
                    algorithm=algorithm,
                    handle=KeyHandle(
                        row.storage, row.store_ref, algorithm, KeyContext(row.id, 1, row.tsg_id)
                    ),
                    certificate=x509.load_der_x509_certificate(row.certificate_der),
                )
            if ROOT not in found or ISSUING not in found:
                raise ConfigurationError("the built-in CA is not initialized; run `signery init`")
            self._authorities = found
            return found

    def issuing_certificate(self) -> x509.Certificate:
        return self._load()[ISSUING].certificate

    # ------------------------------------------------------------ revocation list

    def current_crl(self) -> bytes:
        """The newest CRL (DER), made anew when there is none or it nears nextUpdate."""
        now = self._clock.now()
        with self._db.read() as s:
            row = s.scalars(select(CrlRow).order_by(CrlRow.number.desc()).limit(1)).first()
        if row is not None and row.next_update - CRL_REFRESH_MARGIN > now:
            return row.der
        try:
            with self._db.write() as s:
                return self.publish_crl(s)
        except DatabaseError:
            # Another replica published one at the same moment: serve theirs.
            with self._db.read() as s:
                row = s.scalars(select(CrlRow).order_by(CrlRow.number.desc()).limit(1)).first()
            if row is None:
                raise
            return row.der

    def publish_crl(self, session: Session) -> bytes:
        """Sign a new CRL listing every revoked, unexpired certificate this CA issued,
        and store it in ``session``'s transaction (so it commits with a revocation)."""
        issuing = self._load()[ISSUING]
        # One publisher at a time: two revocations committing at once must make CRLs
        # n and n+1, the later listing both (RFC 5280 §5.2.3: CRL numbers increase
        # monotonically). PostgreSQL: a row lock on the issuing CA, held to commit;
        # the statements after it see every revocation committed before it. SQLite:
        # write transactions are already serial (BEGIN IMMEDIATE).
        session.execute(
            select(CaAuthorityRow.id).where(CaAuthorityRow.role == ISSUING).with_for_update()
        )
        now = self._clock.now()
        last = session.scalar(select(func.max(CrlRow.number)))
        number = (last or 0) + 1
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(issuing.certificate.subject)
            .last_update(now)
            .next_update(now + self.crl_validity)
            .add_extension(x509.CRLNumber(number), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    rsa_or_ec(issuing.certificate.public_key())
                ),
                critical=False,
            )
        )
        revoked = session.scalars(
            select(CertificateRow).where(
                CertificateRow.revoked_at.is_not(None),
                CertificateRow.source == "builtin",
                CertificateRow.not_after > now,
            )
        )
        for cert in revoked:
            entry = (
                x509.RevokedCertificateBuilder()
                .serial_number(int(cert.serial, 16))
                .revocation_date(cert.revoked_at or now)
            )
            reason = REASONS.get(cert.revocation_reason or "")
            if reason is not None:
                entry = entry.add_extension(x509.CRLReason(reason), critical=False)
            builder = builder.add_revoked_certificate(entry.build())
        store = self._keystores.get(issuing.handle.store)
        crl = builder.sign(
            remote_private_key(store, issuing.handle, rsa_or_ec(issuing.certificate.public_key())),
            signature_hash(issuing.algorithm),
        )
        der = crl.public_bytes(serialization.Encoding.DER)
        session.add(
            CrlRow(
                number=number,
                der=der,
                this_update=now,
                next_update=now + self.crl_validity,
                created_at=now,
            )
        )
        session.flush()
        return der

    def chain(self) -> tuple[x509.Certificate, x509.Certificate]:
        """(issuing CA, root CA) certificates."""
        a = self._load()
        return a[ISSUING].certificate, a[ROOT].certificate

    def issue_code_signing(
        self, public_key: PublicKey, subject: p.KeySubject, default_cn: str, validity_days: int
    ) -> IssuedCertificate:
        if validity_days > self.max_leaf_validity_days:
            raise InvalidRequest(
                f"validity_days {validity_days} exceeds the built-in CA's maximum of "
                f"{self.max_leaf_validity_days} days"
            )
        issuing = self._load()[ISSUING]
        root = self._load()[ROOT]
        now = self._clock.now()
        not_after = min(
            now + timedelta(days=validity_days), issuing.certificate.not_valid_after_utc
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject_name(subject, default_cn))
            .issuer_name(issuing.certificate.subject)
            .public_key(public_key)
            .serial_number(random_serial())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(not_after)
        )
        builder = (
            CODE_SIGNING.apply(builder)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    rsa_or_ec(issuing.certificate.public_key())
                ),
                critical=False,
            )
        )
        if subject.email:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.RFC822Name(subject.email)]), critical=False
            )
        builder = with_revocation_pointers(builder, self.public_url)
        store = self._keystores.get(issuing.handle.store)
        ca_public = rsa_or_ec(issuing.certificate.public_key())
        cert = builder.sign(
            remote_private_key(store, issuing.handle, ca_public), signature_hash(issuing.algorithm)
        )
        return IssuedCertificate(cert, (cert, issuing.certificate, root.certificate))


def with_revocation_pointers(
    builder: x509.CertificateBuilder, public_url: str | None
) -> x509.CertificateBuilder:
    """Add the CRL distribution point and the AIA caIssuers URL of the built-in
    issuing CA (RFC 5280 §4.2.1.13 and §4.2.2.1: where relying parties find the CRL
    and the issuer's certificate, Signery's own endpoints); unchanged when the
    server has no ``public_url`` to point at."""
    if not public_url:
        return builder
    base = public_url.rstrip("/")
    return builder.add_extension(
        x509.CRLDistributionPoints(
            [
                x509.DistributionPoint(
                    full_name=[x509.UniformResourceIdentifier(f"{base}{CRL_PATH}")],
                    relative_name=None,
                    reasons=None,
                    crl_issuer=None,
                )
            ]
        ),
        critical=False,
    ).add_extension(
        x509.AuthorityInformationAccess(
            [
                x509.AccessDescription(
                    AuthorityInformationAccessOID.CA_ISSUERS,
                    x509.UniformResourceIdentifier(f"{base}{ISSUER_CERT_PATH}"),
                )
            ]
        ),
        critical=False,
    )


def rsa_or_ec(key: object) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
    """The public key of an issuing authority (CA or TSA): only RSA and EC keys sign
    certificates and time-stamp tokens here."""
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise ConfigurationError("CA and TSA keys must be RSA or EC")
    return key
