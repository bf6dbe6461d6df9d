"""The built-in key store against real, migrated databases (SQLite and PostgreSQL).

Signatures are checked with ``cryptography`` directly, over the original message,
not only through Signery's own ``verify_signature``. Tampering is done the way an
attacker with database access would do it: plain SQL on ``builtin_key_material``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import secrets
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.x509.oid import NameOID
from sqlalchemy import Engine, select, text

from signery.crypto import (
    Hashed,
    PublicKey,
    algorithm_of_public_key,
    hash_bytes,
    schemes_for,
    verify_signature,
)
from signery.errors import (
    DigestLengthMismatch,
    KeyMaterialMissing,
    KeyStoreError,
    MasterKeyMismatch,
    SchemeNotAllowed,
)
from signery.keystores import (
    BuiltinKeyStore,
    GeneratedKey,
    KeyContext,
    Keyring,
    MasterKey,
    remote_private_key,
)
from signery.protocol import Algorithm, DigestAlgorithm, SignatureScheme
from signery.server.persistence import migrate
from signery.server.persistence.db import make_engine
from signery.server.schema import Base
from tests.support import postgres_database

BACKENDS = ["sqlite", "postgresql"]
MESSAGE = b"the bytes of a release artifact"
GCM_NONCE = 12
GCM_TAG = 16

HASHES: dict[DigestAlgorithm, hashes.HashAlgorithm] = {
    DigestAlgorithm.SHA256: hashes.SHA256(),
    DigestAlgorithm.SHA384: hashes.SHA384(),
    DigestAlgorithm.SHA512: hashes.SHA512(),
}
RSA_BITS = {Algorithm.RSA_2048: 2048, Algorithm.RSA_3072: 3072, Algorithm.RSA_4096: 4096}
CURVES = {
    Algorithm.EC_P256: "secp256r1",
    Algorithm.EC_P384: "secp384r1",
    Algorithm.EC_P521: "secp521r1",
}


# ------------------------------------------------------------------ databases


@dataclass
class Db:
    backend: str
    engine: Engine
    sqlite_file: Path | None

    def file_bytes(self) -> bytes:
        """Every byte SQLite keeps on disk for this database (main file, WAL, shm)."""
        assert self.sqlite_file is not None
        parts = []
        for suffix in ("", "-wal", "-shm", "-journal"):
            path = self.sqlite_file.with_name(self.sqlite_file.name + suffix)
            if path.exists():
                parts.append(path.read_bytes())
        return b"".join(parts)


@contextlib.contextmanager
def migrated_database(backend: str, directory: Path) -> Iterator[Db]:
    with contextlib.ExitStack() as stack:
        sqlite_file: Path | None = None
        if backend == "sqlite":
            sqlite_file = directory / "keys.db"
            url = f"sqlite:///{sqlite_file}"
        else:
            url = stack.enter_context(postgres_database())
        engine = make_engine(url, pool_size=2)
        stack.callback(engine.dispose)
        migrate.upgrade(engine)
        yield Db(backend, engine, sqlite_file)


@pytest.fixture(scope="module", params=BACKENDS)
def db(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Db]:
    with migrated_database(request.param, tmp_path_factory.mktemp("keys")) as database:
        yield database


@pytest.fixture(params=BACKENDS)
def scratch_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Db]:
    """A database of its own, for tests that leave it in a state others must not see."""
    with migrated_database(request.param, tmp_path) as database:
        yield database


@pytest.fixture(scope="module")
def master() -> MasterKey:
    return MasterKey.generate()


@pytest.fixture(scope="module")
def store(db: Db, master: MasterKey) -> BuiltinKeyStore:
    return BuiltinKeyStore(db.engine, master)


@pytest.fixture(scope="module")
def keys(store: BuiltinKeyStore) -> dict[Algorithm, GeneratedKey]:
    """One key per algorithm, generated once per database."""
    return {algorithm: store.generate(algorithm, new_context()) for algorithm in Algorithm}


def new_context(tsg_id: str | None = None) -> KeyContext:
    return KeyContext(str(uuid.uuid4()), 1, tsg_id or f"{secrets.randbelow(10**10):010d}")


def material_row(engine: Engine, ref: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(
            text("SELECT * FROM builtin_key_material WHERE ref = :ref"), {"ref": ref}
        ).first()


def set_material(engine: Engine, ref: str, *, ciphertext: bytes, wrapped_dek: bytes) -> None:
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE builtin_key_material SET ciphertext = :c, wrapped_dek = :w WHERE ref = :r"
            ),
            {"c": ciphertext, "w": wrapped_dek, "r": ref},
        )


def der(public_key: PublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def verify_independently(
    public_key: PublicKey,
    message: bytes,
    digest: DigestAlgorithm,
    scheme: SignatureScheme,
    signature: bytes,
) -> None:
    """Verify over the message itself with cryptography's own API (raises if invalid)."""
    h = HASHES[digest]
    if isinstance(public_key, rsa.RSAPublicKey):
        pad: padding.AsymmetricPadding = (
            padding.PKCS1v15()
            if scheme is SignatureScheme.RSA_PKCS1V15
            # RFC 8017 §9.1: salt as long as the digest, MGF1 with the same hash.
            else padding.PSS(mgf=padding.MGF1(h), salt_length=h.digest_size)
        )
        public_key.verify(signature, message, pad, h)
    else:
        assert scheme is SignatureScheme.ECDSA
        public_key.verify(signature, message, ec.ECDSA(h))


