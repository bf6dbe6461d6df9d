"""Drive ``cryptography``'s X.509 builders with a key that lives in a key store.

``CertificateBuilder.sign`` and ``CertificateSigningRequestBuilder.sign`` accept
any subclass of ``RSAPrivateKey`` / ``EllipticCurvePrivateKey`` and call only its
``sign(data, algorithm)`` and ``public_key()`` (ECOSYSTEM-FACTS.md). These
adapters hash the to-be-signed bytes locally and send the digest to the store, so
the CA and CSRs sign without ever holding private key bytes. This is not a
documented extension point of ``cryptography``; tests/keystores pin it.
"""

from __future__ import annotations

import hashlib
from typing import Any, NoReturn

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

from signery.crypto import Hashed
from signery.errors import KeyStoreError
from signery.keystores._base import KeyHandle, KeyStore
from signery.protocol import DigestAlgorithm, SignatureScheme

_DIGESTS = {
    "sha256": DigestAlgorithm.SHA256,
    "sha384": DigestAlgorithm.SHA384,
    "sha512": DigestAlgorithm.SHA512,
}


def _hashed(data: bytes, algorithm: hashes.HashAlgorithm | utils.Prehashed) -> Hashed:
    # The X.509 builders pass the to-be-signed bytes and a hash algorithm; they
    # never pass Prehashed, and nothing else should use these adapters.
    if isinstance(algorithm, utils.Prehashed):
        raise KeyStoreError("remote keys sign data, not pre-hashed digests")
    digest_algorithm = _DIGESTS.get(algorithm.name)
    if digest_algorithm is None:
        raise KeyStoreError(f"hash {algorithm.name} is not supported by key stores")
    return Hashed(digest_algorithm, hashlib.new(algorithm.name, data).digest())


def _refuse(*_: Any) -> NoReturn:
    raise KeyStoreError("private key material never leaves its key store")


class RemoteEcKey(ec.EllipticCurvePrivateKey):
    def __init__(
        self, store: KeyStore, handle: KeyHandle, public_key: ec.EllipticCurvePublicKey
    ) -> None:
        self._store = store
        self._handle = handle
        self._public = public_key

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public.curve

    @property
    def key_size(self) -> int:
        return self._public.key_size

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    def sign(
        self,
        data: bytes | bytearray | memoryview,
        signature_algorithm: ec.EllipticCurveSignatureAlgorithm,
    ) -> bytes:
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise KeyStoreError("only ECDSA signatures are supported")
        hashed = _hashed(bytes(data), signature_algorithm.algorithm)
        return self._store.sign(self._handle, hashed, SignatureScheme.ECDSA)

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        _refuse()

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        _refuse()

    def private_bytes(
        self,
        encoding: serialization.Encoding,
        format: serialization.PrivateFormat,
        encryption_algorithm: serialization.KeySerializationEncryption,
    ) -> bytes:
        _refuse()

    def __copy__(self) -> RemoteEcKey:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> RemoteEcKey:
        return self


class RemoteRsaKey(rsa.RSAPrivateKey):
    def __init__(self, store: KeyStore, handle: KeyHandle, public_key: rsa.RSAPublicKey) -> None:
        self._store = store
        self._handle = handle
        self._public = public_key

    @property
    def key_size(self) -> int:
        return self._public.key_size

    def public_key(self) -> rsa.RSAPublicKey:
        return self._public

    def sign(
        self,
        data: bytes | bytearray | memoryview,
        padding: padding.AsymmetricPadding,
        algorithm: hashes.HashAlgorithm | utils.Prehashed | utils.NoDigestInfo,
    ) -> bytes:
        from cryptography.hazmat.primitives.asymmetric import padding as _padding

        if isinstance(padding, _padding.PSS):
            # The store signs PSS with MGF1 over the same hash and a salt as long as
            # the digest; the builder writes the caller's parameters into the
            # certificate, so anything else would yield a signature that never verifies.
            hash_name = getattr(algorithm, "name", None)
            mgf = padding.mgf
            salt = padding._salt_length
            if (
                not isinstance(mgf, _padding.MGF1)
                or mgf._algorithm.name != hash_name
                or not (
                    salt is _padding.PSS.DIGEST_LENGTH
                    or salt == getattr(algorithm, "digest_size", -1)
                )
            ):
                raise KeyStoreError(
                    "key stores sign RSA-PSS with MGF1(same hash) and salt = digest length only"
                )
            scheme = SignatureScheme.RSA_PSS
        elif isinstance(padding, _padding.PKCS1v15):
            scheme = SignatureScheme.RSA_PKCS1V15
        else:
            raise KeyStoreError(f"RSA padding {padding.name} is not supported")
        if isinstance(algorithm, utils.NoDigestInfo):
            raise KeyStoreError("remote keys sign data with a DigestInfo")
        return self._store.sign(self._handle, _hashed(bytes(data), algorithm), scheme)

    def decrypt(self, ciphertext: bytes, padding: padding.AsymmetricPadding) -> bytes:
        _refuse()

    def private_numbers(self) -> rsa.RSAPrivateNumbers:
        _refuse()

    def private_bytes(
        self,
        encoding: serialization.Encoding,
        format: serialization.PrivateFormat,
        encryption_algorithm: serialization.KeySerializationEncryption,
    ) -> bytes:
        _refuse()

    def __copy__(self) -> RemoteRsaKey:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> RemoteRsaKey:
        return self


def remote_private_key(
    store: KeyStore, handle: KeyHandle, public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey
) -> RemoteRsaKey | RemoteEcKey:
    """A ``cryptography`` private-key object whose every signature is made by ``store``."""
    if isinstance(public_key, rsa.RSAPublicKey):
        return RemoteRsaKey(store, handle, public_key)
    return RemoteEcKey(store, handle, public_key)
