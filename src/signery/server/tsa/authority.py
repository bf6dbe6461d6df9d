"""The time-stamping authority as the server knows it: its settings, and the
key, certificate and chain loaded from its ``ca_authorities`` row (role ``tsa``)."""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from signery.keystores import (
    KeyContext,
    KeyHandle,
)
from signery.protocol import Algorithm
from signery.server.ca.models import CaAuthorityRow
from signery.server.ca.service import Authority
from signery.server.config import Settings, TsaAccess

TSA = "tsa"
"""The ``ca_authorities.role`` of the time-stamping authority."""


@dataclass(frozen=True, slots=True)
class TsaConfig:
    """The TSA's settings (see ``tsa_*`` in signery.server.config)."""

    policy: str
    accuracy_seconds: int
    rate_limit_per_minute: int
    algorithm: Algorithm
    storage: str
    organization: str
    access: TsaAccess = TsaAccess.PUBLIC
    public_url: str | None = None

    @classmethod
    def of(cls, settings: Settings) -> TsaConfig:
        return cls(
            policy=settings.tsa_policy_oid,
            accuracy_seconds=settings.tsa_accuracy_seconds,
            rate_limit_per_minute=settings.tsa_rate_limit_per_minute,
            algorithm=settings.tsa_algorithm,
            # By default the TSA key lives where the CA keys do: an operator who
            # put the CA in an HSM expects the TSA there too.
            storage=settings.tsa_storage or settings.ca_storage,
            organization=settings.ca_organization,
            access=settings.tsa_access,
            public_url=settings.public_url,
        )


@dataclass(frozen=True, slots=True)
class TimestampAuthority:
    """The TSA as loaded from its row: key handle, certificate and chain."""

    id: str
    tsg_id: str
    tsg_path: str
    algorithm: Algorithm
    handle: KeyHandle
    certificate: x509.Certificate
    issuing: x509.Certificate
    root: x509.Certificate

    @property
    def chain_pem(self) -> str:
        """TSA certificate, issuing CA, root CA (PEM), for verifiers."""
        return "".join(
            c.public_bytes(serialization.Encoding.PEM).decode("ascii")
            for c in (self.certificate, self.issuing, self.root)
        )


def authority_of(row: CaAuthorityRow) -> Authority:
    """The CA authority a ``ca_authorities`` row describes (as BuiltinCa loads it)."""
    algorithm = Algorithm(row.algorithm)
    return Authority(
        role=row.role,
        algorithm=algorithm,
        handle=KeyHandle(row.storage, row.store_ref, algorithm, KeyContext(row.id, 1, row.tsg_id)),
        certificate=x509.load_der_x509_certificate(row.certificate_der),
    )
