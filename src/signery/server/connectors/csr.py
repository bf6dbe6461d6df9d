"""The ``csr`` connector: an administrator carries the CSR to the CA and the chain back.

Submitting leaves the request pending: the administrator downloads the CSR
(``GET /api/v1/keys/{key}/csr``) and uploads the issued chain
(``POST /api/v1/keys/{key}/certificate``). There is nobody to ask again.
"""

from __future__ import annotations

from signery import protocol as p
from signery.errors import InvalidRequest
from signery.server.connectors.base import (
    Answer,
    CertificateOrder,
    Connector,
    Pending,
    StoredSettings,
)


class CsrConnector(Connector):
    kind = p.ConnectorKind.CSR.value
    answers_online = False

    def submit(self, order: CertificateOrder) -> Answer:
        return Pending()

    @classmethod
    def configure(cls, given: p.EstSettings | None, kept: StoredSettings) -> StoredSettings:
        if given is not None:
            raise InvalidRequest("a csr connector takes no est settings")
        return StoredSettings()
