"""Key lifecycle: rotation to a new version, disable / enable, scheduled destruction.

A key certified through an external CA connector rotates in two steps: the new
version is recorded ``pending`` (not current) with a certificate request, and
becomes current when its certificate is installed (signery.server.keys.requests);
the current version signs until then.

Every change is one transaction that also records its audit event. The signing
plane reads a key's status and current version on every request, so each change
takes effect on every replica at the next signing.

Work that the server does by itself (scheduled rotations and destructions, run
by signery.server.runtime.jobs) is claimed per key with a compare-and-set on
the key's row, so that exactly one replica does it; a claim that fails to
complete expires after a lease and the work is retried.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography.hazmat.primitives import serialization
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from signery import protocol as p
from signery.errors import (
    Conflict,
    InvalidRequest,
    KeyChangedConcurrently,
    KeyDestroyed,
    KeyDestructionScheduled,
    KeyNotActive,
    RotationPending,
    SigneryError,
)
from signery.keystores import Destroyable, KeyContext, KeyStoreRegistry
from signery.protocol import (
    AuditOutcome,
    CertificateAuthority,
    CertificateRequestStatus,
    KeyStatus,
)
from signery.server.access.authz import Permission, Principal
from signery.server.access.context import RequestContext
from signery.server.audit.events import SYSTEM, Actor, AuditRecord, EventKind
from signery.server.audit.recorder import AuditRecorder
from signery.server.ca.models import CertificateRow
from signery.server.ca.service import BuiltinCa, IssuedCertificate
from signery.server.ca.subject_policy import require_allowed_subject
from signery.server.connectors.base import ROTATE, Connector
from signery.server.keys.models import (
    CertificateRequestRow,
    KeyVersionRow,
    SigningKeyRow,
)
from signery.server.keys.requests import (
    CertificateRequests,
    build_csr,
    pending_rotation,
)
from signery.server.keys.service import KeyService, certificate_row, handle_for
from signery.server.persistence.db import Database, new_id
from signery.server.runtime.clock import Clock
from signery.server.tsg.models import TsgRow

log = logging.getLogger("signery.keys")

# KMS-like bounds of the waiting period before a destruction (AWS KMS
# ScheduleKeyDeletion: PendingWindowInDays 7..30).
DESTROY_MIN_DAYS = 7
DESTROY_MAX_DAYS = 30
# How long a replica's claim on a scheduled rotation or destruction holds: if it
# crashes or fails, another run retries after this.
CLAIM_LEASE = timedelta(minutes=10)
# Marks a key whose destruction has started (status_before_destroy): from then
# on it can only end destroyed, never be cancelled (some material may be gone).
DESTROYING = "destroying"
# Due work taken per scheduler run and kind, so that one run stays short.
DUE_BATCH = 50


@dataclass(frozen=True, slots=True)
class Rotated:
    key_id: str
    previous_version: int
    version: int
    certificate_serial: str | None
    # True while the new version waits for its certificate from a CA connector.
    pending: bool = False


@dataclass(frozen=True, slots=True)
class DueSummary:
    done: int
    failed: int

    def as_dict(self) -> dict[str, int]:
        return {"done": self.done, "failed": self.failed}


class KeyLifecycle:
    def __init__(
        self,
        *,
        db: Database,
        recorder: AuditRecorder,
        clock: Clock,
        keys: KeyService,
        keystores: KeyStoreRegistry,
        ca: BuiltinCa,
        requests: CertificateRequests | None = None,
    ) -> None:
        self._db = db
        self._recorder = recorder
        self._clock = clock
        self._keys = keys
        self._keystores = keystores
        self._ca = ca
        # External CA connectors; without them, connector keys cannot rotate.
        self._requests = requests

    # ------------------------------------------------------------ rotation

    def rotate(
        self,
        principal: Principal,
        ref: str,
        req: p.KeyRotate,
        ctx: RequestContext,
        tsg_id: str | None = None,
    ) -> p.SigningKey:
        """A new key pair in the same store becomes the current version (with a new
        certificate when the key has the built-in CA); the previous version is
        archived and keeps its material, so signings already under way finish.

        A connector key's new version waits ``pending`` for its certificate (an EST
        connector is asked at once); the current version signs until then."""
        with self._db.read() as s:
            resolved = self._keys.resolve(s, principal, ref, Permission.KEY_MANAGE, tsg_id)
        self._rotate(resolved.row.id, Actor.of(principal), req.validity_days, ctx)
        return self._keys.get(principal, resolved.row.id)

    def _rotate(
        self,
        key_id: str,
        actor: Actor,
        validity_days: int | None,
        ctx: RequestContext | None,
    ) -> Rotated:
        with self._db.read() as s:
            key = s.get(SigningKeyRow, key_id)
            assert key is not None
            current = self._version(s, key.id, key.current_version)
            path = self._path(s, key.tsg_id)
            self._check_rotatable(s, key)
            connector = (
                self._connector_requests().connector_of(s, key)
                if key.certificate_authority == CertificateAuthority.CONNECTOR.value
                else None
            )
            if key.certificate_authority == CertificateAuthority.BUILTIN.value:
                # Before a new key pair is made: its certificate must be one the
                # policies on the key's path allow today, not only when it was created.
                require_allowed_subject(
                    s, path, p.KeySubject.model_validate_json(key.subject_json), key.name
                )
        if connector is not None:
            # The external CA decides the new certificate's validity (as for a renewal).
            return self._request_rotation(key, path, connector, actor, ctx)
        days = validity_days or key.validity_days
        if (
            key.certificate_authority == CertificateAuthority.BUILTIN.value
            and days > self._ca.max_leaf_validity_days
        ):
            raise InvalidRequest(
                f"validity_days {days} exceeds the built-in CA's maximum of "
                f"{self._ca.max_leaf_validity_days} days"
            )
        store = self._keystores.get(key.storage)
        # Above every version ever made: a cancelled rotation's version number
        # stays taken by its (destroyed) version.
        previous, new_version = key.current_version, self._next_version(key.id)
        generated = store.generate(
            p.Algorithm(key.algorithm),
            KeyContext(key.id, new_version, key.tsg_id, label=key.name),
        )
        try:
            issued: IssuedCertificate | None = None
            if key.certificate_authority == CertificateAuthority.BUILTIN.value:
                issued = self._ca.issue_code_signing(
                    generated.public_key,
                    p.KeySubject.model_validate_json(key.subject_json),
                    key.name,
                    days,
                )
            now = self._clock.now()
            with self._db.write() as s:
                next_rotation = (
                    now + timedelta(days=key.rotation_period_days)
                    if key.rotation_period_days
                    else None
                )
                # Compare-and-set: a concurrent rotation (or destruction) that got
                # here first wins, and this one leaves no trace.
                claimed = s.execute(
                    update(SigningKeyRow)
                    .where(
                        SigningKeyRow.id == key.id,
                        SigningKeyRow.current_version == previous,
                        SigningKeyRow.status != KeyStatus.DESTROYED.value,
                        SigningKeyRow.destroy_at.is_(None),
                    )
                    .values(
                        current_version=new_version,
                        updated_at=now,
                        next_rotation_at=next_rotation,
                    )
                    .execution_options(synchronize_session=False)
                )
                if claimed.rowcount != 1:  # type: ignore[attr-defined]
                    raise KeyChangedConcurrently(
                        "the key was rotated, destroyed or scheduled for destruction meanwhile"
                    )
                version_id = new_id()
                version = KeyVersionRow(
                    id=version_id,
                    key_id=key.id,
                    version=new_version,
                    status=KeyStatus.ACTIVE.value,
                    store_ref=generated.handle.ref,
                    public_key_der=generated.public_key.public_bytes(
                        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                    ),
                    certificate_id=None,
                    created_at=now,
                )
                s.add(version)
                s.flush()
                serial: str | None = None
                details: dict[str, object] = {
                    "previous_version": previous,
                    "version": new_version,
                }
                if issued is not None:
                    cert_row = certificate_row(issued, version_id, now)
                    s.add(cert_row)
                    s.flush()
                    version.certificate_id = cert_row.id
                    serial = cert_row.serial
                    details["certificate_serial"] = serial
                    details["certificate_subject"] = cert_row.subject
                old = s.get(KeyVersionRow, current.id)
                assert old is not None
                old.status = KeyStatus.ARCHIVED.value
                old.archived_at = now
                if next_rotation is not None:
                    details["next_rotation_at"] = next_rotation.isoformat()
                self._record(
                    s, EventKind.KEY_ROTATED, actor, key, path, ctx, details, version=new_version
                )
        except BaseException:
            # No half-created version: the new pair goes if it was not recorded.
            if isinstance(store, Destroyable):
                store.destroy(generated.handle)
            raise
        return Rotated(key.id, previous, new_version, serial)

    def _request_rotation(
        self,
        key: SigningKeyRow,
        path: str,
        connector: Connector,
        actor: Actor,
        ctx: RequestContext | None,
    ) -> Rotated:
        """The first half of a connector key's rotation: a new key pair in the key's
        store, recorded as a ``pending`` version (not current) with a CSR signed
        through the store. Installing its certificate completes the rotation
        (CertificateRequests._install)."""
        requests = self._connector_requests()
        store = self._keystores.get(key.storage)
        connector.check_store(store.kind)
        subject = p.KeySubject.model_validate_json(key.subject_json)
        # Above every version ever made: a cancelled rotation's version number
        # stays taken by its (destroyed) version.
        previous, new_version = key.current_version, self._next_version(key.id)
        generated = store.generate(
            p.Algorithm(key.algorithm),
            KeyContext(key.id, new_version, key.tsg_id, label=key.name),
        )
        try:
            # Signed by the key store: the CSR proves the new key pair is there.
            csr = build_csr(store, generated.handle, generated.public_key, subject, key.name)
            now = self._clock.now()
            with self._db.write() as s:
                live = self._locked(s, key.id)
                if (
                    live.current_version != previous
                    or live.status == KeyStatus.DESTROYED.value
                    or live.destroy_at is not None
                ):
                    raise KeyChangedConcurrently(
                        "the key was rotated, destroyed or scheduled for destruction meanwhile"
                    )
                # Under the key's row lock: one pending rotation at a time.
                self._check_no_pending_rotation(s, live)
                version_id = new_id()
                s.add(
                    KeyVersionRow(
                        id=version_id,
                        key_id=key.id,
                        version=new_version,
                        status=KeyStatus.PENDING.value,
                        store_ref=generated.handle.ref,
                        public_key_der=generated.public_key.public_bytes(
                            serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo,
                        ),
                        certificate_id=None,
                        created_at=now,
                    )
                )
                s.flush()
                # A renewal or reissue of the version being replaced is moot now.
                superseded = list(
                    s.scalars(
                        select(CertificateRequestRow).where(
                            CertificateRequestRow.key_version_id
                            == self._version(s, key.id, previous).id,
                            CertificateRequestRow.status == CertificateRequestStatus.PENDING.value,
                        )
                    )
                )
                for older in superseded:
                    older.status = CertificateRequestStatus.SUPERSEDED.value
                    older.updated_at = now
                request = requests.new_request(version_id, connector, ROTATE, subject, csr, now)
                s.add(request)
                s.flush()
                # The schedule moves on when the rotation starts: a rotation waiting
                # for its CA is not retried by every scheduler run.
                if live.rotation_period_days:
                    live.next_rotation_at = now + timedelta(days=live.rotation_period_days)
                live.updated_at = now
                common = {
                    "certificate_request": request.id,
                    "purpose": ROTATE,
                    "ca_connector": connector.id,
                }
                self._recorder.record(
                    s,
                    AuditRecord(
                        EventKind.CERTIFICATE_REQUESTED,
                        AuditOutcome.SUCCEEDED,
                        actor,
                        tsg_id=key.tsg_id,
                        tsg_path=path,
                        key_id=key.id,
                        key_version=new_version,
                        algorithm=key.algorithm,
                        context=ctx,
                        details={
                            **common,
                            "subject": csr.subject.rfc4514_string(),
                            "superseded": [r.id for r in superseded],
                        },
                    ),
                )
                details: dict[str, object] = {
                    **common,
                    "previous_version": previous,
                    "version": new_version,
                }
                if live.next_rotation_at is not None and live.rotation_period_days:
                    details["next_rotation_at"] = live.next_rotation_at.isoformat()
                self._record(
                    s,
                    EventKind.KEY_ROTATION_REQUESTED,
                    actor,
                    key,
                    path,
                    ctx,
                    details,
                    version=new_version,
                )
        except BaseException:
            # No half-created version: the new pair goes if it was not recorded.
            if isinstance(store, Destroyable):
                store.destroy(generated.handle)
            raise
        # Submitted at once; a failure stays noted on the request, for
        # `POST /api/v1/keys/{key}/enroll` to retry; the current version signs meanwhile.
        requests.submit(actor, key.id, path, ctx)
        with self._db.read() as s:
            done = s.get(SigningKeyRow, key.id)
            assert done is not None
            if done.current_version == new_version:
                installed = self._version(s, key.id, new_version).certificate_id
                serial = s.scalar(
                    select(CertificateRow.serial).where(CertificateRow.id == installed)
                )
                return Rotated(key.id, previous, new_version, serial)
        return Rotated(key.id, previous, new_version, None, pending=True)

    def cancel_rotation(
        self, principal: Principal, ref: str, ctx: RequestContext, tsg_id: str | None = None
    ) -> p.SigningKey:
        """Abandon a connector key's rotation that waits for its certificate (the CA
        refused or never answered): its request is superseded, so no certificate
        can complete it any more, and the pending version's key pair is destroyed
        in the store. The current version signs on, and the key can rotate again."""
        requests = self._connector_requests()
        now = self._clock.now()
        with self._db.write() as s:
            resolved = self._keys.resolve(s, principal, ref, Permission.KEY_MANAGE, tsg_id)
            key = self._locked(s, resolved.row.id)
            if key.status == KeyStatus.DESTROYED.value:
                raise KeyDestroyed()
            rotating = pending_rotation(s, key)
            if rotating is None:
                raise Conflict("the key has no rotation waiting for its certificate")
            superseded = requests.supersede_pending(s, rotating, now)
            # Destroyed from now on, for signing and for installing; destroyed_at is
            # set once the store confirms the erasure (a later key destruction
            # retries a version whose erasure failed).
            rotating.status = KeyStatus.DESTROYED.value
            handle = handle_for(key, rotating)
            self._record(
                s,
                EventKind.KEY_ROTATION_CANCELLED,
                Actor.of(principal),
                key,
                resolved.path,
                ctx,
                {"version": rotating.version, "certificate_requests": superseded},
            )
        try:
            self._keystores.destroyable(key.storage).destroy(handle)
        except SigneryError as e:
            self._failed(key.id, EventKind.KEY_DESTRUCTION_FAILED, e)
            raise
        with self._db.write() as s:
            erased = s.get(KeyVersionRow, rotating.id)
            assert erased is not None
            erased.destroyed_at = self._clock.now()
        return self._keys.get(principal, resolved.row.id)

    @staticmethod
    def _check_rotatable(s: Session, key: SigningKeyRow) -> None:
        if key.status == KeyStatus.DESTROYED.value:
            raise KeyDestroyed()
        if key.destroy_at is not None:
            raise KeyDestructionScheduled()
        if key.status == KeyStatus.PENDING.value:
            raise KeyNotActive("the key waits for its certificate; rotate it once it is active")
        KeyLifecycle._check_no_pending_rotation(s, key)

    @staticmethod
    def _check_no_pending_rotation(s: Session, key: SigningKeyRow) -> None:
        rotating = pending_rotation(s, key)
        if rotating is not None:
            raise RotationPending(
                f"the key's rotation to version {rotating.version} waits for its certificate: "
                "install it (signery key upload-certificate, or key enroll for EST) first"
            )

    def _connector_requests(self) -> CertificateRequests:
        if self._requests is None:
            raise InvalidRequest("CA connectors are not available on this server")
        return self._requests

    def set_rotation(
        self,
        principal: Principal,
        ref: str,
        req: p.KeyRotationSchedule,
        ctx: RequestContext,
        tsg_id: str | None = None,
    ) -> p.SigningKey:
        """Rotate the key every ``rotation_period_days`` (None: never), the first
        time one period from now."""
        with self._db.write() as s:
            resolved = self._keys.resolve(s, principal, ref, Permission.KEY_MANAGE, tsg_id)
            key = self._locked(s, resolved.row.id)
            if key.status == KeyStatus.DESTROYED.value:
                raise KeyDestroyed()
            now = self._clock.now()
            period = req.rotation_period_days
            key.rotation_period_days = period
            key.next_rotation_at = now + timedelta(days=period) if period else None
            key.updated_at = now
            self._record(
                s,
                EventKind.KEY_ROTATION_SCHEDULED,
                Actor.of(principal),
                key,
                resolved.path,
                ctx,
                {
                    "rotation_period_days": period,
                    "next_rotation_at": key.next_rotation_at.isoformat()
                    if key.next_rotation_at
                    else None,
                },
            )
        return self._keys.get(principal, resolved.row.id)

    def rotate_due(self, now: datetime) -> DueSummary:
        """Rotate the active keys whose next_rotation_at has come, each claimed by
        a compare-and-set on next_rotation_at so that one replica rotates it."""
        done = failed = 0
        with self._db.read() as s:
            due = s.execute(
                select(SigningKeyRow.id, SigningKeyRow.next_rotation_at)
                .where(
                    SigningKeyRow.next_rotation_at.is_not(None),
                    SigningKeyRow.next_rotation_at <= now,
                    SigningKeyRow.status == KeyStatus.ACTIVE.value,
                    SigningKeyRow.destroy_at.is_(None),
                )
                .order_by(SigningKeyRow.next_rotation_at)
                .limit(DUE_BATCH)
            ).all()
        for key_id, seen in due:
            if not self._claim(key_id, "next_rotation_at", seen, now + CLAIM_LEASE):
                continue  # another replica has it
            try:
                self._rotate(key_id, SYSTEM, None, None)
                done += 1
            except SigneryError as e:
                # Retried when the claim's lease ends (next_rotation_at = its end).
                failed += 1
                log.warning("scheduled rotation of key %s failed: %s", key_id, e.code)
                self._failed(key_id, EventKind.KEY_ROTATION_FAILED, e)
        return DueSummary(done, failed)

    # ------------------------------------------------------------ disable / enable

    def disable(
        self, principal: Principal, ref: str, ctx: RequestContext, tsg_id: str | None = None
    ) -> p.SigningKey:
        """Signing with the key is refused from the next request on, on every replica."""
        with self._db.write() as s:
            resolved = self._keys.resolve(s, principal, ref, Permission.KEY_MANAGE, tsg_id)
            key = self._locked(s, resolved.row.id)
            self._check_not_destroyed(key)
            if key.status == KeyStatus.DISABLED.value:
                raise Conflict("the key is already disabled")
            if key.status != KeyStatus.ACTIVE.value:
                raise KeyNotActive(f"only an active key can be disabled; this one is {key.status}")
            key.status = KeyStatus.DISABLED.value
            key.updated_at = self._clock.now()
            self._record(
                s, EventKind.KEY_DISABLED, Actor.of(principal), key, resolved.path, ctx, {}
            )
        return self._keys.get(principal, resolved.row.id)

    def enable(
        self, principal: Principal, ref: str, ctx: RequestContext, tsg_id: str | None = None
    ) -> p.SigningKey:
        with self._db.write() as s:
            resolved = self._keys.resolve(s, principal, ref, Permission.KEY_MANAGE, tsg_id)
            key = self._locked(s, resolved.row.id)
            self._check_not_destroyed(key)
            if key.status != KeyStatus.DISABLED.value:
                raise Conflict(f"the key is not disabled (it is {key.status})")
            key.status = KeyStatus.ACTIVE.value
            key.updated_at = self._clock.now()
            self._record(s, EventKind.KEY_ENABLED, Actor.of(principal), key, resolved.path, ctx, {})
        return self._keys.get(principal, resolved.row.id)

    # ------------------------------------------------------------ destruction

    def schedule_destruction(
        self,
        principal: Principal,
        ref: str,
        req: p.KeyDestroy,
        ctx: RequestContext,
        tsg_id: str | None = None,
    ) -> p.SigningKey:
        """Disable the key now and destroy its material in ``after_days`` days,
        unless the destruction is cancelled before."""
        if not DESTROY_MIN_DAYS <= req.after_days <= DESTROY_MAX_DAYS:
            raise InvalidRequest(
                f"after_days must be between {DESTROY_MIN_DAYS} and {DESTROY_MAX_DAYS}"
            )
        with self._db.write() as s:
            resolved = self._keys.resolve(s, principal, ref, Permission.KEY_MANAGE, tsg_id)
            key = self._locked(s, resolved.row.id)
            self._check_not_destroyed(key)
            now = self._clock.now()
            key.status_before_destroy = key.status
            key.status = KeyStatus.DISABLED.value
            key.destroy_at = now + timedelta(days=req.after_days)
            key.updated_at = now
            self._record(
                s,
                EventKind.KEY_DESTRUCTION_SCHEDULED,
                Actor.of(principal),
                key,
                resolved.path,
                ctx,
                {
                    "destroy_at": key.destroy_at.isoformat(),
                    "after_days": req.after_days,
                    "status_before": key.status_before_destroy,
                },
            )
        return self._keys.get(principal, resolved.row.id)

    def cancel_destruction(
        self, principal: Principal, ref: str, ctx: RequestContext, tsg_id: str | None = None
    ) -> p.SigningKey:
        """Restore the status the key had before its destruction was scheduled."""
        with self._db.write() as s:
            resolved = self._keys.resolve(s, principal, ref, Permission.KEY_MANAGE, tsg_id)
            key = self._locked(s, resolved.row.id)
            if key.status == KeyStatus.DESTROYED.value:
                raise KeyDestroyed()
            if key.destroy_at is None:
                raise Conflict("the key is not scheduled for destruction")
            if key.status_before_destroy == DESTROYING:
                raise Conflict("the key's destruction has started and cannot be cancelled")
            restored = key.status_before_destroy or KeyStatus.DISABLED.value
            key.status = restored
            key.status_before_destroy = None
            key.destroy_at = None
            key.updated_at = self._clock.now()
            self._record(
                s,
                EventKind.KEY_DESTRUCTION_CANCELLED,
                Actor.of(principal),
                key,
                resolved.path,
                ctx,
                {"status": restored},
            )
        return self._keys.get(principal, resolved.row.id)

    def destroy_due(self, now: datetime) -> DueSummary:
        """Destroy the keys whose destroy_at has come: the material of every version
        in its store, then the key and its versions are marked destroyed (their
        public keys, certificates and audit history stay)."""
        done = failed = 0
        with self._db.read() as s:
            due = s.execute(
                select(SigningKeyRow.id, SigningKeyRow.destroy_at)
                .where(
                    SigningKeyRow.destroy_at.is_not(None),
                    SigningKeyRow.destroy_at <= now,
                    SigningKeyRow.status != KeyStatus.DESTROYED.value,
                )
                .order_by(SigningKeyRow.destroy_at)
                .limit(DUE_BATCH)
            ).all()
        for key_id, seen in due:
            if not self._claim(
                key_id,
                "destroy_at",
                seen,
                now + CLAIM_LEASE,
                status_before_destroy=DESTROYING,
            ):
                continue
            try:
                self._destroy(key_id)
                done += 1
            except SigneryError as e:
                failed += 1
                log.warning("destruction of key %s failed: %s", key_id, e.code)
                self._failed(key_id, EventKind.KEY_DESTRUCTION_FAILED, e)
        return DueSummary(done, failed)

    def _destroy(self, key_id: str) -> None:
        with self._db.read() as s:
            key = s.get(SigningKeyRow, key_id)
            assert key is not None
            versions = list(
                s.scalars(
                    select(KeyVersionRow)
                    .where(KeyVersionRow.key_id == key_id)
                    .order_by(KeyVersionRow.version)
                )
            )
            path = self._path(s, key.tsg_id)
        store = self._keystores.destroyable(key.storage)
        for version in versions:
            if version.destroyed_at is None:
                # Idempotent in every store: a retry after a partial failure
                # finds some versions already gone.
                store.destroy(handle_for(key, version))
        now = self._clock.now()
        with self._db.write() as s:
            live = self._locked(s, key_id)
            live.status = KeyStatus.DESTROYED.value
            live.destroyed_at = now
            live.destroy_at = None
            live.status_before_destroy = None
            live.next_rotation_at = None
            live.updated_at = now
            for version in versions:
                row = s.get(KeyVersionRow, version.id)
                assert row is not None
                row.status = KeyStatus.DESTROYED.value
                row.destroyed_at = row.destroyed_at or now
            self._record(
                s,
                EventKind.KEY_DESTROYED,
                SYSTEM,
                live,
                path,
                None,
                {"versions": [v.version for v in versions], "storage": key.storage},
            )

    # ------------------------------------------------------------ helpers

    def _claim(
        self,
        key_id: str,
        column: str,
        seen: datetime | None,
        lease_until: datetime,
        **also: object,
    ) -> bool:
        """Compare-and-set ``column`` from the value this run saw to the end of its
        lease: true for exactly one of the replicas that saw the same value."""
        with self._db.write() as s:
            result = s.execute(
                update(SigningKeyRow)
                .where(SigningKeyRow.id == key_id, getattr(SigningKeyRow, column) == seen)
                .values({column: lease_until, **also})
                .execution_options(synchronize_session=False)
            )
            return bool(result.rowcount == 1)  # type: ignore[attr-defined]

    def _failed(self, key_id: str, kind: EventKind, error: SigneryError) -> None:
        try:
            with self._db.write() as s:
                key = s.get(SigningKeyRow, key_id)
                assert key is not None
                self._recorder.record(
                    s,
                    AuditRecord(
                        kind,
                        AuditOutcome.ERROR,
                        SYSTEM,
                        reason=error.code,
                        tsg_id=key.tsg_id,
                        tsg_path=self._path(s, key.tsg_id),
                        key_id=key.id,
                        key_version=key.current_version,
                        algorithm=key.algorithm,
                        details={"error": error.detail},
                    ),
                )
        except SigneryError:
            log.exception("could not record the failure of key %s's scheduled work", key_id)

    def _record(
        self,
        s: Session,
        kind: EventKind,
        actor: Actor,
        key: SigningKeyRow,
        path: str,
        ctx: RequestContext | None,
        details: dict[str, object],
        version: int | None = None,
    ) -> None:
        """A succeeded change of the key, in the caller's transaction (about the
        current version unless ``version`` names another)."""
        self._recorder.record(
            s,
            AuditRecord(
                kind,
                AuditOutcome.SUCCEEDED,
                actor,
                tsg_id=key.tsg_id,
                tsg_path=path,
                key_id=key.id,
                key_version=version if version is not None else key.current_version,
                algorithm=key.algorithm,
                context=ctx,
                details=details,
            ),
        )

    @staticmethod
    def _check_not_destroyed(key: SigningKeyRow) -> None:
        if key.status == KeyStatus.DESTROYED.value:
            raise KeyDestroyed()
        if key.destroy_at is not None:
            raise KeyDestructionScheduled()

    @staticmethod
    def _locked(s: Session, key_id: str) -> SigningKeyRow:
        """The key's row, locked until the transaction ends (PostgreSQL FOR UPDATE;
        SQLite's writing transactions are serialized already)."""
        key = s.get(SigningKeyRow, key_id, with_for_update=True, populate_existing=True)
        assert key is not None
        return key

    def _next_version(self, key_id: str) -> int:
        with self._db.read() as s:
            highest = s.scalar(
                select(func.max(KeyVersionRow.version)).where(KeyVersionRow.key_id == key_id)
            )
        return int(highest or 0) + 1

    @staticmethod
    def _version(s: Session, key_id: str, version: int) -> KeyVersionRow:
        row = s.scalar(
            select(KeyVersionRow).where(
                KeyVersionRow.key_id == key_id, KeyVersionRow.version == version
            )
        )
        assert row is not None
        return row

    @staticmethod
    def _path(s: Session, tsg_id: str) -> str:
        path = s.scalar(select(TsgRow.path).where(TsgRow.id == tsg_id))
        assert path is not None
        return path
