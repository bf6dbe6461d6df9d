"""The key-store interface: generate, sign a digest, read a public key. Never export.

The contract lives here (securesystemslib ``Signer`` style): the public methods
validate their inputs and keep foreign exceptions from escaping, and each backend
implements only the private ``_generate`` / ``_sign`` / ``_public_key``.

Everything else a store may do is an optional capability, a ``Protocol`` that
callers check with ``isinstance`` before they rely on it: :class:`Destroyable`
(erase a key pair), :class:`DestroyCancellable` (undo an erasure still pending),
:class:`HealthChecked` (report whether the store answers). A backend gets each
one, with the same validate-and-wrap contract, from :class:`DestroyableKeyStore`,
:class:`CancellableKeyStore` and :class:`HealthCheckedKeyStore`.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Protocol, TypeVar, runtime_checkable

from signery.crypto import Hashed, PublicKey, check_scheme
from signery.errors import (
    DigestNotAllowed,
    KeyStoreError,
    SigneryError,
    UnsupportedAlgorithm,
)
from signery.protocol import Algorithm, DigestAlgorithm, SignatureScheme

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class KeyContext:
    """Who a key pair belongs to, as the caller's own records say.

    Key stores bind this into the stored material (the built-in store uses it
    as AES-GCM associated data), so material moved to another key's row or
    another TSG does not decrypt.
    """

    key_id: str
    version: int
    tsg_id: str
    # A human name for stores that label their objects (KMS alias and tags,
    # PKCS#11 CKA_LABEL). Not part of the key's identity nor of any AAD.
    label: str = field(default="", compare=False)

    def associated_data(self, purpose: str) -> bytes:
        # JSON with sorted keys: an unambiguous, canonical encoding of the fields.
        return json.dumps(
            {
                "purpose": purpose,
                "key_id": self.key_id,
                "version": self.version,
                "tsg_id": self.tsg_id,
            },
            sort_keys=True,
            separators=(",", ":"),
        ).encode()


@dataclass(frozen=True, slots=True)
class KeyHandle:
    """A reference to a key pair inside a store. Holds no key material."""

    store: str
    ref: str
    algorithm: Algorithm
    context: KeyContext


@dataclass(frozen=True, slots=True)
class GeneratedKey:
    handle: KeyHandle
    public_key: PublicKey


@dataclass(frozen=True, slots=True)
class StoreHealth:
    ok: bool
    detail: str


class KeyStore(ABC):
    """One place where private keys live. Private key material never leaves it."""

    kind: ClassVar[str]
    supported_algorithms: ClassVar[frozenset[Algorithm]]

    def __init__(self, name: str) -> None:
        self.name = name

    # ------------------------------------------------------------ public contract

    def generate(self, algorithm: Algorithm, context: KeyContext) -> GeneratedKey:
        """Create a new key pair inside the store and return its handle and public key."""
        if algorithm not in self.supported_algorithms:
            raise UnsupportedAlgorithm(
                f"key store {self.name!r} cannot hold {str(algorithm)[:32]} keys"
            )
        return self._guard(lambda: self._generate(algorithm, context))

    def sign(self, handle: KeyHandle, hashed: Hashed, scheme: SignatureScheme) -> bytes:
        """Sign a digest. ``hashed`` already has the right length (see :class:`Hashed`)."""
        self._check_handle(handle)
        check_scheme(handle.algorithm, scheme)
        allowed = self.digests_for(handle.algorithm)
        if hashed.algorithm not in allowed:
            # Refused here, before any call to the store (AWS KMS ties the hash to
            # the curve: P-384 signs only SHA-384 digests, P-521 only SHA-512).
            raise DigestNotAllowed(
                f"{self.kind} signs {handle.algorithm.value} digests with "
                f"{', '.join(d.value for d in allowed)} only"
            )
        return self._guard(lambda: self._sign(handle, hashed, scheme))

    def digests_for(self, algorithm: Algorithm) -> tuple[DigestAlgorithm, ...]:
        """Digest algorithms this store signs with a key of ``algorithm``."""
        return tuple(DigestAlgorithm)

    def public_key(self, handle: KeyHandle) -> PublicKey:
        self._check_handle(handle)
        return self._guard(lambda: self._public_key(handle))

    def close(self) -> None:  # noqa: B027 - optional hook: most stores hold nothing open
        """Release connections and sessions (server shutdown)."""

    def signs_inline(self, algorithm: Algorithm) -> bool:
        """True when ``sign`` never waits on a network or a device, so the caller
        may run it on the event loop instead of hopping to a worker thread.

        It does not promise that signing is quick: a store answering True blocks
        the loop for its CPU work (an RSA-4096 signature takes a few milliseconds)
        and for a read of the server's own database on the first signing of a key
        in a process. The built-in store answers True for every algorithm because
        a thread hop costs more than it saves there (measured with ``make bench``).
        Stores that call out (AWS KMS, a PKCS#11 library) answer False, which is
        also the safe default for a new store.
        """
        return False

    # ------------------------------------------------------------ backend hooks

    @abstractmethod
    def _generate(self, algorithm: Algorithm, context: KeyContext) -> GeneratedKey: ...

    @abstractmethod
    def _sign(self, handle: KeyHandle, hashed: Hashed, scheme: SignatureScheme) -> bytes: ...

    @abstractmethod
    def _public_key(self, handle: KeyHandle) -> PublicKey: ...

    # ------------------------------------------------------------ helpers

    def _check_handle(self, handle: KeyHandle) -> None:
        if handle.store != self.name:
            raise KeyStoreError(f"handle belongs to key store {handle.store!r}, not {self.name!r}")

    def _guard(self, op: Callable[[], T]) -> T:
        try:
            return op()
        except SigneryError:
            raise
        except Exception as e:
            # Backends translate the errors they expect; anything else is reported
            # by type only, because a foreign message could quote key material.
            raise KeyStoreError(f"key store {self.name!r} failed: {type(e).__name__}") from e


# ---------------------------------------------------------------- optional capabilities


@runtime_checkable
class Destroyable(Protocol):
    """A store that can erase a key pair."""

    def destroy(self, handle: KeyHandle) -> None:
        """Erase the key pair. Signing with the handle through this store afterwards
        raises KeyMaterialMissing; stores in other processes may keep a decrypted
        copy for a bounded time (see each backend), which is why callers check the
        key's status before every signing."""


@runtime_checkable
class DestroyCancellable(Protocol):
    """A store whose erasure is scheduled, and can be undone until it happens."""

    def cancel_destroy(self, handle: KeyHandle) -> None:
        """Undo a destroy() whose erasure is still pending."""


@runtime_checkable
class HealthChecked(Protocol):
    """A store that can tell whether it answers (``/readyz``, the key-store list)."""

    def health(self) -> StoreHealth:
        """Whether the store is usable now; never raises."""


class DestroyableKeyStore(KeyStore):
    """A key store with :class:`Destroyable`: the backend implements ``_destroy``."""

    def destroy(self, handle: KeyHandle) -> None:
        """Erase the key pair (see :meth:`Destroyable.destroy`)."""
        self._check_handle(handle)
        self._guard(lambda: self._destroy(handle))

    @abstractmethod
    def _destroy(self, handle: KeyHandle) -> None: ...


class CancellableKeyStore(DestroyableKeyStore):
    """A key store with :class:`DestroyCancellable`: ``_destroy`` schedules the
    erasure, ``_cancel_destroy`` undoes it."""

    def cancel_destroy(self, handle: KeyHandle) -> None:
        """Undo a destroy() whose erasure is still pending."""
        self._check_handle(handle)
        self._guard(lambda: self._cancel_destroy(handle))

    @abstractmethod
    def _cancel_destroy(self, handle: KeyHandle) -> None: ...


class HealthCheckedKeyStore(KeyStore):
    """A key store with :class:`HealthChecked`: the backend implements ``_health``."""

    def health(self) -> StoreHealth:
        """Whether the store is usable now. A Signery error of the check is an
        unhealthy answer (by its code), not an exception."""
        try:
            return self._health()
        except SigneryError as e:
            return StoreHealth(False, e.code)

    @abstractmethod
    def _health(self) -> StoreHealth: ...
