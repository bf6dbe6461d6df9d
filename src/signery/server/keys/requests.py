"""Certificates for signing keys from external CA connectors.

A key bound to a connector gets a CSR made and signed through its key store
(the CSR's signature is the proof that the private key exists there and never
left), and waits ``pending`` until the CA's chain arrives. What the CA does with
the CSR is its connector's business (signery.server.connectors.base.Connector,
one module per kind): the request is submitted when it is made and collected
when an administrator asks again; an administrator may also upload the chain,
whatever the kind.
The chain is checked (signery.server.ca.chains) before anything changes; then
one transaction records the certificate, makes it current, activates the key
and answers the request. A refused chain changes nothing; a failed
submission only notes its error on the request, for the operator and a retry.

Renewing or reissuing a connector key asks the CA again in the same way; the
key keeps signing with its current certificate until the new one arrives.
Rotating one (signery.server.keys.lifecycle) asks for a certificate for a new
version, ``pending`` and not current; installing that certificate completes the
rotation: the new version becomes current, the previous one is archived.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from signery import protocol as p
from signery.crypto import PublicKey
from signery.errors import (
    Conflict,
    InvalidRequest,
    KeyChangedConcurrently,
    KeyDestroyed,
    KeyDestructionScheduled,
    NoCertificateRequest,
    NoPendingRequest,
    RotationPending,
    SignatureVerificationFailed,
    SigneryError,
)
from signery.keystores import KeyHandle, KeyStore, KeyStoreRegistry, remote_private_key
from signery.protocol import (
    AuditOutcome,
    CertificateRequestStatus,
    KeyStatus,
)
from signery.server.access.authz import Principal
from signery.server.access.context import RequestContext
from signery.server.audit.events import Actor, AuditRecord, EventKind, outcome_of
from signery.server.audit.recorder import AuditRecorder
from signery.server.ca.chains import parse_certificates, pem_of, validate_issued_chain
from signery.server.ca.models import CertificateRow
from signery.server.ca.profiles import CODE_SIGNING
from signery.server.ca.service import signature_hash, subject_name
from signery.server.connectors.base import (
    ENROLL,
    REISSUE,
    RENEW,
    ROTATE,
    Answer,
    CertificateOrder,
    Connector,
    Pending,
)
from signery.server.connectors.service import ConnectorService
from signery.server.keys.models import (
    CertificateRequestRow,
    KeyVersionRow,
    SigningKeyRow,
)
from signery.server.persistence.db import Database, flush_unique, new_id
from signery.server.runtime.clock import Clock

log = logging.getLogger("signery.keys")

__all__ = [
    "ENROLL",
    "REISSUE",
    "RENEW",
    "ROTATE",
    "CertificateRequests",
    "build_csr",
    "pending_rotation",
    "request_wire",
]
MAX_ERROR_CHARS = 1000
_PENDING = CertificateRequestStatus.PENDING.value


def build_csr(
    store: KeyStore,
    handle: KeyHandle,
    public_key: PublicKey,
    subject: p.KeySubject,
    default_cn: str,
) -> x509.CertificateSigningRequest:
    """A PKCS#10 request signed by the key store, asking for a code-signing profile
    (RFC 2986 extensionRequest: EKU codeSigning, KU digitalSignature)."""
    builder = CODE_SIGNING.request(
        x509.CertificateSigningRequestBuilder().subject_name(subject_name(subject, default_cn))
    )
    if subject.email:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.RFC822Name(subject.email)]), critical=False
        )
    csr = builder.sign(
        remote_private_key(store, handle, public_key), signature_hash(handle.algorithm)
    )
    # Verify-after-sign, as for every signature a store makes.
    if not csr.is_signature_valid:
        raise SignatureVerificationFailed("the key store's CSR signature does not verify")
    return csr


def pending_rotation(s: Session, key: SigningKeyRow) -> KeyVersionRow | None:
    """The version a rotation of this connector key waits to install a certificate
    for: the one above the current version (there is at most one)."""
    return s.scalars(
        select(KeyVersionRow)
        .where(
            KeyVersionRow.key_id == key.id,
            KeyVersionRow.version > key.current_version,
            KeyVersionRow.status == KeyStatus.PENDING.value,
        )
        .order_by(KeyVersionRow.version.desc())
        .limit(1)
    ).first()


def request_wire(row: CertificateRequestRow, key_version: int) -> p.CertificateRequest:
    return p.CertificateRequest(
        id=row.id,
        key_version=key_version,
        connector_id=row.connector_id,
        purpose=row.purpose,
        status=CertificateRequestStatus(row.status),
        error=row.error,
        csr_pem=row.csr_pem,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


@dataclass(frozen=True, slots=True)
class _Pending:
    """What an answer to a pending request is checked against."""

    key_id: str
    tsg_id: str
    algorithm: str
    version: int
    request_id: str
    purpose: str
    csr_pem: str
    public_key: PublicKey
    connector: Connector


class CertificateRequests:
    def __init__(
        self,
        *,
        db: Database,
        recorder: AuditRecorder,
        clock: Clock,
        keystores: KeyStoreRegistry,
        connectors: ConnectorService,
    ) -> None:
        self._db = db
        self._recorder = recorder
        self._clock = clock
        self._keystores = keystores
        self._connectors = connectors

    # ------------------------------------------------------------ used by KeyService

    def connector_for(
        self, s: Session, ref: str | None, key_path: str, store: KeyStore
    ) -> Connector:
        if not ref:
            raise InvalidRequest("certificate_authority=connector needs ca_connector (name or id)")
        return self._connectors.for_key(s, ref, key_path, store.kind)

    def new_request(
        self,
        version_id: str,
        connector: Connector,
        purpose: str,
        subject: p.KeySubject,
        csr: x509.CertificateSigningRequest,
        now: datetime,
    ) -> CertificateRequestRow:
        return CertificateRequestRow(
            id=new_id(),
            key_version_id=version_id,
            connector_id=connector.id,
            purpose=purpose,
            subject_json=subject.model_dump_json(),
            csr_pem=csr.public_bytes(serialization.Encoding.PEM).decode("ascii"),
            status=_PENDING,
            error=None,
            certificate_id=None,
            created_at=now,
            updated_at=now,
        )

    def connector_of(self, s: Session, key: SigningKeyRow) -> Connector:
        return self._connectors.by_id(s, self._connector_id(key))

    def supersede_pending(self, s: Session, version: KeyVersionRow, now: datetime) -> list[str]:
        """Close the version's pending requests (in the caller's transaction): a
        certificate can no longer be installed for them. Returns their ids."""
        rows = s.scalars(
            select(CertificateRequestRow)
            .where(
                CertificateRequestRow.key_version_id == version.id,
                CertificateRequestRow.status == _PENDING,
            )
            .with_for_update()
        ).all()
        for row in rows:
            row.status = CertificateRequestStatus.SUPERSEDED.value
            row.updated_at = now
        return [row.id for row in rows]

    def newest(self, s: Session, version: KeyVersionRow) -> p.CertificateRequest | None:
        row = s.scalars(
            select(CertificateRequestRow)
            .where(CertificateRequestRow.key_version_id == version.id)
            .order_by(CertificateRequestRow.created_at.desc(), CertificateRequestRow.id)
            .limit(1)
        ).first()
        return request_wire(row, version.version) if row is not None else None

    def csr_pem(self, s: Session, key: SigningKeyRow) -> str:
        """The CSR of the key's pending request (PEM), for the administrator to take
        to the CA."""
        row = self._pending_row(s, key)
        if row is None:
            raise NoCertificateRequest("the key has no pending certificate request")
        return row.csr_pem

    def request_again(
        self,
        principal: Principal,
        key_id: str,
        tsg_path: str,
        handle: KeyHandle,
        subject: p.KeySubject,
        purpose: str,
        ctx: RequestContext,
    ) -> None:
        """Renew or reissue through the connector: a new CSR for the same key pair
        (any older pending request is superseded). The current certificate stays in
        use until the new one is installed."""
        with self._db.read() as s:
            key = self._key(s, key_id)
            version = self._current_version(s, key)
            connector = self._connectors.by_id(s, self._connector_id(key))
            self._check_no_rotation(s, key)
        store = self._keystores.get(key.storage)
        connector.check_store(store.kind)
        public_key = _public_key(version.public_key_der)
        csr = build_csr(store, handle, public_key, subject, key.name)
        now = self._clock.now()
        with self._db.write() as s:
            # Checked again where it counts: a rotation may have started meanwhile.
            self._check_no_rotation(s, self._key(s, key_id))
            older = s.scalars(
                select(CertificateRequestRow).where(
                    CertificateRequestRow.key_version_id == version.id,
                    CertificateRequestRow.status == _PENDING,
                )
            ).all()
            for previous in older:
                previous.status = CertificateRequestStatus.SUPERSEDED.value
                previous.updated_at = now
            row = self.new_request(version.id, connector, purpose, subject, csr, now)
            s.add(row)
            s.flush()
            self._recorder.record(
                s,
                AuditRecord(
                    EventKind.CERTIFICATE_REQUESTED,
                    AuditOutcome.SUCCEEDED,
                    Actor.of(principal),
                    tsg_id=key.tsg_id,
                    tsg_path=tsg_path,
                    key_id=key.id,
                    key_version=version.version,
                    algorithm=key.algorithm,
                    context=ctx,
                    details={
                        "certificate_request": row.id,
                        "purpose": purpose,
                        "ca_connector": connector.id,
                        "subject": x509.load_pem_x509_csr(
                            row.csr_pem.encode()
                        ).subject.rfc4514_string(),
                        "superseded": [r.id for r in older],
                    },
                ),
            )
        self.submit(Actor.of(principal), key_id, tsg_path, ctx)

    # ------------------------------------------------------------ answers from the CA

    def install(
        self, actor: Actor, key_id: str, tsg_path: str, chain_text: str, ctx: RequestContext
    ) -> None:
        """Install the chain an administrator brought back from the CA (csr
        connector; also accepted for an est connector whose CA answered out of band)."""
        pending = self._pending(key_id)
        certs = parse_certificates(chain_text)
        chain = validate_issued_chain(
            certs, pending.public_key, pending.connector.roots, self._clock.now()
        )
        self._install(actor, pending, chain, tsg_path, ctx)

    def submit(self, actor: Actor, key_id: str, tsg_path: str, ctx: RequestContext | None) -> None:
        """Hand the key's pending request to its CA and install what comes back at
        once. A failure stays noted on the request (and audited) for a retry with
        ``POST /api/v1/keys/{key}/enroll``, instead of failing the caller."""
        try:
            pending = self._pending(key_id)
            self._ask(actor, pending, pending.connector.submit, tsg_path, ctx)
        except SigneryError as e:
            # Noted on the request and audited by _ask(); the caller sees the
            # key pending with certificate_request.error.
            log.info("certificate request failed", extra={"key_id": key_id, "code": e.code})

    def collect(self, actor: Actor, key_id: str, tsg_path: str, ctx: RequestContext | None) -> None:
        """Ask the key's CA again about its pending request and install what comes
        back. A failure is noted on the request, audited, and raised."""
        pending = self._pending(key_id)
        connector = pending.connector
        if not connector.answers_online:
            raise InvalidRequest(
                f"CA connector {connector.name!r} is a {connector.kind} connector: "
                "upload the issued chain instead"
            )
        self._ask(actor, pending, connector.collect, tsg_path, ctx)

    # ------------------------------------------------------------ internals

    def _ask(
        self,
        actor: Actor,
        pending: _Pending,
        ask: Callable[[CertificateOrder], Answer],
        tsg_path: str,
        ctx: RequestContext | None,
    ) -> None:
        """Ask the CA (``ask``: the connector's submit or collect) and install an
        issued chain once it is checked; a pending answer notes what the CA said."""
        order = CertificateOrder(x509.load_pem_x509_csr(pending.csr_pem.encode()), pending.purpose)
        try:
            answer = ask(order)
            if isinstance(answer, Pending):
                if answer.note is not None:
                    self._note(pending, answer.note)
                return
            chain = validate_issued_chain(
                answer.certificates,
                pending.public_key,
                pending.connector.roots,
                self._clock.now(),
            )
            self._install(actor, pending, chain, tsg_path, ctx)
        except NoPendingRequest:
            raise  # answered meanwhile (another answer won): nothing to note
        except SigneryError as e:
            self._failed(actor, pending, tsg_path, e, ctx)
            raise

    def _install(
        self,
        actor: Actor,
        pending: _Pending,
        chain: tuple[x509.Certificate, ...],
        tsg_path: str,
        ctx: RequestContext | None,
    ) -> None:
        leaf = chain[0]
        now = self._clock.now()
        serial = format(leaf.serial_number, "x")
        with self._db.write() as s:
            request = s.get(CertificateRequestRow, pending.request_id, with_for_update=True)
            if request is None or request.status != _PENDING:
                raise NoPendingRequest(
                    "the certificate request was answered or superseded meanwhile"
                )
            version = s.get(KeyVersionRow, request.key_version_id)
            key = s.get(SigningKeyRow, pending.key_id)
            assert version is not None
            assert key is not None
            rotation = version.version > key.current_version
            previous_version = key.current_version
            if rotation:
                key = self._take_current(s, key, version.version, now)
            cert = CertificateRow(
                id=new_id(),
                key_version_id=version.id,
                serial=serial,
                subject=leaf.subject.rfc4514_string(),
                issuer=leaf.issuer.rfc4514_string(),
                not_before=leaf.not_valid_before_utc,
                not_after=leaf.not_valid_after_utc,
                fingerprint_sha256=hashlib.sha256(
                    leaf.public_bytes(serialization.Encoding.DER)
                ).hexdigest(),
                chain_pem=pem_of(chain),
                source=pending.connector.id,
                created_at=now,
            )
            s.add(cert)
            flush_unique(s, Conflict(f"a certificate with serial {serial} is already recorded"))
            previous = version.certificate_id
            version.certificate_id = cert.id
            activated = key.status == KeyStatus.PENDING.value
            if version.status == KeyStatus.PENDING.value:
                version.status = KeyStatus.ACTIVE.value
            if activated:
                key.status = KeyStatus.ACTIVE.value
            key.subject_json = request.subject_json
            key.updated_at = now
            request.status = CertificateRequestStatus.ISSUED.value
            request.certificate_id = cert.id
            request.error = None
            request.updated_at = now
            if rotation:
                # The version that signed until now is archived in the same
                # transaction; its material stays, so signings under way finish.
                old = s.scalars(
                    select(KeyVersionRow).where(
                        KeyVersionRow.key_id == key.id,
                        KeyVersionRow.version == previous_version,
                    )
                ).one()
                old.status = KeyStatus.ARCHIVED.value
                old.archived_at = now
            self._recorder.record(
                s,
                AuditRecord(
                    EventKind.CERTIFICATE_RECEIVED,
                    AuditOutcome.SUCCEEDED,
                    actor,
                    tsg_id=key.tsg_id,
                    tsg_path=tsg_path,
                    key_id=key.id,
                    key_version=version.version,
                    algorithm=key.algorithm,
                    context=ctx,
                    details={
                        "certificate_request": request.id,
                        "purpose": request.purpose,
                        "ca_connector": pending.connector.id,
                        "certificate_serial": serial,
                        "certificate_subject": cert.subject,
                        "certificate_issuer": cert.issuer,
                        "not_after": cert.not_after.isoformat(),
                        "previous_certificate_id": previous,
                        "key_activated": activated,
                    },
                ),
            )
            if rotation:
                self._recorder.record(
                    s,
                    AuditRecord(
                        EventKind.KEY_ROTATED,
                        AuditOutcome.SUCCEEDED,
                        actor,
                        tsg_id=key.tsg_id,
                        tsg_path=tsg_path,
                        key_id=key.id,
                        key_version=version.version,
                        algorithm=key.algorithm,
                        context=ctx,
                        details={
                            "previous_version": previous_version,
                            "version": version.version,
                            "certificate_serial": serial,
                            "certificate_subject": cert.subject,
                            "certificate_request": request.id,
                            "purpose": request.purpose,
                            "ca_connector": pending.connector.id,
                        },
                    ),
                )

    def _take_current(
        self, s: Session, key: SigningKeyRow, version: int, now: datetime
    ) -> SigningKeyRow:
        """Make ``version`` (a rotation's new version) the key's current one, by a
        compare-and-set on the current version this transaction read: a change that
        got here first (another install, a destruction) wins and this one changes
        nothing. A key scheduled for destruction does not complete its rotation."""
        if key.status == KeyStatus.DESTROYED.value:
            raise KeyDestroyed()
        if key.destroy_at is not None:
            raise KeyDestructionScheduled()
        claimed = s.execute(
            update(SigningKeyRow)
            .where(
                SigningKeyRow.id == key.id,
                SigningKeyRow.current_version == key.current_version,
                SigningKeyRow.status != KeyStatus.DESTROYED.value,
                SigningKeyRow.destroy_at.is_(None),
            )
            .values(current_version=version, updated_at=now)
            .execution_options(synchronize_session=False)
        )
        if claimed.rowcount != 1:  # type: ignore[attr-defined]
            raise KeyChangedConcurrently(
                "the key was rotated, destroyed or scheduled for destruction meanwhile"
            )
        fresh = s.get(SigningKeyRow, key.id, populate_existing=True)
        assert fresh is not None
        return fresh

    def _failed(
        self,
        actor: Actor,
        pending: _Pending,
        tsg_path: str,
        error: SigneryError,
        ctx: RequestContext | None,
    ) -> None:
        message = f"{error.code}: {error.detail}"[:MAX_ERROR_CHARS]
        now = self._clock.now()
        with self._db.write() as s:
            request = s.get(CertificateRequestRow, pending.request_id, with_for_update=True)
            if request is not None and request.status == _PENDING:
                request.error = message
                request.updated_at = now
            self._recorder.record(
                s,
                AuditRecord(
                    EventKind.ENROLLMENT_FAILED,
                    outcome_of(error),
                    actor,
                    reason=error.code,
                    tsg_id=pending.tsg_id,
                    tsg_path=tsg_path,
                    key_id=pending.key_id,
                    key_version=pending.version,
                    algorithm=pending.algorithm,
                    context=ctx,
                    details={
                        "certificate_request": pending.request_id,
                        "ca_connector": pending.connector.id,
                        "detail": error.detail[:MAX_ERROR_CHARS],
                    },
                ),
            )
        error.audited = True

    def _note(self, pending: _Pending, message: str) -> None:
        with self._db.write() as s:
            request = s.get(CertificateRequestRow, pending.request_id, with_for_update=True)
            if request is not None and request.status == _PENDING:
                request.error = message
                request.updated_at = self._clock.now()

    def _pending(self, key_id: str) -> _Pending:
        with self._db.read() as s:
            key = self._key(s, key_id)
            request = self._pending_row(s, key)
            if request is None:
                raise NoPendingRequest(
                    "the key has no pending certificate request: renew or reissue it to make one"
                )
            # The version the request is for (a pending rotation's new version, or
            # the current one): the issued chain must certify its public key.
            version = s.get(KeyVersionRow, request.key_version_id)
            assert version is not None
            connector = self._connectors.by_id(s, self._connector_id(key))
        return _Pending(
            key_id=key.id,
            tsg_id=key.tsg_id,
            algorithm=key.algorithm,
            version=version.version,
            request_id=request.id,
            purpose=request.purpose,
            csr_pem=request.csr_pem,
            public_key=_public_key(version.public_key_der),
            connector=connector,
        )

    def _pending_row(self, s: Session, key: SigningKeyRow) -> CertificateRequestRow | None:
        """The pending request of the newest version that has one: a pending
        rotation's new version first, else the current version (archived versions
        never get a certificate again)."""
        return s.scalars(
            select(CertificateRequestRow)
            .join(KeyVersionRow, KeyVersionRow.id == CertificateRequestRow.key_version_id)
            .where(
                KeyVersionRow.key_id == key.id,
                KeyVersionRow.version >= key.current_version,
                CertificateRequestRow.status == _PENDING,
            )
            .order_by(KeyVersionRow.version.desc(), CertificateRequestRow.created_at.desc())
            .limit(1)
        ).first()

    @staticmethod
    def _check_no_rotation(s: Session, key: SigningKeyRow) -> None:
        rotating = pending_rotation(s, key)
        if rotating is not None:
            # One certificate request at a time: the rotation's request would
            # otherwise compete with a renewal of the version it replaces.
            raise RotationPending(
                f"version {rotating.version} waits for its certificate: install it "
                "(upload or enroll) before renewing or reissuing"
            )

    @staticmethod
    def _key(s: Session, key_id: str) -> SigningKeyRow:
        key = s.get(SigningKeyRow, key_id)
        assert key is not None
        return key

    @staticmethod
    def _current_version(s: Session, key: SigningKeyRow) -> KeyVersionRow:
        version = s.scalar(
            select(KeyVersionRow).where(
                KeyVersionRow.key_id == key.id, KeyVersionRow.version == key.current_version
            )
        )
        assert version is not None
        return version

    @staticmethod
    def _connector_id(key: SigningKeyRow) -> str:
        if key.ca_connector_id is None:
            raise InvalidRequest("this key is not certified through a CA connector")
        return key.ca_connector_id


def _public_key(der: bytes) -> PublicKey:
    key: Any = serialization.load_der_public_key(der)
    return key  # type: ignore[no-any-return]