# ------------------------------------------------------------------ generate and sign


@pytest.mark.parametrize("algorithm", list(Algorithm))
def test_generate_makes_a_key_of_the_requested_algorithm(
    db: Db,
    master: MasterKey,
    store: BuiltinKeyStore,
    keys: dict[Algorithm, GeneratedKey],
    algorithm: Algorithm,
) -> None:
    generated = keys[algorithm]
    public_key = generated.public_key
    if algorithm.is_rsa:
        assert isinstance(public_key, rsa.RSAPublicKey)
        assert public_key.key_size == RSA_BITS[algorithm]
        assert public_key.public_numbers().e == 65537
    else:
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        assert public_key.curve.name == CURVES[algorithm]
    assert algorithm_of_public_key(public_key) is algorithm

    handle = generated.handle
    assert (handle.store, handle.algorithm) == ("builtin", algorithm)
    assert der(store.public_key(handle)) == der(public_key)

    row = material_row(db.engine, handle.ref)
    assert row is not None
    assert (row.key_id, row.version, row.tsg_id) == (
        handle.context.key_id,
        handle.context.version,
        handle.context.tsg_id,
    )
    assert row.algorithm == algorithm.value
    assert row.master_key_id == master.key_id
    assert bytes(row.public_key_der) == der(public_key)


def test_every_generated_key_is_new(keys: dict[Algorithm, GeneratedKey]) -> None:
    refs = {k.handle.ref for k in keys.values()}
    publics = {der(k.public_key) for k in keys.values()}
    assert len(refs) == len(publics) == len(Algorithm)


@pytest.mark.parametrize("algorithm", list(Algorithm))
def test_signatures_verify_for_every_scheme_and_digest(
    db: Db,
    master: MasterKey,
    store: BuiltinKeyStore,
    keys: dict[Algorithm, GeneratedKey],
    algorithm: Algorithm,
) -> None:
    generated = keys[algorithm]
    # The generating store signs from its cache; a new store must decrypt from the row.
    for signer in (store, BuiltinKeyStore(db.engine, master)):
        for scheme in schemes_for(algorithm):
            for digest in DigestAlgorithm:
                hashed = hash_bytes(MESSAGE, digest)
                signature = signer.sign(generated.handle, hashed, scheme)

                assert verify_signature(generated.public_key, hashed, scheme, signature)
                verify_independently(generated.public_key, MESSAGE, digest, scheme, signature)
                other_message = hash_bytes(MESSAGE + b"!", digest)
                assert not verify_signature(generated.public_key, other_message, scheme, signature)
                for other_scheme in set(SignatureScheme) - {scheme}:
                    assert not verify_signature(
                        generated.public_key, hashed, other_scheme, signature
                    )


