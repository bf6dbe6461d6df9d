"""The key stores a server is configured with, by name."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from signery.errors import UnknownKeyStore
from signery.keystores._base import KeyStore, StoreHealth


class KeyStoreRegistry:
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

    def names(self) -> list[str]:
        return sorted(self._stores)

    def health(self) -> dict[str, StoreHealth]:
        return {name: store.health() for name, store in sorted(self._stores.items())}

    def all(self) -> list[KeyStore]:
        return [self._stores[name] for name in self.names()]

    def close(self) -> None:
        for store in self._stores.values():
            store.close()
