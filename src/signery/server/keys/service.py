"""Signing keys: named key pairs in a key store, with versions and certificates."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography.hazmat.primitives import serialization
from sqlalchemy import select
from sqlalchemy.orm import Session

from signery import protocol as p
from signery.crypto import PublicKey, public_key_pem, schemes_for
from signery.errors import (
    CertificateNotFound,
    Conflict,
    InvalidRequest,
    KeyDestroyed,
    KeyNameAmbiguous,
    KeyNameShadows,
    KeyNotFound,
    NameTaken,
    PermissionDenied,
    TsgNotFound,
)
from signery.keystores import Destroyable, KeyContext, KeyHandle, KeyStoreRegistry, health_of
from signery.protocol import (
    Algorithm,
    AuditOutcome,
    CertificateAuthority,
    KeyStatus,
    PrincipalType,
)
from signery.server.access.authz import Authorizer, Permission, Principal
from signery.server.access.context import RequestContext
from signery.server.audit.events import Actor, AuditRecord, EventKind
from signery.server.audit.recorder import AuditRecorder
from signery.server.ca.models import CertificateRow
from signery.server.ca.revocation import REVOCATION_REASONS, cert_info
from signery.server.ca.service import BuiltinCa, IssuedCertificate
from signery.server.ca.subject_policy import require_allowed_subject
from signery.server.connectors.base import ENROLL, REISSUE, RENEW
from signery.server.keys.models import KeyVersionRow, SigningKeyRow
from signery.server.keys.names import shadows
from signery.server.keys.policy_reads import key_usage, wire_policy
from signery.server.keys.requests import CertificateRequests, build_csr
from signery.server.persistence.db import Database, flush_unique, new_id
from signery.server.runtime.clock import Clock
from signery.server.tsg.models import TsgRow
from signery.server.tsg.tree import TsgDirectory, visible_rows_by_ref

# The widest horizon of ``GET /keys?expiring_within_days``: a century (and far
# from the overflow of datetime arithmetic).
MAX_EXPIRING_WITHIN_DAYS = 36_500


def load_public_key_der(der: bytes) -> PublicKey:
    key = serialization.load_der_public_key(der)
    assert not isinstance(key, str)
    return key  # type: ignore[return-value]


def chain_list(chain_pem: str | None) -> list[str]:
    """Split a PEM bundle into one PEM string per certificate, order kept."""
    if not chain_pem:
        return []
    marker = "-----END CERTIFICATE-----"
    return [part.strip() + "\n" + marker + "\n" for part in chain_pem.split(marker) if part.strip()]


def certificate_row(
    issued: IssuedCertificate, key_version_id: str, now: datetime
) -> CertificateRow:
    cert = issued.certificate
    return CertificateRow(
        id=new_id(),
        key_version_id=key_version_id,
        serial=format(cert.serial_number, "x"),
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        fingerprint_sha256=hashlib.sha256(
            cert.public_bytes(serialization.Encoding.DER)
        ).hexdigest(),
        chain_pem=issued.chain_pem,
        created_at=now,
    )


@dataclass(frozen=True, slots=True)
class ResolvedKey:
    row: SigningKeyRow
    path: str


class KeyService:
    def __init__(
        self,
        *,
        db: Database,
        authz: Authorizer,
        recorder: AuditRecorder,
        clock: Clock,
        directory: TsgDirectory,
        keystores: KeyStoreRegistry,
        ca: BuiltinCa,
        requests: CertificateRequests | None = None,
    ) -> None:
        # External CA connectors; without them, certificate_authority=connector is refused.
        self._requests = requests
        self._db = db
        self._authz = authz
        self._recorder = recorder
        self._clock = clock
        self._directory = directory
        self._keystores = keystores
        self._ca = ca

    # ------------------------------------------------------------ create

    def create(self, principal: Principal, req: p.KeyCreate, ctx: RequestContext) -> p.SigningKey:
        """Create a key: generate the pair in its store, get its certificate, then
        record everything in one transaction. If that fails, the new key pair is
        destroyed again, so there is never a half-created key."""
        tsg_id = req.tsg_id or principal.tsg_id
        store = self._keystores.get(req.storage)
        subject = req.subject or p.KeySubject()
        if (
            req.certificate_authority is CertificateAuthority.BUILTIN
            and req.validity_days > self._ca.max_leaf_validity_days
        ):
            raise InvalidRequest(
                f"validity_days {req.validity_days} exceeds the built-in CA's maximum of "
                f"{self._ca.max_leaf_validity_days} days"
            )
        with self._db.read() as s:
            path = self._directory.path(s, tsg_id)
            if path is None:
                raise TsgNotFound()
            self._authz.require(principal, Permission.KEY_CREATE, path, not_found=TsgNotFound)
            connector = None
            if req.certificate_authority is CertificateAuthority.CONNECTOR:
                # Before any key pair exists: a refused connector (missing, not on
                # this TSG's path, public with a software store) generates nothing.
                connector = self._connector_requests().connector_for(
                    s, req.ca_connector, path, store
                )
            elif req.ca_connector is not None:
                raise InvalidRequest("ca_connector goes with certificate_authority=connector")
            if req.certificate_authority is CertificateAuthority.BUILTIN:
                # Before any key pair exists: the built-in CA certifies only the
                # subjects the policies on the TSG's path allow.
                require_allowed_subject(s, path, subject, req.name)
            if s.scalar(
                select(SigningKeyRow.id).where(
                    SigningKeyRow.tsg_id == tsg_id, SigningKeyRow.name == req.name
                )
            ):
                raise NameTaken(f"a key named {req.name!r} already exists in TSG {tsg_id}")
            # Before any key pair exists; checked again when the key is recorded.
            self._check_name_shadows(s, req.name, path)

        key_id, version_id = new_id(), new_id()
        generated = store.generate(req.algorithm, KeyContext(key_id, 1, tsg_id, label=req.name))
        try:
            issued: IssuedCertificate | None = None
            csr = None
            if req.certificate_authority is CertificateAuthority.BUILTIN:
                issued = self._ca.issue_code_signing(
                    generated.public_key, subject, req.name, req.validity_days
                )
            elif connector is not None:
                # Signed by the key store: the CSR proves the key pair is there.
                csr = build_csr(store, generated.handle, generated.public_key, subject, req.name)
            # A connector's key waits for its certificate before it may sign.
            status = KeyStatus.PENDING if connector is not None else KeyStatus.ACTIVE
            now = self._clock.now()
            with self._db.write() as s:
                self._check_name_shadows(s, req.name, path, lock=True)
                key = SigningKeyRow(
                    id=key_id,
                    name=req.name,
                    tsg_id=tsg_id,
                    algorithm=req.algorithm.value,
                    storage=store.name,
                    certificate_authority=req.certificate_authority.value,
                    ca_connector_id=connector.id if connector is not None else None,
                    status=status.value,
                    current_version=1,
                    description=req.description,
                    subject_json=subject.model_dump_json(),
                    validity_days=req.validity_days,
                    created_by=principal.id,
                    created_at=now,
                    updated_at=now,
                    rotation_period_days=req.rotation_period_days,
                    next_rotation_at=now + timedelta(days=req.rotation_period_days)
                    if req.rotation_period_days
                    else None,
                )
                s.add(key)
                flush_unique(
                    s, NameTaken(f"a key named {req.name!r} already exists in TSG {tsg_id}")
                )
                version = KeyVersionRow(
                    id=version_id,
                    key_id=key_id,
                    version=1,
                    status=status.value,
                    store_ref=generated.handle.ref,
                    public_key_der=generated.public_key.public_bytes(
                        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                    ),
                    certificate_id=None,
                    created_at=now,
                )
                s.add(version)
                s.flush()
                details: dict[str, object] = {
                    "name": req.name,
                    "algorithm": req.algorithm.value,
                    "storage": store.name,
                    "certificate_authority": req.certificate_authority.value,
                }
                if issued is not None:
                    cert_row = certificate_row(issued, version_id, now)
                    s.add(cert_row)
                    s.flush()
                    version.certificate_id = cert_row.id
                    details["certificate_serial"] = cert_row.serial
                    details["certificate_subject"] = cert_row.subject
                if connector is not None and csr is not None:
                    request = self._connector_requests().new_request(
                        version_id, connector, ENROLL, subject, csr, now
                    )
                    s.add(request)
                    s.flush()
                    details["ca_connector"] = connector.id
                    details["certificate_request"] = request.id
                self._recorder.record(
                    s,
                    AuditRecord(
                        EventKind.KEY_CREATED,
                        AuditOutcome.SUCCEEDED,
                        Actor.of(principal),
                        tsg_id=tsg_id,
                        tsg_path=path,
                        key_id=key_id,
                        key_version=1,
                        algorithm=req.algorithm.value,
                        context=ctx,
                        details=details,
                    ),
                )
                wire = self._wire(s, key)
        except BaseException:
            if isinstance(store, Destroyable):
                store.destroy(generated.handle)
            raise
        if connector is not None:
            # Submitted at once; a failure leaves the key pending with the error noted
            # on its request, for `POST /api/v1/keys/{key}/enroll` to retry.
            self._connector_requests().submit(Actor.of(principal), key_id, path, ctx)
            with self._db.read() as s:
                created = s.get(SigningKeyRow, key_id)
                assert created is not None
                wire = self._wire(s, created)
        return wire

    def _check_name_shadows(self, s: Session, name: str, path: str, *, lock: bool = False) -> None:
        """Refuse a name that would take over a deeper key for an account above
        (signery.server.keys.names). With ``lock``, creations are serialized on the
        root TSG's row first (PostgreSQL; SQLite serializes writers already), so two
        keys created at once cannot both pass the check; NO KEY UPDATE leaves the
        row free for the foreign keys of everything else."""
        if lock:
            root_id = path.strip("/").split("/")[0]
            s.execute(select(TsgRow.id).where(TsgRow.id == root_id).with_for_update(key_share=True))
        existing = s.scalars(
            select(TsgRow.path)
            .join(SigningKeyRow, SigningKeyRow.tsg_id == TsgRow.id)
            .where(SigningKeyRow.name == name)
        )
        if shadows(path, existing):
            raise KeyNameShadows(
                f"a key named {name!r} here would take the place of a deeper key that "
                "accounts above this TSG sign with under that name; choose another name"
            )

    # ------------------------------------------------------------ read

    def keystores(self, principal: Principal) -> list[p.KeyStoreInfo]:
        """The key stores this server is configured with, and whether each is up.
        (Server configuration, not tenant data: any user may see it.)"""
        if principal.type is not PrincipalType.USER:
            raise PermissionDenied("key stores are listed for users")
        out = []
        for store in self._keystores.all():
            health = health_of(store)
            out.append(
                p.KeyStoreInfo(
                    name=store.name,
                    kind=store.kind,
                    healthy=health.ok,
                    detail=health.detail,
                    algorithms=sorted(store.supported_algorithms),
                )
            )
        return out

    def get(self, principal: Principal, ref: str, tsg_id: str | None = None) -> p.SigningKey:
        with self._db.read() as s:
            resolved = self.resolve(s, principal, ref, Permission.KEY_READ, tsg_id)
            return self._wire(s, resolved.row)

    def list_keys(
        self,
        principal: Principal,
        tsg_id: str | None = None,
        expiring_within_days: int | None = None,
    ) -> list[p.SigningKey]:
        """Keys the principal may see; with ``expiring_within_days``, only those whose
        current certificate ends within that many days (expired ones included)."""
        scopes = self._authz.scopes(principal, Permission.KEY_READ)
        with self._db.read() as s:
            keys = [self._wire(s, r) for r in self._rows_in(s, scopes, tsg_id)]
        if expiring_within_days is None:
            return keys
        if not 0 <= expiring_within_days <= MAX_EXPIRING_WITHIN_DAYS:
            raise InvalidRequest(
                f"expiring_within_days must be between 0 and {MAX_EXPIRING_WITHIN_DAYS}"
            )
        horizon = self._clock.now() + timedelta(days=expiring_within_days)
        out = []
        for key in keys:
            current = next(v for v in key.versions if v.version == key.current_version)
            if current.certificate is not None and current.certificate.not_after <= horizon:
                out.append(key)
        return out

    # ------------------------------------------------------------ certificates

    def certificates(
        self, principal: Principal, ref: str, tsg_id: str | None = None
    ) -> list[p.CertificateRecord]:
        """Every certificate the key ever had, newest first (renewals keep the old ones)."""
        with self._db.read() as s:
            key = self.resolve(s, principal, ref, Permission.KEY_READ, tsg_id).row
            rows = s.execute(
                select(CertificateRow, KeyVersionRow)
                .join(KeyVersionRow, KeyVersionRow.id == CertificateRow.key_version_id)
                .where(KeyVersionRow.key_id == key.id)
                .order_by(CertificateRow.created_at.desc())
            ).all()
        now = self._clock.now()
        return [self._record(cert, version, now) for cert, version in rows]

    def _record(
        self, cert: CertificateRow, version: KeyVersionRow, now: datetime
    ) -> p.CertificateRecord:
        if cert.revoked_at is not None:
            status = "revoked"
        elif cert.not_after <= now:
            status = "expired"
        elif version.certificate_id == cert.id:
            status = "current"
        else:
            status = "superseded"
        return p.CertificateRecord(
            **cert_info(cert).model_dump(),
            key_version=version.version,
            status=status,
            source=cert.source,
            revoked_at=cert.revoked_at,
            revocation_reason=cert.revocation_reason,
            chain=chain_list(cert.chain_pem),
        )

    def renew(
        self,
        principal: Principal,
        ref: str,
        req: p.CertificateRenew,
        ctx: RequestContext,
        tsg_id: str | None = None,
    ) -> p.SigningKey:
        """A new certificate for the same key pair, same subject. Clients see it at
        their next key listing; the old certificate stays listable."""
        return self._recertify(
            principal, ref, None, req.validity_days, EventKind.CERTIFICATE_RENEWED, ctx, tsg_id
        )

    def reissue(
        self,
        principal: Principal,
        ref: str,
        req: p.CertificateReissue,
        ctx: RequestContext,
        tsg_id: str | None = None,
    ) -> p.SigningKey:
        """A new certificate for the same key pair with a changed subject."""
        return self._recertify(
            principal,
            ref,
            req.subject,
            req.validity_days,
            EventKind.CERTIFICATE_REISSUED,
            ctx,
            tsg_id,
        )

    def _recertify(
        self,
        principal: Principal,
        ref: str,
        subject: p.KeySubject | None,
        validity_days: int | None,
        kind: EventKind,
        ctx: RequestContext,
        tsg_id: str | None,
    ) -> p.SigningKey:
        with self._db.read() as s:
            resolved = self.resolve(s, principal, ref, Permission.KEY_MANAGE, tsg_id)
            key = resolved.row
            version = s.scalar(
                select(KeyVersionRow).where(
                    KeyVersionRow.key_id == key.id, KeyVersionRow.version == key.current_version
                )
            )
            assert version is not None
        if key.status == KeyStatus.DESTROYED.value:
            raise KeyDestroyed()
        if key.certificate_authority == CertificateAuthority.NONE.value:
            raise InvalidRequest("this key has no certificate authority: nothing to renew")
        new_subject = subject or p.KeySubject.model_validate_json(key.subject_json)
        days = validity_days or key.validity_days
        if key.certificate_authority == CertificateAuthority.CONNECTOR.value:
            # The external CA decides validity; the current certificate stays in use
            # until the new one is installed.
            self._connector_requests().request_again(
                principal,
                key.id,
                resolved.path,
                handle_for(key, version),
                new_subject,
                RENEW if kind is EventKind.CERTIFICATE_RENEWED else REISSUE,
                ctx,
            )
            with self._db.read() as s:
                fresh = s.get(SigningKeyRow, key.id)
                assert fresh is not None
                return self._wire(s, fresh)
        if key.certificate_authority != CertificateAuthority.BUILTIN.value:
            raise InvalidRequest(f"unknown certificate authority {key.certificate_authority!r}")
        with self._db.read() as s:
            # A renewal too: a policy set or narrowed since the last certificate applies
            # to the next one (the current certificate stays valid meanwhile).
            require_allowed_subject(s, resolved.path, new_subject, key.name)
        # The CA signs through the key store: no private key moves, only the
        # public key of the existing key pair is certified again.
        issued = self._ca.issue_code_signing(
            load_public_key_der(version.public_key_der), new_subject, key.name, days
        )
        now = self._clock.now()
        with self._db.write() as s:
            cert_row = certificate_row(issued, version.id, now)
            s.add(cert_row)
            s.flush()
            live_version = s.get(KeyVersionRow, version.id)
            live_key = s.get(SigningKeyRow, key.id)
            assert live_version is not None
            assert live_key is not None
            previous = live_version.certificate_id
            live_version.certificate_id = cert_row.id
            live_key.subject_json = new_subject.model_dump_json()
            live_key.validity_days = days
            live_key.updated_at = now
            self._recorder.record(
                s,
                AuditRecord(
                    kind,
                    AuditOutcome.SUCCEEDED,
                    Actor.of(principal),
                    tsg_id=key.tsg_id,
                    tsg_path=resolved.path,
                    key_id=key.id,
                    key_version=version.version,
                    algorithm=key.algorithm,
                    context=ctx,
                    details={
                        "certificate_serial": cert_row.serial,
                        "certificate_subject": cert_row.subject,
                        "not_after": cert_row.not_after.isoformat(),
                        "previous_certificate_id": previous,
                    },
                ),
            )
            return self._wire(s, live_key)

    def revoke_certificate(
        self,
        principal: Principal,
        ref: str,
        req: p.CertificateRevoke,
        ctx: RequestContext,
        tsg_id: str | None = None,
    ) -> p.CertificateRecord:
        """Revoke a certificate of the key (the current one by default). A certificate
        of the built-in CA goes on the CRL, republished in the same transaction;
        signing with a key whose current certificate is revoked is refused."""
        if req.reason not in REVOCATION_REASONS:
            raise InvalidRequest(f"reason must be one of {', '.join(sorted(REVOCATION_REASONS))}")
        with self._db.write() as s:
            resolved = self.resolve(s, principal, ref, Permission.KEY_MANAGE, tsg_id)
            key = resolved.row
            query = (
                select(CertificateRow, KeyVersionRow)
                .join(KeyVersionRow, KeyVersionRow.id == CertificateRow.key_version_id)
                .where(KeyVersionRow.key_id == key.id)
            )
            if req.serial:
                query = query.where(CertificateRow.serial == req.serial.lower().removeprefix("0x"))
            else:
                query = query.where(
                    KeyVersionRow.version == key.current_version,
                    CertificateRow.id == KeyVersionRow.certificate_id,
                )
            found = s.execute(query).first()
            if found is None:
                raise CertificateNotFound("no such certificate for this key")
            cert, version = found
            if cert.revoked_at is not None:
                raise Conflict(f"certificate {cert.serial} is already revoked")
            now = self._clock.now()
            cert.revoked_at = now
            cert.revocation_reason = req.reason
            s.flush()
            if cert.source == "builtin":
                self._ca.publish_crl(s)
            self._recorder.record(
                s,
                AuditRecord(
                    EventKind.CERTIFICATE_REVOKED,
                    AuditOutcome.SUCCEEDED,
                    Actor.of(principal),
                    tsg_id=key.tsg_id,
                    tsg_path=resolved.path,
                    key_id=key.id,
                    key_version=version.version,
                    algorithm=key.algorithm,
                    context=ctx,
                    details={
                        "certificate_serial": cert.serial,
                        "reason": req.reason,
                        "source": cert.source,
                    },
                ),
            )
            return self._record(cert, version, now)

    def public_key_pem(self, principal: Principal, ref: str, tsg_id: str | None = None) -> str:
        return self.get(principal, ref, tsg_id).public_key_pem

    def chain_pem(self, principal: Principal, ref: str, tsg_id: str | None = None) -> str:
        chain = self.get(principal, ref, tsg_id).certificate_chain
        if not chain:
            raise CertificateNotFound("this key has no certificate")
        return "".join(chain)

    # ------------------------------------------------------------ external CA connectors

    def csr_pem(self, principal: Principal, ref: str, tsg_id: str | None = None) -> str:
        """The CSR of the key's pending certificate request (PEM): a pending
        rotation's, for its new version, when there is one."""
        with self._db.read() as s:
            key = self.resolve(s, principal, ref, Permission.KEY_READ, tsg_id).row
            return self._connector_requests().csr_pem(s, key)

    def upload_certificate(
        self,
        principal: Principal,
        ref: str,
        chain_pem: str,
        ctx: RequestContext,
        tsg_id: str | None = None,
    ) -> p.SigningKey:
        """Install the chain issued for the key's pending request (checked first); for
        a pending rotation, this makes the new version current."""
        with self._db.read() as s:
            resolved = self.resolve(s, principal, ref, Permission.KEY_MANAGE, tsg_id)
        self._connector_requests().install(
            Actor.of(principal), resolved.row.id, resolved.path, chain_pem, ctx
        )
        return self.get(principal, resolved.row.id)

    def enroll(
        self, principal: Principal, ref: str, ctx: RequestContext, tsg_id: str | None = None
    ) -> p.SigningKey:
        """Send the key's pending request to its EST connector again."""
        with self._db.read() as s:
            resolved = self.resolve(s, principal, ref, Permission.KEY_MANAGE, tsg_id)
        self._connector_requests().collect(Actor.of(principal), resolved.row.id, resolved.path, ctx)
        return self.get(principal, resolved.row.id)

    def _connector_requests(self) -> CertificateRequests:
        if self._requests is None:
            raise InvalidRequest("CA connectors are not available on this server")
        return self._requests

    # ------------------------------------------------------------ helpers

    def _rows_in(
        self, s: Session, scopes: Sequence[str], tsg_id: str | None
    ) -> list[SigningKeyRow]:
        rows: list[SigningKeyRow] = []
        for scope in scopes:
            q = (
                select(SigningKeyRow)
                .join(TsgRow, TsgRow.id == SigningKeyRow.tsg_id)
                .where(TsgRow.path.startswith(scope, autoescape=True))
            )
            if tsg_id:
                q = q.where(SigningKeyRow.tsg_id == tsg_id)
            rows.extend(s.scalars(q))
        return sorted(rows, key=lambda r: (r.tsg_id, r.name))

    def resolve(
        self,
        s: Session,
        principal: Principal,
        ref: str,
        permission: Permission,
        tsg_id: str | None = None,
    ) -> ResolvedKey:
        """Find a key by id or name among what the principal can see, then authorize.

        A name shared by keys in several visible TSGs is ambiguous: the caller
        must pass the key id or the TSG, never get one of them at random (unlike
        the signing plane's nearest key: signery.server.keys.names says why)."""
        found = visible_rows_by_ref(s, principal, SigningKeyRow, ref, tsg_id)
        if not found:
            raise KeyNotFound()
        if len(found) > 1:
            raise KeyNameAmbiguous(
                f"{len(found)} visible keys are named {ref!r}; pass the key id or the TSG",
                candidates=[{"id": r.id, "tsg_id": r.tsg_id} for r, _ in found],
            )
        row, path = found[0]
        self._authz.require(principal, permission, path, not_found=KeyNotFound)
        return ResolvedKey(row, path)

    def _wire(self, s: Session, key: SigningKeyRow) -> p.SigningKey:
        versions = s.scalars(
            select(KeyVersionRow)
            .where(KeyVersionRow.key_id == key.id)
            .order_by(KeyVersionRow.version)
        ).all()
        cert_ids = [v.certificate_id for v in versions if v.certificate_id]
        certs = (
            {
                c.id: c
                for c in s.scalars(select(CertificateRow).where(CertificateRow.id.in_(cert_ids)))
            }
            if cert_ids
            else {}
        )
        wire_versions: list[p.KeyVersion] = []
        current_pem, current_chain = "", []
        request: p.CertificateRequest | None = None
        for v in versions:
            pem = public_key_pem(load_public_key_der(v.public_key_der))
            cert = certs.get(v.certificate_id) if v.certificate_id else None
            wire_versions.append(
                p.KeyVersion(
                    version=v.version,
                    status=KeyStatus(v.status),
                    public_key_pem=pem,
                    certificate=cert_info(cert) if cert else None,
                    created_at=v.created_at,
                    archived_at=v.archived_at,
                    destroyed_at=v.destroyed_at,
                    certificate_chain=chain_list(cert.chain_pem if cert else None),
                )
            )
            if v.version == key.current_version:
                current_pem, current_chain = pem, chain_list(cert.chain_pem if cert else None)
            if (
                v.version >= key.current_version
                and key.ca_connector_id is not None
                and self._requests is not None
            ):
                # A pending rotation's version comes after the current one: its
                # request is the one waiting for the CA.
                request = self._requests.newest(s, v) or request
        algorithm = Algorithm(key.algorithm)
        return p.SigningKey(
            id=key.id,
            name=key.name,
            tsg_id=key.tsg_id,
            algorithm=algorithm,
            storage=key.storage,
            certificate_authority=CertificateAuthority(key.certificate_authority),
            status=KeyStatus(key.status),
            current_version=key.current_version,
            description=key.description,
            schemes=list(schemes_for(algorithm)),
            public_key_pem=current_pem,
            certificate_chain=current_chain,
            versions=wire_versions,
            created_at=key.created_at,
            ca_connector_id=key.ca_connector_id,
            certificate_request=request,
            rotation_period_days=key.rotation_period_days,
            next_rotation_at=key.next_rotation_at,
            destroy_at=key.destroy_at,
            destroyed_at=key.destroyed_at,
            policy=wire_policy(s, key),
            usage=key_usage(s, key, self._clock.now()),
        )


def handle_for(key: SigningKeyRow, version: KeyVersionRow) -> KeyHandle:
    """The store handle of a key version, built from Signery's own records."""
    return KeyHandle(
        key.storage,
        version.store_ref,
        Algorithm(key.algorithm),
        KeyContext(key.id, version.version, key.tsg_id),
    )