@pytest.mark.parametrize("algorithm", list(Algorithm))
def test_a_scheme_that_does_not_fit_the_key_is_refused(
    store: BuiltinKeyStore, keys: dict[Algorithm, GeneratedKey], algorithm: Algorithm
) -> None:
    handle = keys[algorithm].handle
    wrong = [s for s in SignatureScheme if s not in schemes_for(algorithm)]
    assert wrong
    for scheme in wrong:
        with pytest.raises(SchemeNotAllowed):
            store.sign(handle, hash_bytes(MESSAGE, DigestAlgorithm.SHA256), scheme)


@pytest.mark.parametrize("digest", list(DigestAlgorithm))
def test_a_digest_of_the_wrong_length_cannot_be_built(digest: DigestAlgorithm) -> None:
    right = hashlib.new(digest.value).digest_size
    for length in {0, 1, right - 1, right + 1, 20, 32, 48, 64} - {right}:
        with pytest.raises(DigestLengthMismatch):
            Hashed(digest, bytes(length))
    assert Hashed(digest, bytes(right)).digest == bytes(right)


# ------------------------------------------------------------------ destroy


def test_a_destroyed_key_cannot_sign_from_any_store_instance(
    db: Db, master: MasterKey, store: BuiltinKeyStore, keys: dict[Algorithm, GeneratedKey]
) -> None:
    generated = store.generate(Algorithm.EC_P256, new_context())
    hashed = hash_bytes(MESSAGE, DigestAlgorithm.SHA256)
    store.sign(generated.handle, hashed, SignatureScheme.ECDSA)  # cached now

    store.destroy(generated.handle)

    assert material_row(db.engine, generated.handle.ref) is None
    for instance in (store, BuiltinKeyStore(db.engine, master)):
        with pytest.raises(KeyMaterialMissing):
            instance.sign(generated.handle, hashed, SignatureScheme.ECDSA)
        with pytest.raises(KeyMaterialMissing):
            instance.public_key(generated.handle)
    # Other keys are untouched.
    untouched = keys[Algorithm.EC_P256]
    signature = store.sign(untouched.handle, hashed, SignatureScheme.ECDSA)
    assert verify_signature(untouched.public_key, hashed, SignatureScheme.ECDSA, signature)


def test_a_destroyed_key_leaves_other_instances_within_their_cache_ttl(
    db: Db, master: MasterKey, store: BuiltinKeyStore
) -> None:
    """KeyStore.destroy() erases the row at once; another instance on the same
    database (another replica or worker) that had the key decrypted forgets it once
    its cache entry is older than cache_ttl, and then refuses with KeyMaterialMissing.
    (Signing is refused earlier than that by the key's status, checked per request.)"""
    generated = store.generate(Algorithm.EC_P256, new_context())
    hashed = hash_bytes(MESSAGE, DigestAlgorithm.SHA256)
    elsewhere = BuiltinKeyStore(db.engine, master, cache_ttl=0.3)
    elsewhere.sign(generated.handle, hashed, SignatureScheme.ECDSA)

    store.destroy(generated.handle)
    with pytest.raises(KeyMaterialMissing):
        store.sign(generated.handle, hashed, SignatureScheme.ECDSA)

    time.sleep(0.35)
    with pytest.raises(KeyMaterialMissing):
        elsewhere.sign(generated.handle, hashed, SignatureScheme.ECDSA)


def test_destroyed_material_does_not_linger_in_the_sqlite_files(
    tmp_path: Path, master: MasterKey
) -> None:
    """secure_delete=ON zeroes freed pages; once the last connection closes, the
    WAL is checkpointed, so the erased ciphertext and wrapped DEK are gone from disk."""
    with migrated_database("sqlite", tmp_path) as database:
        store = BuiltinKeyStore(database.engine, master)
        kept = store.generate(Algorithm.EC_P256, new_context())
        doomed = store.generate(Algorithm.EC_P256, new_context())
        row = material_row(database.engine, doomed.handle.ref)
        ciphertext, wrapped = bytes(row.ciphertext), bytes(row.wrapped_dek)
        kept_ciphertext = bytes(material_row(database.engine, kept.handle.ref).ciphertext)
        store.destroy(doomed.handle)
        database.engine.dispose()

        on_disk = database.file_bytes()
        assert kept_ciphertext in on_disk  # the scan does see stored material
        assert ciphertext not in on_disk
        assert wrapped not in on_disk


