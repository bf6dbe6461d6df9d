"""RemoteSigner: what a signature format sees of a key that lives on the server.

This module sits below the HTTP client: a RemoteSigner signs through any
:class:`SigningPlane` (``Client`` is the one that speaks HTTP), so it needs
nothing from ``_client`` and ``Client.signer`` can build one without a lazy import.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from cryptography import x509

from signery import protocol as p
from signery.crypto import (
    Hashed,
    PublicKey,
    check_scheme,
    default_digest,
    default_scheme,
    load_public_key_pem,
)


class SigningPlane(Protocol):
    """Where a RemoteSigner sends its digests: the signing call of a Signery
    server (:meth:`signery.client.Client.sign`), or a double in a test."""

    def sign(
        self,
        key: str,
        hashed: Hashed,
        scheme: p.SignatureScheme,
        *,
        client_info: p.ClientInfo | None = None,
        justification: str | None = None,
    ) -> p.SignResponse:
        """Send a digest for ``key`` (an id or a name); the server's answer."""
        ...


@dataclass
class RemoteSigner:
    """A key by name: its algorithm, public key, certificate chain and ``sign(digest)``.

    Formats compute the digest locally and call :meth:`sign`; they never see HTTP.
    It is the :class:`signery.formats.Signer` of a key held by a Signery server.
    """

    client: SigningPlane
    key_name: str
    key_id: str
    algorithm: p.Algorithm
    public_key: PublicKey
    certificate_chain: list[x509.Certificate]
    client_info: p.ClientInfo | None = None
    key_version: int | None = None
    """The key version listed (the one ``public_key`` belongs to); signing uses the
    current version, which the response names."""
    key_created_at: datetime | None = None
    """When ``key_version`` was made (None from servers that do not say): the
    creation time of the key's OpenPGP identity."""
    last_response: p.SignResponse | None = field(default=None, repr=False)
    justification: str | None = None
    """Sent with each signing; shown to approvers when the key requires approval."""

    @classmethod
    def from_summary(
        cls,
        client: SigningPlane,
        summary: p.SigningKeySummary,
        *,
        client_info: p.ClientInfo | None = None,
        justification: str | None = None,
    ) -> RemoteSigner:
        chain = [
            x509.load_pem_x509_certificate(pem.encode("ascii")) for pem in summary.certificate_chain
        ]
        return cls(
            client=client,
            key_name=summary.name,
            key_id=summary.id,
            algorithm=summary.algorithm,
            public_key=load_public_key_pem(summary.public_key_pem),
            certificate_chain=chain,
            client_info=client_info,
            key_version=summary.current_version,
            key_created_at=summary.version_created_at,
            justification=justification,
        )

    @property
    def default_digest(self) -> p.DigestAlgorithm:
        return default_digest(self.algorithm)

    @property
    def default_scheme(self) -> p.SignatureScheme:
        return default_scheme(self.algorithm)

    def sign(self, hashed: Hashed, scheme: p.SignatureScheme | None = None) -> bytes:
        """Sign a digest with the key's current version; the response is kept in
        ``last_response`` (key version, chain). Formats that sign several files at
        once use :meth:`sign_detailed`, which shares no state between calls."""
        response = self.sign_detailed(hashed, scheme)
        self.last_response = response
        return response.signature

    def sign_detailed(
        self, hashed: Hashed, scheme: p.SignatureScheme | None = None
    ) -> p.SignResponse:
        """Sign a digest; the whole answer: signature, key version, certificate chain.
        Safe to call from several threads at once (one access token is shared).

        Raises :class:`~signery.client.ApprovalPending` when the key requires
        approval and the account has no valid grant: nothing was signed; and
        :class:`~signery.errors.SchemeNotAllowed`, before anything is sent, for a
        scheme the key cannot make (RSA-PSS with an EC key)."""
        scheme = scheme or self.default_scheme
        check_scheme(self.algorithm, scheme)
        return self.client.sign(
            self.key_id,
            hashed,
            scheme,
            client_info=self.client_info,
            justification=self.justification,
        )
