"""A new kind of external CA is one Connector subclass and one registration.

``FakeCa`` below is a whole connector kind: a small CA of its own (made with
cryptography, not with Signery's CA) that issues code-signing certificates for the
CSRs it is handed, or holds them, or fails, as the test tells it. Registered on
the server's connector kinds, it certifies keys through the same key lifecycle as
``csr`` and ``est``: nothing in signery.server.keys knows about it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fastapi.testclient import TestClient

from signery import protocol as p
from signery.errors import ConfigurationError, ConnectorFailed, InvalidRequest
from signery.server.ca.models import CaConnectorRow
from signery.server.ca.profiles import CODE_SIGNING, ROOT_CA
from signery.server.connectors.base import (
    ENROLL,
    Answer,
    CertificateOrder,
    Connector,
    Issued,
    Pending,
    StoredSettings,
)
from signery.server.connectors.registry import ConnectorKinds
from signery.server.container import Services
from signery.server.persistence.db import new_id
from tests.support import Api

KIND = "fake"
SUBJECT = {"common_name": "Fake CA Signing", "organization": "Example"}


class _Authority:
    """The fake CA's own root, and what it answers next."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Fake Vendor CA Root")])
        now = datetime.now(UTC)
        self.root = (
            ROOT_CA.apply(
                x509.CertificateBuilder()
                .subject_name(name)
                .issuer_name(name)
                .public_key(self.key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - timedelta(days=1))
                .not_valid_after(now + timedelta(days=3650))
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        self.answer: Callable[[CertificateOrder], Answer] = self.issue
        self.orders: list[tuple[str, CertificateOrder]] = []

    def issue(self, order: CertificateOrder) -> Answer:
        now = datetime.now(UTC)
        leaf = (
            CODE_SIGNING.apply(
                x509.CertificateBuilder()
                .subject_name(order.csr.subject)
                .issuer_name(self.root.subject)
                .public_key(order.csr.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - timedelta(minutes=5))
                .not_valid_after(now + timedelta(days=90))
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(order.csr.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        return Issued((leaf,))

    @property
    def root_pem(self) -> str:
        return self.root.public_bytes(serialization.Encoding.PEM).decode()


AUTHORITY = _Authority()


class FakeCa(Connector):
    """The whole connector kind."""

    kind: ClassVar[str] = KIND
    answers_online: ClassVar[bool] = True

    def submit(self, order: CertificateOrder) -> Answer:
        AUTHORITY.orders.append(("submit", order))
        return AUTHORITY.answer(order)

    def collect(self, order: CertificateOrder) -> Answer:
        AUTHORITY.orders.append(("collect", order))
        return AUTHORITY.answer(order)

    @classmethod
    def configure(cls, given: p.EstSettings | None, kept: StoredSettings) -> StoredSettings:
        if given is not None:
            raise InvalidRequest("a fake connector takes no settings")
        return StoredSettings()


@pytest.fixture(scope="module")
def services(app_client: TestClient) -> Services:
    services: Services = app_client.app.state.services  # type: ignore[attr-defined]
    services.connectors.kinds.register(FakeCa)
    return services


@pytest.fixture(scope="module")
def connector(api: Api, services: Services) -> dict[str, Any]:
    """A connector of the new kind on a fresh TSG (stored as an administrator's
    create would: the wire vocabulary ConnectorKind does not name test kinds)."""
    tsg = api.create_tsg()
    row_id, name = new_id(), api.unique("fake-ca")
    with services.db.write() as s:
        s.add(
            CaConnectorRow(
                id=row_id,
                name=name,
                tsg_id=tsg["id"],
                kind=KIND,
                public=False,
                roots_pem=AUTHORITY.root_pem,
                config_json=json.dumps({}),
                secrets_wrapped=None,
                created_at=datetime.now(UTC),
            )
        )
    return {"id": row_id, "name": name, "tsg_id": tsg["id"]}


@pytest.fixture(autouse=True)
def issue_by_default() -> None:
    AUTHORITY.answer = AUTHORITY.issue
    AUTHORITY.orders.clear()


def create_key(api: Api, connector: dict[str, Any]) -> dict[str, Any]:
    return api.create_key(
        connector["tsg_id"],
        "EC_P256",
        ca="connector",
        ca_connector=connector["name"],
        subject=SUBJECT,
    )


def test_registry_refuses_a_kind_twice_and_names_unknown_ones() -> None:
    kinds = ConnectorKinds()
    assert kinds.names() == ["csr", "est"]
    kinds.register(FakeCa)
    with pytest.raises(ConfigurationError):
        kinds.register(FakeCa)
    with pytest.raises(ConfigurationError, match="acme"):
        kinds.get("acme")


def test_a_new_kind_certifies_a_key_at_once(api: Api, connector: dict[str, Any]) -> None:
    key = create_key(api, connector)

    assert key["status"] == "active"
    assert key["certificate_request"]["status"] == "issued"
    assert [(how, order.purpose) for how, order in AUTHORITY.orders] == [("submit", ENROLL)]
    chain = x509.load_pem_x509_certificates(key["certificate_chain"][0].encode())
    leaf = chain[0]
    assert leaf.issuer == AUTHORITY.root.subject
    assert (
        leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == SUBJECT["common_name"]
    )
    # The key store's public key is what the fake CA certified.
    csr = AUTHORITY.orders[0][1].csr
    assert leaf.public_key() == csr.public_key()


def test_a_held_request_is_collected_later(api: Api, connector: dict[str, Any]) -> None:
    AUTHORITY.answer = lambda order: Pending("held for the vendor's approval")
    key = create_key(api, connector)
    assert key["status"] == "pending"
    assert key["certificate_request"]["error"] == "held for the vendor's approval"

    AUTHORITY.answer = AUTHORITY.issue
    response = api.http.post(f"/api/v1/keys/{key['id']}/enroll", headers=api.admin)
    active = api.ok(response)

    assert active["status"] == "active"
    assert active["certificate_request"]["status"] == "issued"
    assert [how for how, _ in AUTHORITY.orders] == ["submit", "collect"]


def test_a_failing_ca_leaves_the_key_pending_with_the_error(
    api: Api, connector: dict[str, Any]
) -> None:
    def fail(order: CertificateOrder) -> Answer:
        raise ConnectorFailed("the vendor API is down")

    AUTHORITY.answer = fail
    key = create_key(api, connector)

    assert key["status"] == "pending"
    assert key["certificate_request"]["status"] == "pending"
    assert "the vendor API is down" in key["certificate_request"]["error"]
