"""Signed checkpoints of the audit hash chains.

A checkpoint states "node N's chain had S events ending in hash H at time T",
signed (ECDSA P-256, SHA-256) by the audit key, which lives in a key store and
is used only through it. Checkpoints are stored in ``audit_checkpoints`` and,
when ``audit_checkpoint_dir`` is set, also written there as files: a copy the
database's owner cannot quietly rewrite, against which `signery audit verify`
detects a trail truncated or rolled back to an older copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from signery import protocol as p
from signery.auditchain import AUDIT_KEY_ID, Checkpoint, checkpoint_payload, signature_valid
from signery.crypto import Hashed
from signery.errors import ConfigurationError, PermissionDenied, UnknownKeyStore
from signery.keystores import Destroyable, KeyContext, KeyHandle, KeyStoreRegistry
from signery.protocol import Algorithm, DigestAlgorithm, SignatureScheme
from signery.server.access.authz import Authorizer, Permission, Principal
from signery.server.audit.models import (
    AuditChainHeadRow,
    AuditCheckpointRow,
    AuditSigningKeyRow,
)
from signery.server.persistence import meta
from signery.server.persistence.db import Database, flush_unique, new_id
from signery.server.runtime.clock import Clock

AUDIT_KEY_ALGORITHM = Algorithm.EC_P256
_UNSAFE_FILE_CHARS = re.compile(r"[^A-Za-z0-9._-]")


class _KeyTaken(Exception):
    """Another worker or replica made the audit key first."""


@dataclass(frozen=True, slots=True)
class AuditKey:
    id: str
    handle: KeyHandle
    public_key_der: bytes
    created_at: datetime

    @property
    def public_key_pem(self) -> str:
        key = serialization.load_der_public_key(self.public_key_der)
        return key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()


def checkpoint_file_name(node_id: str, seq: int) -> str:
    return f"{_UNSAFE_FILE_CHARS.sub('_', node_id)}-{seq}.json"


def checkpoint_to_wire(row: AuditCheckpointRow) -> p.AuditCheckpoint:
    return p.AuditCheckpoint(
        id=row.id,
        node_id=row.node_id,
        seq=row.seq,
        head_hash=row.head_hash,
        signing_key_id=row.signing_key_id,
        created_at=row.created_at,
        payload=row.payload,
        signature=row.signature,
    )


class CheckpointService:
    def __init__(
        self,
        *,
        db: Database,
        authz: Authorizer,
        keystores: KeyStoreRegistry,
        clock: Clock,
        storage: str,
        export_dir: Path | None = None,
        interval_seconds: int = 300,
    ) -> None:
        self._db = db
        self._authz = authz
        self._keystores = keystores
        self._clock = clock
        self._storage = storage
        self.export_dir = export_dir
        self._interval = timedelta(seconds=interval_seconds)
        self._key: AuditKey | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------ the audit key

    def key(self) -> AuditKey:
        """The audit key, made in its key store on first use."""
        with self._lock:
            if self._key is None:
                self._key = self._read_key() or self._provision_key()
            return self._key

    def _read_key(self) -> AuditKey | None:
        with self._db.read() as s:
            row = s.get(AuditSigningKeyRow, AUDIT_KEY_ID)
            if row is None:
                return None
            root = meta.read_meta(s)[meta.ROOT_TSG_ID]
        algorithm = Algorithm(row.algorithm)
        return AuditKey(
            row.id,
            KeyHandle(row.storage, row.store_ref, algorithm, KeyContext(row.id, 1, root)),
            row.public_key_der,
            row.created_at,
        )

    def _provision_key(self) -> AuditKey:
        try:
            store = self._keystores.get(self._storage)
        except UnknownKeyStore as e:
            raise ConfigurationError(
                f"audit_storage {self._storage!r} is not a configured key store"
            ) from e
        with self._db.read() as s:
            root = meta.read_meta(s)[meta.ROOT_TSG_ID]
        made = store.generate(
            AUDIT_KEY_ALGORITHM, KeyContext(AUDIT_KEY_ID, 1, root, label="signery-audit")
        )
        der = made.public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        try:
            with self._db.write() as s:
                s.add(
                    AuditSigningKeyRow(
                        id=AUDIT_KEY_ID,
                        storage=store.name,
                        store_ref=made.handle.ref,
                        algorithm=AUDIT_KEY_ALGORITHM.value,
                        public_key_der=der,
                        created_at=self._clock.now(),
                    )
                )
                flush_unique(s, _KeyTaken())
        except _KeyTaken:
            if isinstance(store, Destroyable):
                store.destroy(made.handle)  # a rival's key won: no orphaned key
        except BaseException:
            if isinstance(store, Destroyable):
                store.destroy(made.handle)
            raise
        key = self._read_key()
        if key is None:  # pragma: no cover - a row was committed, by us or a rival
            raise ConfigurationError("the audit key row vanished after it was written")
        return key

    # ------------------------------------------------------------ making checkpoints

    def make(self, *, force: bool = False) -> list[AuditCheckpointRow]:
        """Checkpoint every chain head that moved since its last checkpoint; without
        ``force`` only those whose last checkpoint is older than the interval."""
        now = self._clock.now()
        with self._db.read() as s:
            heads = list(s.scalars(select(AuditChainHeadRow)))
            latest = _latest_checkpoints(s)
        due = [
            h
            for h in heads
            if h.seq > 0
            and (h.node_id not in latest or latest[h.node_id][0] < h.seq)
            and (force or h.node_id not in latest or latest[h.node_id][1] <= now - self._interval)
        ]
        if not due:
            return []
        key = self.key()
        store = self._keystores.get(key.handle.store)
        rows: list[AuditCheckpointRow] = []
        for h in due:
            payload = checkpoint_payload(h.node_id, h.seq, h.hash, now, key.id)
            signature = store.sign(
                key.handle,
                Hashed(DigestAlgorithm.SHA256, hashlib.sha256(payload).digest()),
                SignatureScheme.ECDSA,
            )
            if not signature_valid(key.public_key_der, payload, signature):
                raise ConfigurationError("the audit key store made an invalid signature")
            rows.append(
                AuditCheckpointRow(
                    id=new_id(),
                    node_id=h.node_id,
                    seq=h.seq,
                    head_hash=h.hash,
                    payload=payload.decode(),
                    signature=signature,
                    signing_key_id=key.id,
                    created_at=now,
                )
            )
        with self._db.write() as s:
            s.add_all(rows)
        if self.export_dir is not None:
            for row in rows:
                self._export(row, key)
        return rows

    def due(self, now: datetime) -> dict[str, int]:
        """The scheduler's job (``now`` is the clock's; make() reads it itself)."""
        if self._interval.total_seconds() <= 0:
            return {"checkpoints": 0}
        return {"checkpoints": len(self.make())}

    def _export(self, row: AuditCheckpointRow, key: AuditKey) -> None:
        """Write the checkpoint file atomically (a reader never sees half of one)."""
        assert self.export_dir is not None
        # Created private like the data directory (each file is 0600: mkstemp).
        self.export_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        doc = Checkpoint(row.payload.encode(), row.signature, "").to_file(key.public_key_pem)
        target = self.export_dir / checkpoint_file_name(row.node_id, row.seq)
        fd, tmp = tempfile.mkstemp(dir=self.export_dir, prefix=".checkpoint-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f, indent=2, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # ------------------------------------------------------------ the API

    def _require_installation_auditor(self, principal: Principal) -> None:
        # Chains span every TSG: only an auditor of the whole installation (a
        # scope at the root TSG) reads or requests checkpoints.
        scopes = self._authz.scopes(principal, Permission.AUDIT_READ)
        if not any(sc.count("/") == 2 for sc in scopes):
            raise PermissionDenied("audit checkpoints need audit read access at the root TSG")

    def request(self, principal: Principal) -> p.AuditCheckpointList:
        self._require_installation_auditor(principal)
        return p.AuditCheckpointList(
            checkpoints=[checkpoint_to_wire(r) for r in self.make(force=True)]
        )

    def listing(
        self, principal: Principal, node_id: str | None = None, after: datetime | None = None
    ) -> p.AuditCheckpointList:
        self._require_installation_auditor(principal)
        q = select(AuditCheckpointRow).order_by(AuditCheckpointRow.created_at)
        if node_id:
            q = q.where(AuditCheckpointRow.node_id == node_id)
        if after:
            q = q.where(AuditCheckpointRow.created_at > after)
        with self._db.read() as s:
            return p.AuditCheckpointList(checkpoints=[checkpoint_to_wire(r) for r in s.scalars(q)])

    def public_key(self, principal: Principal) -> p.AuditSigningKey:
        self._require_installation_auditor(principal)
        key = self.key()
        return p.AuditSigningKey(
            id=key.id,
            algorithm=AUDIT_KEY_ALGORITHM.value,
            public_key_pem=key.public_key_pem,
            created_at=key.created_at,
        )


def _latest_checkpoints(s: Session) -> dict[str, tuple[int, datetime]]:
    cp = AuditCheckpointRow
    q = select(cp.node_id, func.max(cp.seq), func.max(cp.created_at)).group_by(cp.node_id)
    return {node: (seq, at) for node, seq, at in s.execute(q).all()}