# ------------------------------------------------------------------ context binding (AAD)


def test_material_swapped_between_rows_does_not_decrypt(
    db: Db, master: MasterKey, store: BuiltinKeyStore
) -> None:
    tsg = f"{secrets.randbelow(10**10):010d}"
    a = store.generate(Algorithm.EC_P256, new_context(tsg))
    b = store.generate(Algorithm.EC_P256, new_context(tsg))
    row_a, row_b = material_row(db.engine, a.handle.ref), material_row(db.engine, b.handle.ref)
    hashed = hash_bytes(MESSAGE, DigestAlgorithm.SHA256)

    def fresh_sign(generated: GeneratedKey) -> bytes:
        return BuiltinKeyStore(db.engine, master).sign(
            generated.handle, hashed, SignatureScheme.ECDSA
        )

    set_material(
        db.engine, a.handle.ref, ciphertext=row_b.ciphertext, wrapped_dek=row_b.wrapped_dek
    )
    set_material(
        db.engine, b.handle.ref, ciphertext=row_a.ciphertext, wrapped_dek=row_a.wrapped_dek
    )
    for generated in (a, b):
        with pytest.raises(MasterKeyMismatch):
            fresh_sign(generated)

    # Only the ciphertext moved: the DEK unwraps, the key does not decrypt under it.
    set_material(
        db.engine, a.handle.ref, ciphertext=row_b.ciphertext, wrapped_dek=row_a.wrapped_dek
    )
    with pytest.raises(MasterKeyMismatch):
        fresh_sign(a)

    # Put back: the same handles sign again, so the refusals above came from the swap.
    set_material(
        db.engine, a.handle.ref, ciphertext=row_a.ciphertext, wrapped_dek=row_a.wrapped_dek
    )
    set_material(
        db.engine, b.handle.ref, ciphertext=row_b.ciphertext, wrapped_dek=row_b.wrapped_dek
    )
    for generated in (a, b):
        assert verify_signature(
            generated.public_key, hashed, SignatureScheme.ECDSA, fresh_sign(generated)
        )


def test_material_of_another_version_of_the_same_key_does_not_decrypt(
    db: Db, master: MasterKey, store: BuiltinKeyStore
) -> None:
    v1_context = new_context()
    v1 = store.generate(Algorithm.EC_P384, v1_context)
    v2 = store.generate(Algorithm.EC_P384, replace(v1_context, version=2))
    row_v2 = material_row(db.engine, v2.handle.ref)

    set_material(
        db.engine, v1.handle.ref, ciphertext=row_v2.ciphertext, wrapped_dek=row_v2.wrapped_dek
    )

    with pytest.raises(MasterKeyMismatch):
        BuiltinKeyStore(db.engine, master).sign(
            v1.handle, hash_bytes(MESSAGE, DigestAlgorithm.SHA384), SignatureScheme.ECDSA
        )


@pytest.mark.parametrize(
    "change",
    [
        {"tsg_id": "9999999999"},
        {"version": 2},
        {"version": 0},
        {"key_id": "00000000-0000-0000-0000-000000000000"},
    ],
    ids=["tsg_id", "version+1", "version-1", "key_id"],
)
def test_a_handle_with_another_context_does_not_decrypt(
    db: Db,
    master: MasterKey,
    store: BuiltinKeyStore,
    keys: dict[Algorithm, GeneratedKey],
    change: dict[str, Any],
) -> None:
    generated = keys[Algorithm.EC_P256]
    forged = replace(generated.handle, context=replace(generated.handle.context, **change))
    hashed = hash_bytes(MESSAGE, DigestAlgorithm.SHA256)

    # The generating store has the key cached under its true context: no shortcut.
    for instance in (store, BuiltinKeyStore(db.engine, master)):
        with pytest.raises(MasterKeyMismatch):
            instance.sign(forged, hashed, SignatureScheme.ECDSA)
        with pytest.raises(MasterKeyMismatch):
            instance.public_key(forged)
    # The real handle is not poisoned by the attempts.
    signature = store.sign(generated.handle, hashed, SignatureScheme.ECDSA)
    assert verify_signature(generated.public_key, hashed, SignatureScheme.ECDSA, signature)


