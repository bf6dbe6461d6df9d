"""The kinds of external CA a server talks to, each a Connector subclass, by kind.

Adding a CA is one module (a Connector subclass) and one entry in ``BUILTIN_KINDS``
(and its name in the wire vocabulary ``signery.protocol.ConnectorKind`` for the
API to accept it). A stored connector of a kind this server does not know is a
configuration error, never silently ignored.
"""

from __future__ import annotations

from collections.abc import Iterable

from signery.errors import ConfigurationError
from signery.server.connectors.base import Connector
from signery.server.connectors.csr import CsrConnector
from signery.server.connectors.est import EstConnector

BUILTIN_KINDS: tuple[type[Connector], ...] = (CsrConnector, EstConnector)


class ConnectorKinds:
    """Connector classes by kind."""

    def __init__(self, kinds: Iterable[type[Connector]] = BUILTIN_KINDS) -> None:
        self._kinds: dict[str, type[Connector]] = {}
        for kind in kinds:
            self.register(kind)

    def register(self, kind: type[Connector]) -> None:
        """Add a kind (at start-up); a kind registered twice is refused."""
        if kind.kind in self._kinds:
            raise ConfigurationError(f"CA connector kind {kind.kind!r} is registered twice")
        self._kinds[kind.kind] = kind

    def get(self, kind: str) -> type[Connector]:
        try:
            return self._kinds[kind]
        except KeyError:
            raise ConfigurationError(
                f"CA connector kind {kind!r} is not known to this server; "
                f"known: {', '.join(sorted(self._kinds))}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._kinds)
