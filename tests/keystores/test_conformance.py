"""The key-store contract, run against every key store (builtin, aws-kms, pkcs11).

The core (generate, sign, public key) is asked of every store; the optional
capabilities (Destroyable, DestroyCancellable, HealthChecked) are tested on the
stores that declare them, and which store declares which is pinned below.

Every signature is verified with ``cryptography`` against the public key the
store returned, never with the store's own verify (moto's Verify agrees with
its own wrong signatures; see ECOSYSTEM-FACTS.md).
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

from signery.crypto import Hashed, schemes_for
from signery.errors import (
    DigestLengthMismatch,
    DigestNotAllowed,
    KeyMaterialMissing,
    SchemeNotAllowed,
    SigneryError,
    UnsupportedAlgorithm,
)
from signery.keystores import (
    Destroyable,
    DestroyCancellable,
    GeneratedKey,
    HealthChecked,
    KeyContext,
    KeyHandle,
    KeyStore,
)
from signery.protocol import Algorithm, DigestAlgorithm, SignatureScheme
from tests.keystores.backends import FACTORIES

HASHES = {
    DigestAlgorithm.SHA256: hashes.SHA256,
    DigestAlgorithm.SHA384: hashes.SHA384,
    DigestAlgorithm.SHA512: hashes.SHA512,
}


# The optional capabilities of each store. A store that loses one (or gains one
# without its tests) fails here, not silently in a skipped test.
CAPABILITIES = {
    "builtin": {"Destroyable", "HealthChecked"},
    "aws-kms": {"Destroyable", "DestroyCancellable", "HealthChecked"},
    "pkcs11": {"Destroyable", "HealthChecked"},
}


@pytest.fixture(scope="module", params=sorted(FACTORIES))
def store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[KeyStore]:
    with FACTORIES[request.param](tmp_path_factory.mktemp(f"store-{request.param}")) as s:
        yield s


@pytest.fixture(scope="module")
def keys(store: KeyStore) -> dict[Algorithm, GeneratedKey]:
    """One key per algorithm the store supports, generated once for the module."""
    tsg = "1234567890"
    return {
        alg: store.generate(
            alg, KeyContext(str(uuid.uuid4()), 1, tsg, label=f"conformance-{alg.value}")
        )
        for alg in sorted(store.supported_algorithms)
    }


def context() -> KeyContext:
    return KeyContext(str(uuid.uuid4()), 1, "1234567890", label="conformance")


def digest(alg: DigestAlgorithm, text: str) -> Hashed:
    return Hashed(alg, hashlib.new(alg.value, text.encode()).digest())


def verify(public_key: object, hashed: Hashed, scheme: SignatureScheme, signature: bytes) -> None:
    """Independent verification with cryptography; raises InvalidSignature."""
    h = HASHES[hashed.algorithm]()
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        assert scheme is SignatureScheme.ECDSA
        public_key.verify(signature, hashed.digest, ec.ECDSA(utils.Prehashed(h)))
        return
    assert isinstance(public_key, rsa.RSAPublicKey)
    pad: padding.AsymmetricPadding = (
        padding.PSS(padding.MGF1(h), h.digest_size)
        if scheme is SignatureScheme.RSA_PSS
        else padding.PKCS1v15()
    )
    public_key.verify(signature, hashed.digest, pad, utils.Prehashed(h))


def test_every_store_offers_the_six_algorithms(store: KeyStore) -> None:
    assert set(store.supported_algorithms) == set(Algorithm)


def test_generate_returns_a_handle_and_a_public_key(
    store: KeyStore, keys: dict[Algorithm, GeneratedKey]
) -> None:
    for alg, generated in keys.items():
        assert isinstance(generated.handle, KeyHandle)
        assert generated.handle.store == store.name
        assert generated.handle.algorithm is alg
        assert isinstance(generated.public_key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey)
        assert (
            store.public_key(generated.handle).public_numbers()
            == generated.public_key.public_numbers()
        )


@pytest.mark.parametrize("algorithm", list(Algorithm))
def test_signatures_verify_for_every_scheme_and_allowed_digest(
    store: KeyStore, keys: dict[Algorithm, GeneratedKey], algorithm: Algorithm
) -> None:
    generated = keys[algorithm]
    allowed = store.digests_for(algorithm)
    assert allowed, "every algorithm signs with at least one digest"
    for scheme in schemes_for(algorithm):
        for digest_alg in DigestAlgorithm:
            hashed = digest(digest_alg, f"{algorithm}{scheme}{digest_alg}")
            if digest_alg not in allowed:
                with pytest.raises(DigestNotAllowed):
                    store.sign(generated.handle, hashed, scheme)
                continue
            signature = store.sign(generated.handle, hashed, scheme)
            verify(generated.public_key, hashed, scheme, signature)


def test_the_digest_length_is_enforced(
    store: KeyStore, keys: dict[Algorithm, GeneratedKey]
) -> None:
    with pytest.raises(DigestLengthMismatch):
        Hashed(DigestAlgorithm.SHA256, b"\x00" * 31)
    with pytest.raises(DigestLengthMismatch):
        Hashed(DigestAlgorithm.SHA384, b"\x00" * 32)


@pytest.mark.parametrize("algorithm", list(Algorithm))
def test_a_scheme_that_does_not_fit_the_key_is_refused(
    store: KeyStore, keys: dict[Algorithm, GeneratedKey], algorithm: Algorithm
) -> None:
    wrong = [s for s in SignatureScheme if s not in schemes_for(algorithm)]
    hashed = digest(store.digests_for(algorithm)[0], "wrong scheme")
    for scheme in wrong:
        with pytest.raises(SchemeNotAllowed):
            store.sign(keys[algorithm].handle, hashed, scheme)


def test_a_handle_from_another_store_is_refused(
    store: KeyStore, keys: dict[Algorithm, GeneratedKey]
) -> None:
    handle = keys[Algorithm.EC_P256].handle
    foreign = KeyHandle("elsewhere", handle.ref, handle.algorithm, handle.context)
    with pytest.raises(SigneryError):
        store.sign(foreign, digest(DigestAlgorithm.SHA256, "x"), SignatureScheme.ECDSA)


def test_a_missing_handle_is_our_error(store: KeyStore) -> None:
    ghost = KeyHandle(store.name, missing_ref(store), Algorithm.EC_P256, context())
    with pytest.raises(KeyMaterialMissing):
        store.sign(ghost, digest(DigestAlgorithm.SHA256, "ghost"), SignatureScheme.ECDSA)


def missing_ref(store: KeyStore) -> str:
    """A reference of the right shape for the store that names nothing."""
    if store.kind == "aws-kms":
        return str(uuid.uuid4())
    if store.kind == "pkcs11":
        return uuid.uuid4().hex
    return str(uuid.uuid4())


def test_the_store_declares_its_capabilities(store: KeyStore) -> None:
    declared = {
        capability.__name__
        for capability in (Destroyable, DestroyCancellable, HealthChecked)
        if isinstance(store, capability)
    }

    assert declared == CAPABILITIES[store.kind]


@pytest.mark.parametrize("algorithm", [Algorithm.EC_P256, Algorithm.RSA_2048])
def test_a_destroyed_key_cannot_sign(store: KeyStore, algorithm: Algorithm) -> None:
    if not isinstance(store, Destroyable):
        pytest.skip(f"{store.kind} does not erase keys")
    generated = store.generate(algorithm, context())
    hashed = digest(DigestAlgorithm.SHA256, "doomed")
    scheme = schemes_for(algorithm)[0]
    verify(generated.public_key, hashed, scheme, store.sign(generated.handle, hashed, scheme))
    store.destroy(generated.handle)
    with pytest.raises(SigneryError) as caught:
        store.sign(generated.handle, hashed, scheme)
    # Our error, never the SDK's; for stores that schedule deletion, "pending".
    assert caught.value.code in {"key_material_missing", "keystore_key_pending_deletion"}


def test_an_unsupported_algorithm_is_refused(store: KeyStore) -> None:
    class Weird(str):
        pass

    with pytest.raises(UnsupportedAlgorithm):
        store.generate(Weird("DSA_1024"), context())  # type: ignore[arg-type]


def test_no_private_key_material_is_returned_or_logged(
    store: KeyStore, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.DEBUG)
    generated = store.generate(Algorithm.RSA_2048, context())
    signature = store.sign(
        generated.handle, digest(DigestAlgorithm.SHA256, "log"), SignatureScheme.RSA_PKCS1V15
    )
    if isinstance(store, Destroyable):
        store.destroy(generated.handle)
    text = caplog.text + repr(generated) + repr(store)
    for marker in ("PRIVATE KEY", "private_exponent", "prime1", "CKA_PRIVATE_EXPONENT"):
        assert marker not in text
    assert not hasattr(generated, "private_key")
    assert isinstance(signature, bytes)
    assert len(signature) == 256
    for name in ("export_private_key", "private_key", "private_bytes"):
        assert not hasattr(store, name), f"a key store must not offer {name}()"


def test_health_is_reported(store: KeyStore) -> None:
    if not isinstance(store, HealthChecked):
        pytest.skip(f"{store.kind} has no health check")
    health = store.health()
    assert health.ok, health.detail