def test_a_handle_claiming_another_algorithm_is_refused(
    db: Db, master: MasterKey, keys: dict[Algorithm, GeneratedKey]
) -> None:
    generated = keys[Algorithm.EC_P256]
    forged = replace(generated.handle, algorithm=Algorithm.EC_P384)

    with pytest.raises(KeyMaterialMissing):
        BuiltinKeyStore(db.engine, master).sign(
            forged, hash_bytes(MESSAGE, DigestAlgorithm.SHA384), SignatureScheme.ECDSA
        )


# ------------------------------------------------------------------ material at rest


def secret_forms(private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> dict[str, bytes]:
    """Encodings under which the private key could sit in a database by mistake."""
    pkcs8 = private_key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    traditional = private_key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    if isinstance(private_key, rsa.RSAPrivateKey):
        p = private_key.private_numbers().p
        raw = p.to_bytes((p.bit_length() + 7) // 8, "big")
    else:
        d = private_key.private_numbers().private_value
        raw = d.to_bytes((private_key.curve.key_size + 7) // 8, "big")
    forms = {"pkcs8": pkcs8, "traditional": traditional, "raw secret": raw}
    for name, value in list(forms.items()):
        forms[f"{name} hex"] = value.hex().encode()
        forms[f"{name} base64"] = base64.b64encode(value)
    return forms


def all_database_values(engine: Engine) -> list[bytes]:
    values: list[bytes] = []
    with engine.connect() as conn:
        for table in Base.metadata.sorted_tables:
            for row in conn.execute(select(table)):
                for value in row:
                    if isinstance(value, bytes | bytearray | memoryview):
                        values.append(bytes(value))
                    elif value is not None:
                        values.append(str(value).encode())
    return values


@pytest.mark.parametrize("algorithm", list(Algorithm))
def test_the_private_key_is_stored_only_inside_the_envelope(
    db: Db, master: MasterKey, keys: dict[Algorithm, GeneratedKey], algorithm: Algorithm
) -> None:
    """The store never hands out private key bytes, so the test opens the envelope
    itself, with the real master key and the documented scheme (DESIGN.md §4: DEK
    wrapped under the master key with the context's "dek" associated data, PKCS#8
    under the DEK with its "key" associated data). That pins the on-disk format
    (a change would orphan existing databases) and yields the true private key,
    proven by its public half. Then no column of any table, and for SQLite no byte
    of the database files, may hold that key in PKCS#8, traditional DER, raw
    scalar/prime form (or their hex/base64), nor a PEM private-key header, nor the DEK.
    """
    generated = keys[algorithm]
    context = generated.handle.context
    row = material_row(db.engine, generated.handle.ref)
    ciphertext, wrapped = bytes(row.ciphertext), bytes(row.wrapped_dek)

    dek = master.decrypt(wrapped, context.associated_data("dek"))
    pkcs8 = AESGCM(dek).decrypt(
        ciphertext[:GCM_NONCE], ciphertext[GCM_NONCE:], context.associated_data("key")
    )
    # Validation skipped for speed: the public half is compared just below.
    private_key = serialization.load_der_private_key(
        pkcs8, password=None, unsafe_skip_rsa_key_validation=True
    )
    assert isinstance(private_key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey)
    assert der(private_key.public_key()) == der(generated.public_key)
    assert len(ciphertext) == GCM_NONCE + len(pkcs8) + GCM_TAG
    assert len(wrapped) == GCM_NONCE + len(dek) + GCM_TAG

    needles = secret_forms(private_key)
    needles["dek"] = dek
    needles["dek base64"] = base64.b64encode(dek)
    haystacks = all_database_values(db.engine)
    assert any(bytes(row.public_key_der) in h for h in haystacks)  # the scan sees the table
    if db.sqlite_file is not None:
        haystacks.append(db.file_bytes())
    for haystack in haystacks:
        assert b"PRIVATE KEY" not in haystack
        for name, needle in needles.items():
            assert needle not in haystack, f"the {name} form of the private key is stored"


# ------------------------------------------------------------------ health and handles


def test_health_is_ok_until_material_of_another_master_key_appears(scratch_db: Db) -> None:
    master, other_master = MasterKey.generate(), MasterKey.generate()
    store = BuiltinKeyStore(scratch_db.engine, master)
    assert store.health().ok
    mine = store.generate(Algorithm.EC_P256, new_context())
    assert store.health().ok

    other_store = BuiltinKeyStore(scratch_db.engine, other_master)
    foreign = other_store.generate(Algorithm.EC_P256, new_context())

    for instance in (store, other_store):
        health = instance.health()
        assert not health.ok
        assert "master key" in health.detail
    with pytest.raises(MasterKeyMismatch):
        BuiltinKeyStore(scratch_db.engine, master).sign(
            foreign.handle, hash_bytes(MESSAGE, DigestAlgorithm.SHA256), SignatureScheme.ECDSA
        )
    with pytest.raises(MasterKeyMismatch):
        BuiltinKeyStore(scratch_db.engine, other_master).sign(
            mine.handle, hash_bytes(MESSAGE, DigestAlgorithm.SHA256), SignatureScheme.ECDSA
        )


def test_health_reports_an_unreachable_database_without_raising(
    tmp_path: Path, master: MasterKey
) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'no' / 'such' / 'dir' / 'x.db'}", pool_size=1)
    try:
        health = BuiltinKeyStore(engine, master).health()
    finally:
        engine.dispose()
    assert not health.ok
    assert health.detail


@pytest.mark.parametrize("store_name", ["elsewhere", "builtin2", ""])
def test_a_handle_of_another_store_is_refused(
    db: Db,
    master: MasterKey,
    store: BuiltinKeyStore,
    keys: dict[Algorithm, GeneratedKey],
    store_name: str,
) -> None:
    generated = keys[Algorithm.EC_P256]
    foreign = replace(generated.handle, store=store_name)
    hashed = hash_bytes(MESSAGE, DigestAlgorithm.SHA256)

    for operation in (
        lambda: store.sign(foreign, hashed, SignatureScheme.ECDSA),
        lambda: store.public_key(foreign),
        lambda: store.destroy(foreign),
    ):
        with pytest.raises(KeyStoreError) as caught:
            operation()
        assert type(caught.value) is KeyStoreError
        assert caught.value.code == "keystore_error"

    # The refused destroy erased nothing.
    assert material_row(db.engine, generated.handle.ref) is not None
    signature = BuiltinKeyStore(db.engine, master).sign(
        generated.handle, hashed, SignatureScheme.ECDSA
    )
    assert verify_signature(generated.public_key, hashed, SignatureScheme.ECDSA, signature)


def test_a_store_under_another_name_refuses_the_builtin_handle(
    db: Db, master: MasterKey, keys: dict[Algorithm, GeneratedKey]
) -> None:
    renamed = BuiltinKeyStore(db.engine, master, name="second")

    with pytest.raises(KeyStoreError) as caught:
        renamed.sign(
            keys[Algorithm.EC_P256].handle,
            hash_bytes(MESSAGE, DigestAlgorithm.SHA256),
            SignatureScheme.ECDSA,
        )
    assert type(caught.value) is KeyStoreError


# ------------------------------------------------------------------ remote_private_key
#
# signery.keystores.remote_private_key hands cryptography's X.509 builders an
# RSAPrivateKey / EllipticCurvePrivateKey subclass whose sign() calls the store.
# Subclassing those ABCs is NOT a documented extension point of cryptography;
# these tests pin that it keeps working with the installed cryptography version.

NAME = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Signery remote key test")])

REMOTE_CASES = [
    (Algorithm.EC_P256, DigestAlgorithm.SHA256, None),
    (Algorithm.EC_P384, DigestAlgorithm.SHA384, None),
    (Algorithm.EC_P521, DigestAlgorithm.SHA512, None),
    (Algorithm.EC_P256, DigestAlgorithm.SHA512, None),
    (Algorithm.RSA_2048, DigestAlgorithm.SHA256, SignatureScheme.RSA_PKCS1V15),
    (Algorithm.RSA_3072, DigestAlgorithm.SHA384, SignatureScheme.RSA_PKCS1V15),
    (Algorithm.RSA_2048, DigestAlgorithm.SHA256, SignatureScheme.RSA_PSS),
    (Algorithm.RSA_4096, DigestAlgorithm.SHA512, SignatureScheme.RSA_PSS),
]


def rsa_padding(
    scheme: SignatureScheme | None, h: hashes.HashAlgorithm
) -> padding.AsymmetricPadding | None:
    if scheme is SignatureScheme.RSA_PSS:
        return padding.PSS(mgf=padding.MGF1(h), salt_length=padding.PSS.DIGEST_LENGTH)
    if scheme is SignatureScheme.RSA_PKCS1V15:
        return padding.PKCS1v15()
    return None


def self_signed_builder(public_key: PublicKey) -> x509.CertificateBuilder:
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(NAME)
        .issuer_name(NAME)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    )


def signature_ids(case: tuple[Algorithm, DigestAlgorithm, SignatureScheme | None]) -> str:
    algorithm, digest, scheme = case
    return f"{algorithm.value}-{digest.value}-{scheme.value if scheme else 'ecdsa'}"


@pytest.mark.parametrize("case", REMOTE_CASES, ids=signature_ids)
def test_remote_key_signs_a_certificate_that_verifies(
    store: BuiltinKeyStore,
    keys: dict[Algorithm, GeneratedKey],
    case: tuple[Algorithm, DigestAlgorithm, SignatureScheme | None],
) -> None:
    algorithm, digest, scheme = case
    generated = keys[algorithm]
    h = HASHES[digest]
    remote = remote_private_key(store, generated.handle, generated.public_key)

    cert = self_signed_builder(generated.public_key).sign(
        remote, h, rsa_padding=rsa_padding(scheme, h)
    )

    cert.verify_directly_issued_by(cert)
    assert der(cert.public_key()) == der(generated.public_key)  # type: ignore[arg-type]
    assert cert.signature_hash_algorithm is not None
    assert cert.signature_hash_algorithm.name == h.name
    verify_independently(
        generated.public_key,
        cert.tbs_certificate_bytes,
        digest,
        scheme or SignatureScheme.ECDSA,
        cert.signature,
    )


@pytest.mark.parametrize("case", REMOTE_CASES, ids=signature_ids)
def test_remote_key_signs_a_csr_that_verifies(
    store: BuiltinKeyStore,
    keys: dict[Algorithm, GeneratedKey],
    case: tuple[Algorithm, DigestAlgorithm, SignatureScheme | None],
) -> None:
    algorithm, digest, scheme = case
    generated = keys[algorithm]
    h = HASHES[digest]
    remote = remote_private_key(store, generated.handle, generated.public_key)

    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(NAME)
        .sign(remote, h, rsa_padding=rsa_padding(scheme, h))
    )

    assert csr.is_signature_valid
    assert der(csr.public_key()) == der(generated.public_key)  # type: ignore[arg-type]
    verify_independently(
        generated.public_key,
        csr.tbs_certrequest_bytes,
        digest,
        scheme or SignatureScheme.ECDSA,
        csr.signature,
    )


