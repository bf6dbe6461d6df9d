"""Digest and signature rules shared by client and server (signery.crypto)."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils
from hypothesis import given, settings
from hypothesis import strategies as st

from signery.crypto import (
    HASH_CHUNK,
    Hashed,
    algorithm_of_public_key,
    check_scheme,
    default_digest,
    default_scheme,
    hash_bytes,
    hash_file,
    hash_stream,
    load_public_key_pem,
    schemes_for,
    verify_signature,
)
from signery.errors import DigestLengthMismatch, SchemeNotAllowed, UnsupportedAlgorithm
from signery.protocol import Algorithm, DigestAlgorithm, SignatureScheme

PKCS1 = SignatureScheme.RSA_PKCS1V15
PSS = SignatureScheme.RSA_PSS
ECDSA = SignatureScheme.ECDSA

# The table the rest of the product relies on, written out by hand.
RULES = {
    # algorithm: (schemes that fit, default scheme, default digest)
    Algorithm.RSA_2048: ({PKCS1, PSS}, PKCS1, DigestAlgorithm.SHA256),
    Algorithm.RSA_3072: ({PKCS1, PSS}, PKCS1, DigestAlgorithm.SHA256),
    Algorithm.RSA_4096: ({PKCS1, PSS}, PKCS1, DigestAlgorithm.SHA256),
    Algorithm.EC_P256: ({ECDSA}, ECDSA, DigestAlgorithm.SHA256),
    Algorithm.EC_P384: ({ECDSA}, ECDSA, DigestAlgorithm.SHA384),
    Algorithm.EC_P521: ({ECDSA}, ECDSA, DigestAlgorithm.SHA512),
}
HASHES = {
    DigestAlgorithm.SHA256: hashes.SHA256(),
    DigestAlgorithm.SHA384: hashes.SHA384(),
    DigestAlgorithm.SHA512: hashes.SHA512(),
}

EC_P256_KEY = ec.generate_private_key(ec.SECP256R1())
RSA_KEY = rsa.generate_private_key(65537, 2048)


def rsa_public_key_of_size(bits: int) -> rsa.RSAPublicKey:
    """An RSA public key with a modulus of exactly ``bits`` bits (no private key needed)."""
    modulus = (1 << (bits - 1)) | 1
    return rsa.RSAPublicNumbers(65537, modulus).public_key()


# ------------------------------------------------------------------ Hashed


@pytest.mark.parametrize("algorithm", list(DigestAlgorithm))
def test_hashed_accepts_only_the_digest_length_of_its_algorithm(
    algorithm: DigestAlgorithm,
) -> None:
    size = hashlib.new(algorithm.value).digest_size
    assert algorithm.size == size

    assert Hashed(algorithm, bytes(size)).digest == bytes(size)
    for length in sorted({0, 1, size - 1, size + 1, 2 * size, 20, 28, 32, 48, 64} - {size}):
        with pytest.raises(DigestLengthMismatch):
            Hashed(algorithm, os.urandom(length))


@pytest.mark.parametrize("algorithm", list(DigestAlgorithm))
def test_hashed_names_the_matching_hash(algorithm: DigestAlgorithm) -> None:
    hashed = hash_bytes(b"data", algorithm)

    assert hashed.digest == hashlib.new(algorithm.value, b"data").digest()
    assert hashed.hex == hashed.digest.hex()
    assert hashed.hash_algorithm().name == algorithm.value
    assert hashed.hash_algorithm().digest_size == algorithm.size


# ------------------------------------------------------------------ hashing files


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hash") / "artifact.bin"
    path.write_bytes(os.urandom(2 * HASH_CHUNK + 12345))
    return path


@pytest.mark.parametrize("algorithm", list(DigestAlgorithm))
def test_hash_file_equals_hashlib_over_several_chunks(
    big_file: Path, algorithm: DigestAlgorithm
) -> None:
    data = big_file.read_bytes()
    assert len(data) > 2 * HASH_CHUNK
    progress: list[int] = []

    hashed = hash_file(big_file, algorithm, progress.append)

    assert hashed.algorithm is algorithm
    assert hashed.digest == hashlib.new(algorithm.value, data).digest()
    assert sum(progress) == len(data)
    assert len(progress) == 3
    assert all(0 < n <= HASH_CHUNK for n in progress)


def test_hash_file_of_an_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.write_bytes(b"")
    progress: list[int] = []

    hashed = hash_file(path, DigestAlgorithm.SHA256, progress.append)

    assert hashed.digest == hashlib.sha256(b"").digest()
    assert sum(progress) == 0


def test_hash_stream_and_hash_bytes_agree_with_hash_file(big_file: Path) -> None:
    data = big_file.read_bytes()
    for algorithm in DigestAlgorithm:
        expected = hash_file(big_file, algorithm)
        assert hash_stream(io.BytesIO(data), algorithm) == expected
        assert hash_bytes(data, algorithm) == expected
        assert hash_bytes(data + b"\0", algorithm) != expected


# ------------------------------------------------------------------ algorithm rules


@pytest.mark.parametrize("algorithm", list(Algorithm))
def test_scheme_and_digest_rules(algorithm: Algorithm) -> None:
    schemes, scheme, digest = RULES[algorithm]

    assert set(schemes_for(algorithm)) == schemes
    assert default_scheme(algorithm) is scheme
    assert default_digest(algorithm) is digest
    for candidate in SignatureScheme:
        if candidate in schemes:
            check_scheme(algorithm, candidate)
        else:
            with pytest.raises(SchemeNotAllowed):
                check_scheme(algorithm, candidate)


def test_every_algorithm_has_a_rule() -> None:
    assert set(RULES) == set(Algorithm)


@pytest.mark.parametrize(
    ("public_key", "algorithm"),
    [
        (rsa_public_key_of_size(2048), Algorithm.RSA_2048),
        (rsa_public_key_of_size(3072), Algorithm.RSA_3072),
        (rsa_public_key_of_size(4096), Algorithm.RSA_4096),
        (RSA_KEY.public_key(), Algorithm.RSA_2048),
        (EC_P256_KEY.public_key(), Algorithm.EC_P256),
        (ec.generate_private_key(ec.SECP384R1()).public_key(), Algorithm.EC_P384),
        (ec.generate_private_key(ec.SECP521R1()).public_key(), Algorithm.EC_P521),
    ],
    ids=["rsa-2048", "rsa-3072", "rsa-4096", "rsa-2048-real", "p256", "p384", "p521"],
)
def test_algorithm_of_a_supported_public_key(public_key: object, algorithm: Algorithm) -> None:
    assert algorithm_of_public_key(public_key) is algorithm


@pytest.mark.parametrize(
    "public_key",
    [
        rsa_public_key_of_size(1024),
        rsa_public_key_of_size(2047),
        rsa_public_key_of_size(8192),
        ec.generate_private_key(ec.SECP256K1()).public_key(),
        ed25519.Ed25519PrivateKey.generate().public_key(),
        "not a key",
    ],
    ids=["rsa-1024", "rsa-2047", "rsa-8192", "secp256k1", "ed25519", "str"],
)
def test_algorithm_of_an_unsupported_public_key_is_refused(public_key: object) -> None:
    with pytest.raises(UnsupportedAlgorithm):
        algorithm_of_public_key(public_key)


@pytest.mark.parametrize(
    "public_key",
    [
        ec.generate_private_key(ec.SECP256K1()).public_key(),
        ed25519.Ed25519PrivateKey.generate().public_key(),
        rsa_public_key_of_size(1024),
    ],
    ids=["secp256k1", "ed25519", "rsa-1024"],
)
def test_load_public_key_pem_refuses_unsupported_keys(
    public_key: ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey,
) -> None:
    pem = public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(UnsupportedAlgorithm):
        load_public_key_pem(pem)


# ------------------------------------------------------------------ verify_signature


def ec_sign(hashed: Hashed) -> bytes:
    return EC_P256_KEY.sign(hashed.digest, ec.ECDSA(utils.Prehashed(HASHES[hashed.algorithm])))


def rsa_sign(hashed: Hashed, scheme: SignatureScheme) -> bytes:
    h = HASHES[hashed.algorithm]
    pad: padding.AsymmetricPadding = (
        padding.PKCS1v15()
        if scheme is PKCS1
        else padding.PSS(mgf=padding.MGF1(h), salt_length=h.digest_size)
    )
    return RSA_KEY.sign(hashed.digest, pad, utils.Prehashed(h))


@pytest.mark.parametrize("digest", list(DigestAlgorithm))
def test_verify_signature_accepts_real_signatures(digest: DigestAlgorithm) -> None:
    hashed = hash_bytes(b"artifact", digest)

    assert verify_signature(EC_P256_KEY.public_key(), hashed, ECDSA, ec_sign(hashed))
    for scheme in (PKCS1, PSS):
        assert verify_signature(RSA_KEY.public_key(), hashed, scheme, rsa_sign(hashed, scheme))


@pytest.mark.parametrize(
    "garbage",
    [b"", b"\x00", b"\x30\x06\x02\x01\x01\x02\x01\x01", os.urandom(64), os.urandom(256)],
    ids=["empty", "zero", "tiny-der", "random-64", "random-256"],
)
def test_verify_signature_returns_false_on_garbage(garbage: bytes) -> None:
    hashed = hash_bytes(b"artifact", DigestAlgorithm.SHA256)

    assert verify_signature(EC_P256_KEY.public_key(), hashed, ECDSA, garbage) is False
    for scheme in (PKCS1, PSS):
        assert verify_signature(RSA_KEY.public_key(), hashed, scheme, garbage) is False


def test_verify_signature_returns_false_on_the_wrong_scheme() -> None:
    hashed = hash_bytes(b"artifact", DigestAlgorithm.SHA256)
    ec_signature = ec_sign(hashed)
    pkcs1_signature, pss_signature = rsa_sign(hashed, PKCS1), rsa_sign(hashed, PSS)

    assert verify_signature(EC_P256_KEY.public_key(), hashed, PKCS1, ec_signature) is False
    assert verify_signature(EC_P256_KEY.public_key(), hashed, PSS, ec_signature) is False
    assert verify_signature(RSA_KEY.public_key(), hashed, ECDSA, pkcs1_signature) is False
    assert verify_signature(RSA_KEY.public_key(), hashed, PSS, pkcs1_signature) is False
    assert verify_signature(RSA_KEY.public_key(), hashed, PKCS1, pss_signature) is False


def test_verify_signature_returns_false_on_a_tampered_digest() -> None:
    hashed = hash_bytes(b"artifact", DigestAlgorithm.SHA384)
    tampered = Hashed(hashed.algorithm, bytes([hashed.digest[0] ^ 1]) + hashed.digest[1:])

    assert verify_signature(EC_P256_KEY.public_key(), tampered, ECDSA, ec_sign(hashed)) is False
    for scheme in (PKCS1, PSS):
        signature = rsa_sign(hashed, scheme)
        assert verify_signature(RSA_KEY.public_key(), tampered, scheme, signature) is False


def test_verify_signature_returns_false_for_another_key() -> None:
    hashed = hash_bytes(b"artifact", DigestAlgorithm.SHA256)
    other = ec.generate_private_key(ec.SECP256R1()).public_key()

    assert verify_signature(other, hashed, ECDSA, ec_sign(hashed)) is False


@st.composite
def digests(draw: st.DrawFn) -> Hashed:
    algorithm = draw(st.sampled_from(list(DigestAlgorithm)))
    return Hashed(algorithm, draw(st.binary(min_size=algorithm.size, max_size=algorithm.size)))


@settings(max_examples=25, deadline=None, database=None)
@given(hashed=digests())
def test_a_p256_signature_verifies_and_no_single_bit_flip_does(hashed: Hashed) -> None:
    public_key = EC_P256_KEY.public_key()
    signature = ec_sign(hashed)
    assert verify_signature(public_key, hashed, ECDSA, signature)

    for position in range(8 * len(signature)):
        flipped = bytearray(signature)
        flipped[position // 8] ^= 1 << (position % 8)
        assert verify_signature(public_key, hashed, ECDSA, bytes(flipped)) is False, position
