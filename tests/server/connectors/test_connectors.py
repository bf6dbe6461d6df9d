"""CA connectors as configuration: created on a TSG, seen and managed only inside
the roles that allow it, secrets encrypted at rest and never returned, every
change audited, and refused when malformed or still in use."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from signery.server.ca.models import CaConnectorRow
from signery.server.persistence.db import make_engine
from tests.server.ca.pki import TLS_CLIENT_EXT, TestCa, make_ca, tls_pair
from tests.server.users.test_users import Person
from tests.support import Api, Installation, refused_once

PASSWORD = "est-password-that-must-never-come-back"


@pytest.fixture(scope="module")
def tsg(api: Api) -> dict[str, Any]:
    return api.create_tsg()


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> TestCa:
    return make_ca(tmp_path_factory.mktemp("roots"), "Connector Test Root")


def est_body(api: Api, tsg_id: str, root: TestCa, **est: Any) -> dict[str, Any]:
    settings = {"url": "https://est.example/.well-known/est", "username": "signery"}
    settings.update(est)
    return {
        "name": api.unique("est"),
        "tsg_id": tsg_id,
        "kind": "est",
        "roots_pem": root.pem,
        "est": settings,
    }


def test_an_est_connector_keeps_its_secrets(
    api: Api,
    installation: Installation,
    tsg: dict[str, Any],
    root: TestCa,
    tmp_path: Path,
) -> None:
    client_cert, client_key = tls_pair(root, tmp_path, "est-client", TLS_CLIENT_EXT)
    key_pem = client_key.read_text()
    body = est_body(
        api,
        tsg["id"],
        root,
        password=PASSWORD,
        tls_ca_pem=root.pem,
        client_certificate_pem=client_cert.read_text(),
        client_key_pem=key_pem,
    )
    response = api.http.post("/api/v1/ca-connectors", json=body, headers=api.admin)
    created = api.ok(response, 201)
    assert created["kind"] == "est"
    assert created["est"]["has_password"] is True
    assert created["est"]["has_client_key"] is True
    assert created["est"]["url"] == "https://est.example/.well-known/est"
    assert [r["subject"] for r in created["roots"]] == ["O=Signery Tests,CN=Connector Test Root"]
    key_body = key_pem.split("-----")[2].strip().splitlines()[0]
    for answer in (
        response,
        api.http.get(f"/api/v1/ca-connectors/{created['id']}", headers=api.admin),
        api.http.get("/api/v1/ca-connectors", headers=api.admin),
    ):
        assert PASSWORD not in answer.text
        assert key_body not in answer.text
        assert 'password"' not in answer.text.replace("has_password", "")

    # At rest: encrypted under the master key, bound to the connector's id.
    engine = make_engine(installation.settings.resolved_database_url, pool_size=1)
    try:
        with engine.connect() as conn:
            row = conn.execute(
                select(CaConnectorRow.secrets_wrapped, CaConnectorRow.config_json).where(
                    CaConnectorRow.id == created["id"]
                )
            ).one()
    finally:
        engine.dispose()
    assert row.secrets_wrapped is not None
    for stored in row:
        assert PASSWORD not in stored
        assert key_body not in stored

    # An update that leaves a secret out keeps it; the audit names what changed.
    updated = api.ok(
        api.http.patch(
            f"/api/v1/ca-connectors/{created['id']}",
            json={
                "est": {"url": "https://est2.example/.well-known/est/1234567890", "username": "u"}
            },
            headers=api.admin,
        )
    )
    assert updated["est"]["url"] == "https://est2.example/.well-known/est/1234567890"
    assert updated["est"]["has_password"] is True
    assert updated["est"]["has_client_key"] is True
    events = api.ok(
        api.http.get(
            "/api/v1/audit/events",
            params={"kind": "ca.connector", "order": "desc"},
            headers=api.admin,
        )
    )["events"]
    mine = [e for e in events if e["details"].get("connector_id") == created["id"]]
    assert [e["kind"] for e in mine] == ["ca.connector.updated", "ca.connector.created"]
    assert mine[0]["details"]["changed"] == ["est"]
    assert all(PASSWORD not in str(e) for e in events)

    deleting = api.http.delete(f"/api/v1/ca-connectors/{created['id']}", headers=api.admin)
    assert deleting.status_code == 204, deleting.text
    gone = api.http.get(f"/api/v1/ca-connectors/{created['id']}", headers=api.admin)
    assert gone.status_code == 404
    assert gone.json()["code"] == "ca_connector_not_found"
    deleted = api.ok(
        api.http.get(
            "/api/v1/audit/events",
            params={"kind": "ca.connector.deleted", "order": "desc", "limit": 1},
            headers=api.admin,
        )
    )["events"][0]
    assert deleted["details"]["connector_id"] == created["id"]


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"url": "http://est.example/.well-known/est"}, "https"),
        ({"url": "https://user:pw@est.example/.well-known/est"}, "credentials"),
        ({"username": None, "password": "x"}, "username"),
        ({"tls_ca_pem": "not pem"}, "tls_ca_pem"),
        (
            {"client_key_pem": "-----BEGIN PRIVATE KEY-----\nAA==\n-----END PRIVATE KEY-----\n"},
            "go together",
        ),
    ],
)
def test_bad_est_settings_are_refused(
    api: Api, tsg: dict[str, Any], root: TestCa, change: dict[str, Any], fragment: str
) -> None:
    body = est_body(api, tsg["id"], root, **change)
    with refused_once(api, reason="invalid_request"):
        response = api.http.post("/api/v1/ca-connectors", json=body, headers=api.admin)
        assert response.status_code == 400, response.text
        assert fragment in response.json()["detail"]


def test_bad_roots_and_kinds_are_refused(api: Api, tsg: dict[str, Any], root: TestCa) -> None:
    cases = [
        ({"kind": "csr", "roots_pem": "nope"}, "roots_pem"),
        ({"kind": "est", "roots_pem": root.pem}, "est settings"),
        (
            {"kind": "csr", "roots_pem": root.pem, "est": {"url": "https://x.example/"}},
            "no est settings",
        ),
    ]
    for body, fragment in cases:
        response = api.http.post(
            "/api/v1/ca-connectors",
            json={"name": api.unique("bad"), "tsg_id": tsg["id"], **body},
            headers=api.admin,
        )
        assert response.status_code == 400, response.text
        assert fragment in response.json()["detail"]


def test_names_are_unique_per_tsg_and_in_use_connectors_stay(
    api: Api, tsg: dict[str, Any], root: TestCa
) -> None:
    body = {"name": api.unique("dup"), "tsg_id": tsg["id"], "kind": "csr", "roots_pem": root.pem}
    created = api.ok(api.http.post("/api/v1/ca-connectors", json=body, headers=api.admin), 201)
    again = api.http.post("/api/v1/ca-connectors", json=body, headers=api.admin)
    assert again.status_code == 409
    assert again.json()["code"] == "name_taken"
    api.create_key(tsg["id"], ca="connector", ca_connector=created["name"])
    with refused_once(api, reason="ca_connector_in_use"):
        response = api.http.delete(f"/api/v1/ca-connectors/{created['id']}", headers=api.admin)
        assert response.status_code == 409


def test_roles_decide_who_sees_and_who_manages(api: Api, tsg: dict[str, Any], root: TestCa) -> None:
    team = api.create_tsg(parent=tsg["id"])
    other = api.create_tsg()
    body = {
        "name": api.unique("team-ca"),
        "tsg_id": team["id"],
        "kind": "csr",
        "roots_pem": root.pem,
    }
    created = api.ok(api.http.post("/api/v1/ca-connectors", json=body, headers=api.admin), 201)

    key_admin = Person(api, team["id"], "key_admin")
    listed = api.ok(api.http.get("/api/v1/ca-connectors", headers=key_admin.headers))
    assert [c["id"] for c in listed] == [created["id"]]
    with refused_once(api, reason="permission_denied"):
        response = api.http.post(
            "/api/v1/ca-connectors",
            json={**body, "name": api.unique("mine")},
            headers=key_admin.headers,
        )
        assert response.status_code == 403
    assert (
        api.http.delete(
            f"/api/v1/ca-connectors/{created['id']}", headers=key_admin.headers
        ).status_code
        == 403
    )
    # ...but a key admin may use it for keys.
    key = api.ok(
        api.http.post(
            "/api/v1/keys",
            json={
                "name": api.unique("k"),
                "tsg_id": team["id"],
                "algorithm": "EC_P256",
                "certificate_authority": "connector",
                "ca_connector": created["name"],
            },
            headers=key_admin.headers,
        ),
        201,
    )
    assert key["status"] == "pending"

    outsider = Person(api, other["id"], "superuser")
    assert api.ok(api.http.get("/api/v1/ca-connectors", headers=outsider.headers)) == []
    hidden = api.http.get(f"/api/v1/ca-connectors/{created['id']}", headers=outsider.headers)
    assert hidden.status_code == 404, "outside the subtree: as if it did not exist"
    nobody = Person(api, team["id"], None)
    assert api.ok(api.http.get("/api/v1/ca-connectors", headers=nobody.headers)) == []
