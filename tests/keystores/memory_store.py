"""A key store kind that exists only in the tests: keys in a dict of this process.

It proves that a new kind is one module and one registry entry: it implements
the core of :class:`signery.keystores.KeyStore` (generate, sign, public key) and
the ``open_store(settings)`` entry point, nothing else, and no part of Signery
names it. It declares no optional capability, so it also shows how the server
answers for a store without one. Never use it outside tests: its keys live in
plain memory.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ec, utils

from signery.crypto import Hashed, PublicKey
from signery.errors import KeyMaterialMissing
from signery.keystores import GeneratedKey, KeyContext, KeyHandle, KeyStore
from signery.protocol import Algorithm, SignatureScheme


@dataclass(frozen=True, slots=True)
class MemorySettings:
    name: str = "memory"


class MemoryKeyStore(KeyStore):
    kind = "memory"
    supported_algorithms = frozenset({Algorithm.EC_P256})

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._keys: dict[str, ec.EllipticCurvePrivateKey] = {}
        self.closed = False

    def close(self) -> None:
        self._keys.clear()
        self.closed = True

    def _generate(self, algorithm: Algorithm, context: KeyContext) -> GeneratedKey:
        ref = str(uuid.uuid4())
        self._keys[ref] = ec.generate_private_key(ec.SECP256R1())
        return GeneratedKey(
            KeyHandle(self.name, ref, algorithm, context), self._keys[ref].public_key()
        )

    def _sign(self, handle: KeyHandle, hashed: Hashed, scheme: SignatureScheme) -> bytes:
        return self._key(handle).sign(
            hashed.digest, ec.ECDSA(utils.Prehashed(hashed.hash_algorithm()))
        )

    def _public_key(self, handle: KeyHandle) -> PublicKey:
        return self._key(handle).public_key()

    def _key(self, handle: KeyHandle) -> ec.EllipticCurvePrivateKey:
        try:
            return self._keys[handle.ref]
        except KeyError:
            raise KeyMaterialMissing(f"no key {handle.ref}") from None


def open_store(settings: MemorySettings) -> MemoryKeyStore:
    return MemoryKeyStore(settings.name)