@pytest.mark.parametrize(
    "pss",
    [
        padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=20),
        padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH),
        padding.PSS(mgf=padding.MGF1(hashes.SHA512()), salt_length=padding.PSS.DIGEST_LENGTH),
    ],
    ids=["salt-20", "salt-max", "mgf1-sha512"],
)
def test_remote_rsa_key_never_returns_a_signature_for_pss_parameters_it_did_not_use(
    store: BuiltinKeyStore, keys: dict[Algorithm, GeneratedKey], pss: padding.PSS
) -> None:
    """The builder writes the requested PSS parameters into the certificate's
    signature AlgorithmIdentifier. The store signs with its own parameters (salt =
    digest length, MGF1 with the signing hash); for any other request the adapter
    must refuse, never hand back a certificate whose signature cannot verify."""
    generated = keys[Algorithm.RSA_2048]
    remote = remote_private_key(store, generated.handle, generated.public_key)
    builder = self_signed_builder(generated.public_key)

    try:
        cert = builder.sign(remote, hashes.SHA256(), rsa_padding=pss)
    except KeyStoreError:
        return
    cert.verify_directly_issued_by(cert)


@pytest.mark.parametrize("algorithm", [Algorithm.EC_P256, Algorithm.RSA_2048])
def test_remote_key_never_exports_private_material(
    store: BuiltinKeyStore, keys: dict[Algorithm, GeneratedKey], algorithm: Algorithm
) -> None:
    generated = keys[algorithm]
    remote = remote_private_key(store, generated.handle, generated.public_key)

    with pytest.raises(KeyStoreError):
        remote.private_numbers()
    for encoding, fmt in (
        (serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8),
        (serialization.Encoding.DER, serialization.PrivateFormat.PKCS8),
        (serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL),
    ):
        with pytest.raises(KeyStoreError):
            remote.private_bytes(encoding, fmt, serialization.NoEncryption())
    if isinstance(remote, ec.EllipticCurvePrivateKey):
        peer = ec.generate_private_key(ec.SECP256R1()).public_key()
        with pytest.raises(KeyStoreError):
            remote.exchange(ec.ECDH(), peer)
    else:
        with pytest.raises(KeyStoreError):
            remote.decrypt(b"\x00" * 256, padding.PKCS1v15())
    assert der(remote.public_key()) == der(generated.public_key)
    assert remote.key_size == generated.public_key.key_size


