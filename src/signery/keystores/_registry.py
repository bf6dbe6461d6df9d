"""The key-store plug-in point: which kinds of store exist, and the stores a server runs.

:data:`BACKENDS` maps each kind (``builtin``, ``aws-kms``, ``pkcs11``) to the
module that implements it. A backend module offers one entry point,
``open_store(settings) -> KeyStore``, and is imported only when a store of its
kind is configured: its SDK (boto3, python-pkcs11) is an optional extra, and a
missing one stops the start with the ``pip install`` line that adds it.
:func:`open_key_stores` opens the configured stores from their settings into a
:class:`KeyStoreRegistry`, the stores by name that the services use.

A new kind of store is one backend module (with its conformance run in
``tests/keystores``) and one entry here; its settings model joins the server's
settings.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType, ModuleType
from typing import TYPE_CHECKING, Final, cast

from signery.errors import ConfigurationError, KeyStoreError, UnknownKeyStore
from signery.keystores._base import Destroyable, HealthChecked, KeyStore, StoreHealth
from signery.keystores._keyring import KeyWrapper

if TYPE_CHECKING:
    from signery.keystores._settings import AwsKmsSettings

# What /readyz and the key-store list say of a store without a health check.
UNCHECKED = StoreHealth(True, "no health check")


@dataclass(frozen=True, slots=True)
class Backend:
    """One kind of key store: where its code lives, how it is enabled and installed."""

    kind: str
    # The backend module; it defines ``open_store(settings) -> KeyStore``.
    module: str
    # The settings that enable it, as an operator writes them ("[aws_kms]").
    section: str
    # The pip extra that installs its SDK; None when it needs nothing optional.
    extra: str | None = None

    def install_hint(self) -> str:
        return f"[{self.section}] is configured: pip install 'signery[{self.extra}]'"

    def load(self) -> ModuleType:
        """The backend module, imported now. A missing SDK is a ConfigurationError
        with the install hint (the ImportError stays attached as its cause)."""
        try:
            return importlib.import_module(self.module)
        except ImportError as e:
            if self.extra is None or e.name == self.module:
                raise  # our own module is missing: a broken installation, not an extra
            raise ConfigurationError(self.install_hint()) from e

    def open_store(self, settings: object) -> KeyStore:
        opener = cast(Callable[[object], KeyStore], self.load().open_store)
        return opener(settings)


BACKENDS: Final[Mapping[str, Backend]] = MappingProxyType(
    {
        backend.kind: backend
        for backend in (
            Backend("builtin", "signery.keystores._builtin", section="database"),
            Backend("aws-kms", "signery.keystores._awskms", section="aws_kms", extra="aws"),
            Backend("pkcs11", "signery.keystores._pkcs11", section="pkcs11", extra="pkcs11"),
        )
    }
)


def open_key_stores(
    configured: Mapping[str, object], *, backends: Mapping[str, Backend] = BACKENDS
) -> KeyStoreRegistry:
    """One store per configured kind (kind -> that backend's settings), in order.

    A store that cannot be opened stops everything with its ConfigurationError,
    after the stores already opened are closed again."""
    stores: list[KeyStore] = []
    try:
        for kind, settings in configured.items():
            backend = backends.get(kind)
            if backend is None:
                raise ConfigurationError(
                    f"no key store of kind {kind!r}; known: {', '.join(sorted(backends))}"
                )
            stores.append(backend.open_store(settings))
    except BaseException:
        for store in stores:
            store.close()
        raise
    return KeyStoreRegistry(stores)


def open_kms_key_wrapper(settings: AwsKmsSettings) -> KeyWrapper:
    """The AWS KMS wrapper of the master key file (``master_key_kms_key_id``)."""
    module = BACKENDS["aws-kms"].load()
    return cast(KeyWrapper, module.open_key_wrapper(settings))


class KeyStoreRegistry:
    """The key stores a server is configured with, by name."""

    def __init__(self, stores: Iterable[KeyStore]) -> None:
        self._stores: Mapping[str, KeyStore] = {s.name: s for s in stores}

    def get(self, name: str) -> KeyStore:
        try:
            return self._stores[name]
        except KeyError:
            raise UnknownKeyStore(
                f"storage {name!r} is not configured on this server; "
                f"available: {', '.join(sorted(self._stores)) or 'none'}"
            ) from None

    def destroyable(self, name: str) -> Destroyable:
        """The store ``name``, for erasing a key pair that must not survive: a store
        that cannot erase keys is an error here, not a silent no-op."""
        store = self.get(name)
        if not isinstance(store, Destroyable):
            raise KeyStoreError(f"key store {name!r} cannot erase keys")
        return store

    def names(self) -> list[str]:
        return sorted(self._stores)

    def health(self) -> dict[str, StoreHealth]:
        return {name: health_of(store) for name, store in sorted(self._stores.items())}

    def all(self) -> list[KeyStore]:
        return [self._stores[name] for name in self.names()]

    def close(self) -> None:
        for store in self._stores.values():
            store.close()


def health_of(store: KeyStore) -> StoreHealth:
    """The store's own health check, or :data:`UNCHECKED` when it has none."""
    return store.health() if isinstance(store, HealthChecked) else UNCHECKED
