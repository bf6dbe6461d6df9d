"""Rotation of keys certified through an external CA connector.

The new version is generated in the key's store and waits ``pending`` (not
current) with a CSR signed through the store; the current version keeps signing
until the new version's certificate is installed (uploaded for a ``csr``
connector, enrolled at once for ``est``), which makes the new version current and
archives the previous one in one transaction. An openssl-run CA issues; the
signatures are verified with cryptography against each version's public key.
The background scheduler is off here: the tests run it themselves.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from signery.keystores._builtin import BuiltinKeyMaterialRow
from signery.server.persistence.db import make_engine
from tests.server.ca.pki import TLS_SERVER_EXT, TestCa, make_ca, tls_pair
from tests.server.connectors.test_csr_connector import (
    connector_key,
    create_connector,
    download_csr,
    upload,
)
from tests.server.connectors.test_est_server import Tls, tls_env
from tests.server.keys.lifecycle_helpers import (
    action,
    builtin_material,
    events_of,
    key_of,
    services_of,
    sign,
    store_refs,
    verifies,
    version,
)
from tests.support import (
    Api,
    FakeClock,
    Installation,
    ServerProcess,
    inserts_fail,
    new_installation,
    running_server,
)

DIGEST = hashlib.sha256(b"release 2.0.0, signed across a rotation").digest()
DAY = 86400
SPKI = (serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def installation(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Installation]:
    data_dir = tmp_path_factory.mktemp(f"signery-crot-{request.param}")
    with new_installation(request.param, data_dir, scheduler_interval_seconds=0) as inst:
        yield inst


@pytest.fixture(scope="module")
def tsg(api: Api) -> dict[str, Any]:
    return api.create_tsg()


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> TestCa:
    return make_ca(tmp_path_factory.mktemp("crot-pki"), "Rotation Test Root")


@pytest.fixture(scope="module")
def connector(api: Api, tsg: dict[str, Any], root: TestCa) -> dict[str, Any]:
    return create_connector(api, tsg["id"], root.pem)


def active_key(
    api: Api, tsg: dict[str, Any], connector: dict[str, Any], root: TestCa, work: Path
) -> dict[str, Any]:
    key = connector_key(api, tsg["id"], connector)
    leaf = root.issue(download_csr(api, key, work / "v1.csr"), work / "v1.pem")
    active = api.ok(upload(api, key, leaf.read_text()))
    assert active["status"] == "active"
    return active  # type: ignore[no-any-return]


def refused(response: Any, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["code"] == code, response.text


def material_rows(installation: Installation) -> int:
    engine = make_engine(installation.settings.resolved_database_url, pool_size=1)
    try:
        with engine.connect() as conn:
            return int(
                conn.execute(select(func.count()).select_from(BuiltinKeyMaterialRow)).scalar_one()
            )
    finally:
        engine.dispose()


# ------------------------------------------------------------------ csr connector


def test_a_csr_connector_key_rotates_when_the_new_certificate_is_uploaded(
    api: Api,
    tsg: dict[str, Any],
    connector: dict[str, Any],
    root: TestCa,
    tmp_path: Path,
) -> None:
    key = active_key(api, tsg, connector, root, tmp_path)
    v1_chain = key["certificate_chain"]
    token = api.access_token(api.create_account(tsg["id"]))
    before = api.ok(sign(api, token, key["name"], DIGEST))
    assert before["key_version"] == 1

    seq = api.last_seq()
    rotating = api.ok(action(api, key["id"], "rotate"))
    assert rotating["current_version"] == 1, "v1 signs until v2's certificate is installed"
    assert rotating["status"] == "active"
    assert rotating["certificate_chain"] == v1_chain
    assert [(v["version"], v["status"]) for v in rotating["versions"]] == [
        (1, "active"),
        (2, "pending"),
    ]
    assert version(rotating, 2)["certificate"] is None
    request = rotating["certificate_request"]
    assert (request["key_version"], request["purpose"], request["status"]) == (
        2,
        "rotate",
        "pending",
    )

    # Still v1, verifiable under v1's public key only.
    signed = api.ok(sign(api, token, key["name"], DIGEST))
    assert signed["key_version"] == 1
    assert signed["certificate_chain"] == v1_chain
    signature = base64.b64decode(signed["signature"])
    assert verifies(version(rotating, 1)["public_key_pem"], signature, DIGEST)
    assert not verifies(version(rotating, 2)["public_key_pem"], signature, DIGEST)

    # The CSR is v2's public key, signed by v2's private key in the store.
    csr_path = download_csr(api, key, tmp_path / "v2.csr")
    csr = x509.load_pem_x509_csr(csr_path.read_bytes())
    assert csr.is_signature_valid
    assert csr.public_key().public_bytes(*SPKI).decode() == version(rotating, 2)["public_key_pem"]
    assert csr.subject.rfc4514_string() == "C=DE,O=Example,CN=Example Release Signing"

    # One rotation at a time; renew / reissue of v1 wait too.
    refused(action(api, key["id"], "rotate"), 409, "rotation_pending")
    refused(action(api, key["id"], "renew"), 409, "rotation_pending")
    refused(
        action(api, key["id"], "reissue", {"subject": {"common_name": "Other"}}),
        409,
        "rotation_pending",
    )

    # A chain for v1's key is not an answer to v2's request.
    stale = root.issue(tmp_path / "v1.csr", tmp_path / "v1-again.pem")
    refused(upload(api, key, stale.read_text()), 400, "certificate_key_mismatch")
    assert key_of(api, key["id"])["current_version"] == 1

    leaf = root.issue(csr_path, tmp_path / "v2.pem")
    rotated = api.ok(upload(api, key, leaf.read_text()))
    assert rotated["current_version"] == 2
    assert rotated["status"] == "active"
    v1, v2 = version(rotated, 1), version(rotated, 2)
    assert v2["status"] == "active"
    assert v1["status"] == "archived"
    assert v1["archived_at"] is not None
    assert v1["certificate_chain"] == v1_chain, "the old chain stays listed for verifiers"
    assert rotated["certificate_chain"][0] == leaf.read_text()
    assert rotated["public_key_pem"] == v2["public_key_pem"]
    assert rotated["certificate_request"]["status"] == "issued"
    assert rotated["certificate_request"]["key_version"] == 2

    after = api.ok(sign(api, token, key["name"], DIGEST))
    assert after["key_version"] == 2
    assert after["certificate_chain"] == rotated["certificate_chain"]
    signature = base64.b64decode(after["signature"])
    assert verifies(v2["public_key_pem"], signature, DIGEST)
    assert not verifies(v1["public_key_pem"], signature, DIGEST)
    gone = api.http.get(f"/api/v1/keys/{key['id']}/csr", headers=api.admin)
    refused(gone, 404, "certificate_request_not_found")

    (requested,) = events_of(api, seq, "key.rotation.requested")
    assert requested["key_version"] == 2
    assert requested["details"]["previous_version"] == 1
    assert requested["details"]["version"] == 2
    assert requested["details"]["certificate_request"] == request["id"]
    (asked,) = events_of(api, seq, "key.certificate.requested")
    assert (asked["key_version"], asked["details"]["purpose"]) == (2, "rotate")
    (received,) = events_of(api, seq, "key.certificate.received")
    assert received["details"]["purpose"] == "rotate"
    assert received["details"]["key_activated"] is False
    (done,) = events_of(api, seq, "key.rotated")
    serial = format(x509.load_pem_x509_certificate(leaf.read_bytes()).serial_number, "x")
    assert done["key_version"] == 2
    assert done["details"]["previous_version"] == 1
    assert done["details"]["version"] == 2
    assert done["details"]["certificate_serial"] == serial
    assert done["details"]["purpose"] == "rotate"

    # The next rotation may start now.
    again = api.ok(action(api, key["id"], "rotate"))
    assert again["current_version"] == 2
    assert version(again, 3)["status"] == "pending"


def test_a_pending_renewal_is_superseded_by_a_rotation(
    api: Api, tsg: dict[str, Any], connector: dict[str, Any], root: TestCa, tmp_path: Path
) -> None:
    key = active_key(api, tsg, connector, root, tmp_path)
    renewal = api.ok(action(api, key["id"], "renew"))["certificate_request"]
    rotating = api.ok(action(api, key["id"], "rotate"))
    assert rotating["certificate_request"]["purpose"] == "rotate"
    assert rotating["certificate_request"]["id"] != renewal["id"]
    # Only the rotation's request can be answered: a chain for v1 is refused.
    renewed = root.issue(tmp_path / "v1.csr", tmp_path / "renewed.pem")
    refused(upload(api, key, renewed.read_text()), 400, "certificate_key_mismatch")


def test_a_pending_rotation_can_be_cancelled_and_its_certificate_is_refused(
    api: Api,
    installation: Installation,
    tsg: dict[str, Any],
    connector: dict[str, Any],
    root: TestCa,
    tmp_path: Path,
) -> None:
    """The CA never answers: the rotation is cancelled, the pending version's key
    pair is erased, the current version signs on, and a certificate that arrives
    late for the cancelled version is refused."""
    key = active_key(api, tsg, connector, root, tmp_path)
    refused(action(api, key["id"], "cancel-rotation"), 409, "conflict")
    api.ok(action(api, key["id"], "rotate"))
    download_csr(api, key, tmp_path / "v2.csr")
    v2_ref = store_refs(installation, key["id"])[1]
    assert builtin_material(installation, [v2_ref]) == 1

    seq = api.last_seq()
    cancelled = api.ok(action(api, key["id"], "cancel-rotation"))
    assert cancelled["current_version"] == 1
    assert [(v["version"], v["status"]) for v in cancelled["versions"]] == [
        (1, "active"),
        (2, "destroyed"),
    ]
    assert version(cancelled, 2)["destroyed_at"] is not None
    assert builtin_material(installation, [v2_ref]) == 0, "the pending key pair is erased"
    (event,) = events_of(api, seq, "key.rotation.cancelled")
    assert event["details"]["version"] == 2
    assert len(event["details"]["certificate_requests"]) == 1

    token = api.access_token(api.create_account(tsg["id"]))
    signed = api.ok(sign(api, token, key["name"], DIGEST))
    assert signed["key_version"] == 1
    assert verifies(
        version(cancelled, 1)["public_key_pem"], base64.b64decode(signed["signature"]), DIGEST
    )
    # The late certificate for version 2 completes nothing.
    late = root.issue(tmp_path / "v2.csr", tmp_path / "v2.pem")
    refused(upload(api, key, late.read_text()), 409, "no_pending_certificate_request")
    # And the key rotates again, to a new version.
    again = api.ok(action(api, key["id"], "rotate"))
    assert version(again, 3)["status"] == "pending"
    assert again["current_version"] == 1


def test_a_rotation_that_fails_leaves_no_key_material(
    api: Api,
    installation: Installation,
    tsg: dict[str, Any],
    connector: dict[str, Any],
    root: TestCa,
    tmp_path: Path,
) -> None:
    """Regression guard: the key pair generated for the pending version is destroyed
    again when the version row cannot be recorded (no orphan material, no version)."""
    key = active_key(api, tsg, connector, root, tmp_path)
    before = material_rows(installation)
    seq = api.last_seq()
    with inserts_fail(installation, "key_versions"):
        failed = action(api, key["id"], "rotate")
    assert failed.status_code >= 500, failed.text
    assert material_rows(installation) == before
    after = key_of(api, key["id"])
    assert [(v["version"], v["status"]) for v in after["versions"]] == [(1, "active")]
    assert after["certificate_request"]["purpose"] == "enroll"
    assert not events_of(api, seq, "key.rotation.requested")
    assert not events_of(api, seq, "key.certificate.requested")
    # Nothing is left pending: the rotation can simply be asked for again.
    assert version(api.ok(action(api, key["id"], "rotate")), 2)["status"] == "pending"


def test_destruction_erases_a_pending_version_too(
    api: Api,
    installation: Installation,
    app_client: TestClient,
    clock: FakeClock,
    tsg: dict[str, Any],
    connector: dict[str, Any],
    root: TestCa,
    tmp_path: Path,
) -> None:
    key = active_key(api, tsg, connector, root, tmp_path)
    api.ok(action(api, key["id"], "rotate"))
    refs = store_refs(installation, key["id"])
    assert len(refs) == 2
    assert builtin_material(installation, refs) == 2
    csr = download_csr(api, key, tmp_path / "v2.csr")
    api.ok(action(api, key["id"], "destroy", {"after_days": 7}))
    # A key on its way to destruction does not complete its rotation.
    leaf = root.issue(csr, tmp_path / "v2.pem")
    refused(upload(api, key, leaf.read_text()), 409, "key_destruction_scheduled")
    assert key_of(api, key["id"])["current_version"] == 1

    clock.advance(8 * DAY)
    assert services_of(app_client).scheduler.run_due()["key_destruction"]["done"] == 1
    assert builtin_material(installation, refs) == 0
    destroyed = key_of(api, key["id"])
    assert [(v["version"], v["status"]) for v in destroyed["versions"]] == [
        (1, "destroyed"),
        (2, "destroyed"),
    ]


def test_a_scheduled_rotation_requests_the_new_certificate(
    api: Api,
    app_client: TestClient,
    clock: FakeClock,
    tsg: dict[str, Any],
    connector: dict[str, Any],
    root: TestCa,
    tmp_path: Path,
) -> None:
    key = active_key(api, tsg, connector, root, tmp_path)
    api.ok(
        api.http.put(
            f"/api/v1/keys/{key['id']}/rotation",
            json={"rotation_period_days": 30},
            headers=api.admin,
        )
    )
    scheduler = services_of(app_client).scheduler
    clock.advance(30 * DAY + 60)
    seq = api.last_seq()
    assert scheduler.run_due()["key_rotation"] == {"done": 1, "failed": 0}
    rotating = key_of(api, key["id"])
    assert rotating["current_version"] == 1
    assert version(rotating, 2)["status"] == "pending"
    assert rotating["certificate_request"]["purpose"] == "rotate"
    (requested,) = events_of(api, seq, "key.rotation.requested")
    assert requested["principal"]["type"] == "system"
    # The schedule moved on: a rotation waiting for its CA is not retried each run.
    clock.advance(11 * 60)
    assert scheduler.run_due()["key_rotation"] == {"done": 0, "failed": 0}
    assert not events_of(api, seq, "key.rotation.failed")

    leaf = root.issue(download_csr(api, key, tmp_path / "v2.csr"), tmp_path / "v2.pem", days=60)
    rotated = api.ok(upload(api, key, leaf.read_text()))
    assert rotated["current_version"] == 2
    assert version(rotated, 1)["status"] == "archived"


# ------------------------------------------------------------------ est connector


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    base = tmp_path_factory.mktemp("crot-tls")
    ca = make_ca(base / "tls-ca", "Rotation Test TLS CA")
    cert, key = tls_pair(ca, base, "server", TLS_SERVER_EXT)
    return Tls(ca, cert, key)


@pytest.fixture(scope="module")
def ca_b(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installation]:
    """Another installation whose built-in CA plays the external CA (its own
    database: the certificates it records are not the key's)."""
    with new_installation("sqlite", tmp_path_factory.mktemp("crot-ca-b")) as inst:
        yield inst


@pytest.fixture(scope="module")
def est_server(ca_b: Installation, tls: Tls) -> Iterator[ServerProcess]:
    """A real `signery serve` with TLS answering EST (the existing EST server setup)."""
    with running_server(ca_b, node="est-b", verify=tls.context(), **tls_env(tls)) as proc:
        yield proc


def test_an_est_connector_key_rotates_at_once(
    api: Api,
    ca_b: Installation,
    tsg: dict[str, Any],
    est_server: ServerProcess,
    tls: Tls,
) -> None:
    chain = httpx.get(f"{est_server.url}/api/v1/ca/chain", verify=tls.context()).text
    ca_root = x509.load_pem_x509_certificates(chain.encode())[-1]
    assert ca_b.init.admin_username
    assert ca_b.init.admin_password
    est = api.ok(
        api.http.post(
            "/api/v1/ca-connectors",
            json={
                "name": api.unique("est"),
                "tsg_id": tsg["id"],
                "kind": "est",
                "roots_pem": ca_root.public_bytes(serialization.Encoding.PEM).decode(),
                "est": {
                    "url": f"{est_server.url}/.well-known/est",
                    "username": ca_b.init.admin_username,
                    "password": ca_b.init.admin_password,
                    "tls_ca_pem": tls.ca.pem,
                    "timeout_seconds": 20,
                },
            },
            headers=api.admin,
        ),
        201,
    )
    key = connector_key(api, tsg["id"], est)
    assert key["status"] == "active", key["certificate_request"]["error"]
    seq = api.last_seq()

    rotated = api.ok(action(api, key["id"], "rotate"))
    assert rotated["current_version"] == 2, rotated["certificate_request"]
    assert rotated["certificate_request"]["purpose"] == "rotate"
    assert rotated["certificate_request"]["status"] == "issued"
    v1, v2 = version(rotated, 1), version(rotated, 2)
    assert (v1["status"], v2["status"]) == ("archived", "active")
    leaf = x509.load_pem_x509_certificate(rotated["certificate_chain"][0].encode())
    assert leaf.public_key().public_bytes(*SPKI).decode() == v2["public_key_pem"]
    assert v1["certificate_chain"] == key["certificate_chain"]

    token = api.access_token(api.create_account(tsg["id"]))
    signed = api.ok(sign(api, token, key["name"], DIGEST))
    assert signed["key_version"] == 2
    assert verifies(v2["public_key_pem"], base64.b64decode(signed["signature"]), DIGEST)
    (done,) = events_of(api, seq, "key.rotated")
    assert done["details"]["certificate_serial"] == format(leaf.serial_number, "x")
    assert done["details"]["previous_version"] == 1