@pytest.mark.parametrize("algorithm", [Algorithm.EC_P256, Algorithm.RSA_2048])
def test_remote_key_refuses_prehashed_and_unsupported_hashes(
    store: BuiltinKeyStore, keys: dict[Algorithm, GeneratedKey], algorithm: Algorithm
) -> None:
    generated = keys[algorithm]
    remote = remote_private_key(store, generated.handle, generated.public_key)
    digest = hashlib.sha256(MESSAGE).digest()

    calls: list[Any]
    if isinstance(remote, ec.EllipticCurvePrivateKey):
        calls = [
            lambda: remote.sign(digest, ec.ECDSA(utils.Prehashed(hashes.SHA256()))),
            lambda: remote.sign(MESSAGE, ec.ECDSA(hashes.SHA1())),  # noqa: S303
            lambda: remote.sign(MESSAGE, ec.ECDSA(hashes.SHA3_256())),
        ]
    else:
        calls = [
            lambda: remote.sign(digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256())),
            lambda: remote.sign(MESSAGE, padding.PKCS1v15(), hashes.SHA1()),  # noqa: S303
            lambda: remote.sign(MESSAGE, padding.PKCS1v15(), utils.NoDigestInfo()),
            lambda: remote.sign(
                MESSAGE,
                padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None),
                hashes.SHA256(),
            ),
        ]
    for call in calls:
        with pytest.raises(KeyStoreError):
            call()


