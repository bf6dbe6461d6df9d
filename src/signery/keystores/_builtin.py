"""The built-in key store: private keys encrypted in Signery's own database.

Envelope encryption (DESIGN.md §4): each key pair gets a fresh 256-bit data key
(DEK); the PKCS#8 private key is encrypted with the DEK under AES-256-GCM, and
the DEK is encrypted ("wrapped") with the master key, also AES-256-GCM. Both
encryptions take the caller's :class:`KeyContext` (key id, version, TSG) as
associated data, so a ciphertext copied into another key's row, version or TSG
fails to decrypt instead of signing under the wrong identity.

Decrypted keys are kept in a bounded in-process cache so that a signing costs
one private-key operation, not a decryption and a key parse.

The store owns its table (:data:`METADATA`, merged into the server's schema by
``signery.server.schema``, so the migrations create it) and the
re-wrapping of its data keys when the master key is rotated
(:meth:`BuiltinKeyStore.rewrap_all`). It reaches the database through the
SQLAlchemy engines it is given, never through the server's modules.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import ClassVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa, utils
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import (
    DateTime,
    Engine,
    LargeBinary,
    MetaData,
    String,
    Table,
    delete,
    func,
    select,
    update,
)
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from signery.cache import BoundedCache
from signery.crypto import Hashed, PublicKey, signature_padding
from signery.errors import KeyMaterialMissing, KeyStoreUnavailable, MasterKeyMismatch
from signery.keystores._base import (
    DestroyableKeyStore,
    GeneratedKey,
    HealthCheckedKeyStore,
    KeyContext,
    KeyHandle,
    StoreHealth,
)
from signery.keystores._keyring import Keyring
from signery.keystores._masterkey import GCM_NONCE_BYTES, GCM_TAG_BYTES, MasterKey
from signery.protocol import Algorithm, SignatureScheme

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

DEK_BYTES = 32
CACHE_SIZE = 4096
# How long a decrypted key stays in one process's memory without a look at its
# row. Destroying a key erases the row; other processes (replicas) forget the
# key within this time. Signing with a destroyed key is refused before that by
# the key's status, which every signing reads.
CACHE_TTL_SECONDS = 300.0
# Data keys looked up per query while re-wrapping (one transaction per data key).
REWRAP_SCAN_BATCH = 500
# Public exponent 65537: FIPS 186-5 §A.1.1 and what every verifier expects.
RSA_PUBLIC_EXPONENT = 65537
_RSA_BITS = {Algorithm.RSA_2048: 2048, Algorithm.RSA_3072: 3072, Algorithm.RSA_4096: 4096}
_CURVES: dict[Algorithm, type[ec.EllipticCurve]] = {
    Algorithm.EC_P256: ec.SECP256R1,
    Algorithm.EC_P384: ec.SECP384R1,
    Algorithm.EC_P521: ec.SECP521R1,
}


# The store's own schema. The names follow the server's naming convention
# (signery.server.persistence.db), which the schema-drift test holds them to.
METADATA = MetaData(naming_convention={"ix": "ix_%(column_0_label)s", "pk": "pk_%(table_name)s"})


class _Base(DeclarativeBase):
    metadata = METADATA


class BuiltinKeyMaterialRow(_Base):
    """Encrypted key material. Only this module reads or writes this table."""

    __tablename__ = "builtin_key_material"

    ref: Mapped[str] = mapped_column(String(36), primary_key=True)
    key_id: Mapped[str] = mapped_column(String(36), index=True)
    version: Mapped[int] = mapped_column()
    tsg_id: Mapped[str] = mapped_column(String(10))
    algorithm: Mapped[str] = mapped_column(String(16))
    master_key_id: Mapped[str] = mapped_column(String(16))
    wrapped_dek: Mapped[bytes] = mapped_column(LargeBinary)
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    public_key_der: Mapped[bytes] = mapped_column(LargeBinary)
    # Always written as an aware UTC datetime (datetime.now(UTC)), never read back.
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


def _table() -> Table:
    t = BuiltinKeyMaterialRow.__table__
    assert isinstance(t, Table)
    return t


_T = _table()


@dataclass(frozen=True, slots=True)
class BuiltinSettings:
    """What the built-in store is opened with: the server's database and keyring.

    ``write_engine`` runs the transactions that write; the server gives one that
    takes SQLite's write lock at BEGIN (``signery.server.persistence.db.writer``),
    which a read-then-update such as :meth:`BuiltinKeyStore.rewrap` needs when
    other processes write at the same time."""

    kind: ClassVar[str] = "builtin"

    engine: Engine
    keyring: Keyring
    write_engine: Engine | None = None


def open_store(settings: BuiltinSettings) -> BuiltinKeyStore:
    """The ``builtin`` store on the server's database (the key-store registry's entry point)."""
    return BuiltinKeyStore(settings.engine, settings.keyring, write_engine=settings.write_engine)


class BuiltinKeyStore(DestroyableKeyStore, HealthCheckedKeyStore):
    kind = "builtin"
    supported_algorithms = frozenset(Algorithm)

    def __init__(
        self,
        engine: Engine,
        master_key: MasterKey | Keyring,
        *,
        name: str = "builtin",
        cache_ttl: float = CACHE_TTL_SECONDS,
        write_engine: Engine | None = None,
    ) -> None:
        """``write_engine`` (default ``engine``): see :class:`BuiltinSettings`."""
        super().__init__(name)
        self._engine = engine
        self._writer = write_engine or engine
        self._keyring = master_key if isinstance(master_key, Keyring) else Keyring(master_key)
        self._cache: BoundedCache[tuple[str, KeyContext], PrivateKey] = BoundedCache(
            CACHE_SIZE, ttl=cache_ttl
        )

    def signs_inline(self, algorithm: Algorithm) -> bool:
        # No network and no device: CPU work (an EC signature ~25-250 µs, RSA-3072
        # ~1-2 ms, RSA-4096 ~4 ms) and, when the key is not cached yet, one indexed
        # read of its row on the server's database. A hop to a worker thread costs
        # more CPU than it saves (measured with make bench); several cores are used
        # by running several server processes (--workers).
        return True

    # ------------------------------------------------------------ backend hooks

    def _generate(self, algorithm: Algorithm, context: KeyContext) -> GeneratedKey:
        private_key: PrivateKey
        if algorithm.is_rsa:
            private_key = rsa.generate_private_key(RSA_PUBLIC_EXPONENT, _RSA_BITS[algorithm])
        else:
            private_key = ec.generate_private_key(_CURVES[algorithm]())
        public_key = private_key.public_key()
        ref = str(uuid.uuid4())
        plaintext = private_key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        dek = secrets.token_bytes(DEK_BYTES)
        nonce = secrets.token_bytes(GCM_NONCE_BYTES)
        ciphertext = nonce + AESGCM(dek).encrypt(nonce, plaintext, context.associated_data("key"))
        # The newest primary: a master-key rotation may have started meanwhile in
        # another process, and new material must never be wrapped by a key that
        # the rotation is retiring.
        self._keyring.refresh()
        master = self._keyring.primary
        wrapped = master.encrypt(dek, context.associated_data("dek"))
        del plaintext, dek
        row = {
            "ref": ref,
            "key_id": context.key_id,
            "version": context.version,
            "tsg_id": context.tsg_id,
            "algorithm": algorithm.value,
            "master_key_id": master.key_id,
            "wrapped_dek": wrapped,
            "ciphertext": ciphertext,
            "public_key_der": public_key.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
            "created_at": datetime.now(UTC),
        }
        try:
            with self._writer.begin() as conn:
                conn.execute(_T.insert(), row)
        except SQLAlchemyError as e:
            raise KeyStoreUnavailable("the built-in key store could not store the new key") from e
        handle = KeyHandle(self.name, ref, algorithm, context)
        self._cache.put((handle.ref, handle.context), private_key)
        return GeneratedKey(handle, public_key)

    def _sign(self, handle: KeyHandle, hashed: Hashed, scheme: SignatureScheme) -> bytes:
        key = self._private_key(handle)
        prehashed = utils.Prehashed(hashed.hash_algorithm())
        if isinstance(key, rsa.RSAPrivateKey):
            return key.sign(hashed.digest, signature_padding(hashed, scheme), prehashed)
        return key.sign(hashed.digest, ec.ECDSA(prehashed))

    def _public_key(self, handle: KeyHandle) -> PublicKey:
        return self._private_key(handle).public_key()

    def _destroy(self, handle: KeyHandle) -> None:
        self._cache.pop((handle.ref, handle.context))
        try:
            with self._writer.begin() as conn:
                # SQLite runs with secure_delete=ON, so the freed pages are zeroed.
                conn.execute(delete(_T).where(_T.c.ref == handle.ref))
        except SQLAlchemyError as e:
            raise KeyStoreUnavailable("the built-in key store could not erase the key") from e

    def _health(self) -> StoreHealth:
        try:
            with self._engine.connect() as conn:
                used = {r[0] for r in conn.execute(select(_T.c.master_key_id).distinct())}
        except SQLAlchemyError:
            return StoreHealth(False, "database unreachable")
        unknown = used - set(self._keyring.key_ids())
        if unknown and self._keyring.refresh():
            unknown = used - set(self._keyring.key_ids())
        if unknown:
            return StoreHealth(
                False, f"material wrapped by unknown master key(s) {sorted(unknown)}"
            )
        pending = used - {self._keyring.primary.key_id}
        detail = f"master key {self._keyring.primary.key_id}"
        if pending:
            detail += f" (rotation pending from {', '.join(sorted(pending))})"
        return StoreHealth(True, detail)

    # ------------------------------------------------------------ master key rotation

    def count_not_under_primary(self) -> int:
        """How many data keys are still wrapped by an older master key."""
        self._keyring.refresh()
        with self._engine.connect() as conn:
            return int(
                conn.execute(
                    select(func.count())
                    .select_from(_T)
                    .where(_T.c.master_key_id != self._keyring.primary.key_id)
                ).scalar_one()
            )

    def rewrap_all(
        self,
        *,
        rate: float | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> int:
        """Re-wrap every data key still under an older master key, one at a time,
        each in its own transaction (see :meth:`rewrap`); returns how many were.

        ``rate`` bounds the work to so many data keys per second, so that a large
        installation is re-wrapped without disturbing signing; ``progress`` is
        called with (done, total) after each one."""
        total = self.count_not_under_primary()
        done = 0
        while refs := self.material_not_under_primary(REWRAP_SCAN_BATCH):
            for ref in refs:
                started = time.monotonic()
                if self.rewrap(ref):
                    done += 1
                    if progress is not None:
                        progress(done, total)
                if rate:
                    time.sleep(max(0.0, 1.0 / rate - (time.monotonic() - started)))
        return done

    def material_not_under_primary(self, limit: int = 1000) -> list[str]:
        """References of material still wrapped by an older master key."""
        self._keyring.refresh()
        with self._engine.connect() as conn:
            return [
                r[0]
                for r in conn.execute(
                    select(_T.c.ref)
                    .where(_T.c.master_key_id != self._keyring.primary.key_id)
                    .order_by(_T.c.ref)
                    .limit(limit)
                )
            ]

    def rewrap(self, ref: str) -> bool:
        """Re-wrap one data key under the primary master key, in its own transaction.

        Only the wrapped DEK changes: the encrypted private key stays as it is.
        The AAD is rebuilt from the row's own key id, version and TSG, so material
        that was moved between rows fails here (MasterKeyMismatch) instead of
        being re-wrapped for the wrong key. Returns False if nothing was to do."""
        primary = self._keyring.primary
        with self._writer.begin() as conn:
            query = select(_T).where(_T.c.ref == ref)
            if conn.dialect.name == "postgresql":
                query = query.with_for_update()
            row = conn.execute(query).first()
            if row is None or row.master_key_id == primary.key_id:
                return False
            old = self._keyring.get(row.master_key_id)
            if old is None:
                raise MasterKeyMismatch(
                    f"material {ref} is wrapped by unknown master key {row.master_key_id}"
                )
            context = KeyContext(row.key_id, row.version, row.tsg_id)
            dek = old.decrypt(row.wrapped_dek, context.associated_data("dek"))
            conn.execute(
                update(_T)
                .where(_T.c.ref == ref, _T.c.master_key_id == row.master_key_id)
                .values(
                    wrapped_dek=primary.encrypt(dek, context.associated_data("dek")),
                    master_key_id=primary.key_id,
                )
            )
            del dek
        return True

    # ------------------------------------------------------------ internals

    def _private_key(self, handle: KeyHandle) -> PrivateKey:
        cached = self._cache.get((handle.ref, handle.context))
        if cached is not None:
            return cached
        try:
            with self._engine.connect() as conn:
                row = conn.execute(
                    select(
                        _T.c.wrapped_dek, _T.c.ciphertext, _T.c.algorithm, _T.c.master_key_id
                    ).where(_T.c.ref == handle.ref)
                ).first()
        except SQLAlchemyError as e:
            raise KeyStoreUnavailable("the built-in key store is unreachable") from e
        if row is None:
            raise KeyMaterialMissing(f"key material {handle.ref} is missing or was destroyed")
        if row.algorithm != handle.algorithm.value:
            raise KeyMaterialMissing("stored key material does not match the key's algorithm")
        # Both decryptions authenticate the caller's context (AAD): a row copied
        # from another key, version or TSG raises MasterKeyMismatch here.
        master = self._keyring.get(row.master_key_id)
        if master is None:
            raise MasterKeyMismatch(
                f"key material is wrapped by master key {row.master_key_id}, which this server "
                "does not have; check the master key file"
            )
        dek = master.decrypt(row.wrapped_dek, handle.context.associated_data("dek"))
        blob: bytes = row.ciphertext
        if len(blob) < GCM_NONCE_BYTES + GCM_TAG_BYTES:
            raise MasterKeyMismatch("ciphertext is truncated")
        try:
            plaintext = AESGCM(dek).decrypt(
                blob[:GCM_NONCE_BYTES],
                blob[GCM_NONCE_BYTES:],
                handle.context.associated_data("key"),
            )
        except InvalidTag:
            raise MasterKeyMismatch() from None
        loaded = serialization.load_der_private_key(plaintext, password=None)
        del plaintext, dek
        if not isinstance(loaded, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            raise KeyMaterialMissing("stored key material is not an RSA or EC key")
        self._cache.put((handle.ref, handle.context), loaded)
        return loaded
