"""The external CA interface: what every kind of CA connector does, and nothing more.

A signing key certified by an external CA has a CSR made and signed through its
key store (signery.server.keys.requests). A :class:`Connector` takes that CSR to
its CA: :meth:`Connector.submit` when the request is made, :meth:`Connector.collect`
when an administrator asks again. Each answers :class:`Issued` (the chain the CA
sent, which the caller checks against the connector's trust anchors before
anything changes) or :class:`Pending` (the CA holds the request: for approval, or
until an administrator uploads the chain). A failure raises a SigneryError.

One module per kind (``csr``, ``est``), each a Connector subclass that also
validates its own stored settings and describes them to the API; the registry
(signery.server.connectors.registry) maps a kind to its class. A new CA (ACME, a
vendor API, Microsoft AD CS) is one module and one registry entry: the key
lifecycle never branches on the kind.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from cryptography import x509

from signery import protocol as p
from signery.errors import ConnectorRequiresHardwareKey

# The rule of the product Signery replaces: a key certified by a public CA must
# live in hardware. Store kinds, not store names (a server may name them freely).
HARDWARE_STORE_KINDS = frozenset({"aws-kms", "pkcs11"})

# Why a certificate is requested (certificate_requests.purpose, audit details).
ENROLL = "enroll"
RENEW = "renew"
REISSUE = "reissue"
ROTATE = "rotate"


@dataclass(frozen=True, slots=True)
class CertificateOrder:
    """What a CA is asked for: a CSR signed through the key store, and why
    (``ENROLL``, ``RENEW``, ``REISSUE`` or ``ROTATE``)."""

    csr: x509.CertificateSigningRequest
    purpose: str


@dataclass(frozen=True, slots=True)
class Issued:
    """The CA issued: the certificates it sent (leaf and any intermediates, in any
    order). Never trusted as they are: the caller builds and checks the chain."""

    certificates: tuple[x509.Certificate, ...]


@dataclass(frozen=True, slots=True)
class Pending:
    """The CA holds the request. ``note`` (when given) is shown on the request."""

    note: str | None = None


Answer = Issued | Pending


@dataclass(frozen=True, slots=True)
class StoredSettings:
    """A connector's kind-specific settings as stored: ``config`` in clear (JSON),
    ``secrets`` encrypted under the master key and never returned by the API."""

    config: dict[str, Any] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ConnectorRecord:
    """What every connector has, whatever its kind."""

    id: str
    name: str
    tsg_id: str
    public: bool
    roots: tuple[x509.Certificate, ...]  # the trust anchors every issued chain must reach


class Connector(ABC):
    """A configured external CA, ready for use.

    Subclasses set ``kind`` (the ``ca_connectors.kind`` they serve) and
    ``answers_online`` (False when only an administrator brings the chain back, so
    asking the CA again is refused), and implement :meth:`submit` and
    :meth:`configure`."""

    kind: ClassVar[str]
    answers_online: ClassVar[bool]

    def __init__(self, record: ConnectorRecord, settings: StoredSettings) -> None:
        self.record = record
        self.settings = settings

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def roots(self) -> tuple[x509.Certificate, ...]:
        return self.record.roots

    def check_store(self, store_kind: str) -> None:
        """Refuse a key in a software store for a public CA."""
        if self.record.public and store_kind not in HARDWARE_STORE_KINDS:
            raise ConnectorRequiresHardwareKey(
                f"CA connector {self.name!r} is public: its keys must be in a hardware store "
                f"({', '.join(sorted(HARDWARE_STORE_KINDS))}), not {store_kind}"
            )

    # ------------------------------------------------------------ the CA

    @abstractmethod
    def submit(self, order: CertificateOrder) -> Answer:
        """Hand a new request to the CA."""

    def collect(self, order: CertificateOrder) -> Answer:
        """Ask the CA again about a pending request (only when ``answers_online``).
        By default the request is submitted again, as EST does (RFC 7030 §4.2.3)."""
        return self.submit(order)

    # ------------------------------------------------------------ settings

    @classmethod
    @abstractmethod
    def configure(cls, given: p.EstSettings | None, kept: StoredSettings) -> StoredSettings:
        """The settings to store from a create or update request: ``given`` is the
        request's settings (None: none given), ``kept`` what is stored already
        (empty on create). Raises InvalidRequest for settings this kind refuses."""

    @classmethod
    def describe(cls, settings: StoredSettings) -> p.EstSettingsInfo | None:
        """The settings as the API shows them (secrets only as "is set")."""
        return None