def test_rewrap_all_moves_every_data_key_under_the_new_primary(scratch_db: Db) -> None:
    """The store's own half of a master-key rotation (signery.server.installation.masterkey)."""
    old, new = MasterKey.generate(), MasterKey.generate()
    made = [
        BuiltinKeyStore(scratch_db.engine, old).generate(
            Algorithm.EC_P256, KeyContext(str(uuid.uuid4()), 1, "1234567890")
        )
        for _ in range(3)
    ]
    store = BuiltinKeyStore(scratch_db.engine, Keyring(new, [old]))
    steps: list[tuple[int, int]] = []

    assert store.count_not_under_primary() == 3
    assert store.rewrap_all(progress=lambda done, total: steps.append((done, total))) == 3
    assert steps == [(1, 3), (2, 3), (3, 3)]
    assert store.count_not_under_primary() == 0
    assert store.rewrap_all() == 0
    hashed = hash_bytes(b"after the rotation", DigestAlgorithm.SHA256)
    for generated in made:
        # A store that knows only the new master key signs with every key.
        signature = BuiltinKeyStore(scratch_db.engine, new).sign(
            generated.handle, hashed, SignatureScheme.ECDSA
        )
        assert verify_signature(generated.public_key, hashed, SignatureScheme.ECDSA, signature)
