"""Digest and signature rules shared by the client and the server.

A :class:`Hashed` value (algorithm + digest) is what travels between the parts of
Signery, never a bare ``bytes``: the algorithm is explicit, and a digest of the
wrong length cannot be constructed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils

from signery.errors import DigestLengthMismatch, SchemeNotAllowed, UnsupportedAlgorithm
from signery.protocol import Algorithm, DigestAlgorithm, SignatureScheme

__all__ = [
    "HASH_CHUNK",
    "Hashed",
    "PublicKey",
    "algorithm_of_public_key",
    "check_scheme",
    "default_digest",
    "default_scheme",
    "hash_bytes",
    "hash_file",
    "hash_stream",
    "load_public_key_pem",
    "public_key_fingerprint",
    "public_key_pem",
    "schemes_for",
    "signature_padding",
    "verify_signature",
]

HASH_CHUNK = 1024 * 1024
"""Bytes read at a time when hashing a file: constant memory for any file size."""

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey

_RSA_SCHEMES = (SignatureScheme.RSA_PKCS1V15, SignatureScheme.RSA_PSS)
_EC_SCHEMES = (SignatureScheme.ECDSA,)
_CURVES: dict[str, Algorithm] = {
    "secp256r1": Algorithm.EC_P256,
    "secp384r1": Algorithm.EC_P384,
    "secp521r1": Algorithm.EC_P521,
}
_RSA_SIZES = {2048: Algorithm.RSA_2048, 3072: Algorithm.RSA_3072, 4096: Algorithm.RSA_4096}


@dataclass(frozen=True, slots=True)
class Hashed:
    """A digest together with the algorithm that produced it."""

    algorithm: DigestAlgorithm
    digest: bytes

    def __post_init__(self) -> None:
        if len(self.digest) != self.algorithm.size:
            raise DigestLengthMismatch(
                f"a {self.algorithm.value} digest has {self.algorithm.size} bytes, "
                f"got {len(self.digest)}"
            )

    @property
    def hex(self) -> str:
        return self.digest.hex()

    def hash_algorithm(self) -> hashes.HashAlgorithm:
        return _HASHES[self.algorithm]()


_HASHES: dict[DigestAlgorithm, Callable[[], hashes.HashAlgorithm]] = {
    DigestAlgorithm.SHA256: hashes.SHA256,
    DigestAlgorithm.SHA384: hashes.SHA384,
    DigestAlgorithm.SHA512: hashes.SHA512,
}


def hash_bytes(data: bytes, algorithm: DigestAlgorithm) -> Hashed:
    return Hashed(algorithm, hashlib.new(algorithm.value, data).digest())


def hash_stream(
    stream: BinaryIO,
    algorithm: DigestAlgorithm,
    progress: Callable[[int], None] | None = None,
) -> Hashed:
    """Hash a binary stream in fixed-size chunks (constant memory)."""
    h = hashlib.new(algorithm.value)
    while chunk := stream.read(HASH_CHUNK):
        h.update(chunk)
        if progress is not None:
            progress(len(chunk))
    return Hashed(algorithm, h.digest())


def hash_file(
    path: Path, algorithm: DigestAlgorithm, progress: Callable[[int], None] | None = None
) -> Hashed:
    with path.open("rb") as f:
        return hash_stream(f, algorithm, progress)


def schemes_for(algorithm: Algorithm) -> tuple[SignatureScheme, ...]:
    """Signature schemes that fit a key algorithm."""
    return _RSA_SCHEMES if algorithm.is_rsa else _EC_SCHEMES


def check_scheme(algorithm: Algorithm, scheme: SignatureScheme) -> None:
    if scheme not in schemes_for(algorithm):
        raise SchemeNotAllowed(
            f"scheme {scheme.value} cannot be used with a {algorithm.value} key; "
            f"allowed: {', '.join(s.value for s in schemes_for(algorithm))}"
        )


def default_scheme(algorithm: Algorithm) -> SignatureScheme:
    # PKCS#1 v1.5 rather than PSS for RSA: Authenticode and RFC 3161 verifiers
    # refuse PSS (ECOSYSTEM-FACTS.md), and every verifier accepts v1.5.
    return SignatureScheme.RSA_PKCS1V15 if algorithm.is_rsa else SignatureScheme.ECDSA


def default_digest(algorithm: Algorithm) -> DigestAlgorithm:
    # Match the hash strength to the curve (FIPS 186-5 / NIST SP 800-57 pairing,
    # and what AWS KMS enforces for ECC_NIST_P384 / P521).
    if algorithm is Algorithm.EC_P384:
        return DigestAlgorithm.SHA384
    if algorithm is Algorithm.EC_P521:
        return DigestAlgorithm.SHA512
    return DigestAlgorithm.SHA256


def signature_padding(hashed: Hashed, scheme: SignatureScheme) -> padding.AsymmetricPadding:
    """RSA padding for a scheme. PSS uses MGF1 with the same hash and a salt as long
    as the digest (RFC 8017 §9.1 recommendation, and what AWS KMS produces)."""
    if scheme is SignatureScheme.RSA_PSS:
        return padding.PSS(
            mgf=padding.MGF1(hashed.hash_algorithm()), salt_length=padding.PSS.DIGEST_LENGTH
        )
    return padding.PKCS1v15()


def verify_signature(
    public_key: PublicKey, hashed: Hashed, scheme: SignatureScheme, signature: bytes
) -> bool:
    """True when ``signature`` is a valid signature of ``hashed`` under ``public_key``."""
    prehashed = utils.Prehashed(hashed.hash_algorithm())
    try:
        if isinstance(public_key, rsa.RSAPublicKey):
            if scheme not in _RSA_SCHEMES:
                return False
            public_key.verify(
                signature, hashed.digest, signature_padding(hashed, scheme), prehashed
            )
        elif isinstance(public_key, ec.EllipticCurvePublicKey):
            if scheme is not SignatureScheme.ECDSA:
                return False
            public_key.verify(signature, hashed.digest, ec.ECDSA(prehashed))
        else:  # pragma: no cover - PublicKey is a closed union
            return False
    except (InvalidSignature, ValueError):
        return False
    return True


def algorithm_of_public_key(public_key: object) -> Algorithm:
    """The signing-key algorithm a public key belongs to (RSA 2048/3072/4096, NIST curves)."""
    if isinstance(public_key, rsa.RSAPublicKey):
        try:
            return _RSA_SIZES[public_key.key_size]
        except KeyError:
            raise UnsupportedAlgorithm(f"RSA-{public_key.key_size} is not supported") from None
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        try:
            return _CURVES[public_key.curve.name]
        except KeyError:
            raise UnsupportedAlgorithm(f"curve {public_key.curve.name} is not supported") from None
    raise UnsupportedAlgorithm(f"{type(public_key).__name__} keys are not supported")


def public_key_pem(public_key: PublicKey | ed25519.Ed25519PublicKey) -> str:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def public_key_fingerprint(public_key: PublicKey | ed25519.Ed25519PublicKey) -> str:
    """SHA-256 of the DER SubjectPublicKeyInfo, hex.

    The same as ``openssl pkey -pubin -outform DER | sha256sum``."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def load_public_key_pem(pem: str | bytes) -> PublicKey:
    """Load a signing-key public key (RSA or NIST EC) from PEM."""
    data = pem.encode("ascii") if isinstance(pem, str) else pem
    key = serialization.load_pem_public_key(data)
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise UnsupportedAlgorithm(f"{type(key).__name__} keys cannot be signing keys")
    algorithm_of_public_key(key)
    return key
