"""Key rotation: a new version in the same store becomes current at once, the old
one is archived (listed with its public key and chain, signs only when the key's
policy allows it), and a rotation that fails leaves no half-created version.
In-process on SQLite and PostgreSQL, plus a real `signery serve` process signing
in a loop while the key is rotated."""

from __future__ import annotations

import base64
import hashlib
import threading
import time
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
from cryptography import x509
from sqlalchemy import func, select

from signery.keystores._builtin import BuiltinKeyMaterialRow
from signery.server.persistence.db import make_engine
from tests.server.keys.lifecycle_helpers import (
    action,
    events_of,
    key_of,
    set_min_signing_version,
    sign,
    verifies,
    version,
)
from tests.support import Account, Api, Installation, inserts_fail

DIGEST = hashlib.sha256(b"release 1.2.3").digest()


@pytest.fixture(scope="module")
def tsg(api: Api) -> dict[str, Any]:
    return api.create_tsg()


@pytest.fixture(scope="module")
def account(api: Api, tsg: dict[str, Any]) -> Account:
    return api.create_account(tsg["id"])


@pytest.fixture(scope="module")
def token(api: Api, account: Account) -> str:
    return api.access_token(account)


def leaf(chain: list[str]) -> x509.Certificate:
    return x509.load_pem_x509_certificate(chain[0].encode())


def material_rows(installation: Installation) -> int:
    engine = make_engine(installation.settings.resolved_database_url, pool_size=1)
    try:
        with engine.connect() as conn:
            return int(
                conn.execute(select(func.count()).select_from(BuiltinKeyMaterialRow)).scalar_one()
            )
    finally:
        engine.dispose()


def test_rotation_makes_a_new_current_version_and_archives_the_old(
    api: Api, tsg: dict[str, Any], token: str
) -> None:
    key = api.create_key(tsg["id"], "EC_P256", subject={"common_name": "Rotating Signer"})
    first = api.ok(sign(api, token, key["name"], DIGEST))
    assert first["key_version"] == 1
    seq = api.last_seq()

    rotated = api.ok(action(api, key["id"], "rotate"))

    assert rotated["current_version"] == 2
    old, new = version(rotated, 1), version(rotated, 2)
    assert old["status"] == "archived"
    assert old["archived_at"] is not None
    assert new["status"] == "active"
    assert new["archived_at"] is None
    # The archived version stays listed for verification: public key and chain.
    assert old["public_key_pem"] == key["public_key_pem"]
    assert old["certificate_chain"] == key["certificate_chain"]
    assert new["public_key_pem"] != old["public_key_pem"]
    assert rotated["public_key_pem"] == new["public_key_pem"]
    assert rotated["certificate_chain"] == new["certificate_chain"]
    # A new certificate for the new key pair: other serial, same subject.
    old_cert, new_cert = leaf(old["certificate_chain"]), leaf(new["certificate_chain"])
    assert new_cert.serial_number != old_cert.serial_number
    assert new_cert.subject == old_cert.subject
    assert new["certificate"]["serial"] == format(new_cert.serial_number, "x")
    # The version signed with before still verifies with its listed public key.
    assert verifies(old["public_key_pem"], base64.b64decode(first["signature"]), DIGEST)

    (event,) = events_of(api, seq, "key.rotated")
    assert event["key_id"] == key["id"]
    assert event["key_version"] == 2
    assert event["principal"]["type"] == "user"
    assert event["details"]["previous_version"] == 1
    assert event["details"]["version"] == 2
    assert event["details"]["certificate_serial"] == new["certificate"]["serial"]

    # Clients signing "with the key" get the new version at once.
    signed = api.ok(sign(api, token, key["name"], DIGEST))
    assert signed["key_version"] == 2
    assert signed["certificate_chain"] == new["certificate_chain"]
    assert verifies(new["public_key_pem"], base64.b64decode(signed["signature"]), DIGEST)
    assert not verifies(old["public_key_pem"], base64.b64decode(signed["signature"]), DIGEST)
    seen = [e for e in api.events_after(seq) if e["kind"] == "signing.sign.succeeded"]
    assert seen[-1]["key_version"] == 2
    # And the signing plane's listing shows the new version.
    listed = api.ok(
        api.http.get("/api/v1/signing/keys", headers={"Authorization": f"Bearer {token}"})
    )
    mine = next(k for k in listed if k["id"] == key["id"])
    assert mine["current_version"] == 2
    assert mine["public_key_pem"] == new["public_key_pem"]


def test_an_archived_version_signs_only_when_the_policy_allows_it(
    api: Api, installation: Installation, tsg: dict[str, Any], token: str
) -> None:
    key = api.create_key(tsg["id"], "EC_P256")
    api.ok(action(api, key["id"], "rotate"))
    rotated = api.ok(action(api, key["id"], "rotate"))
    assert rotated["current_version"] == 3

    refused = sign(api, token, key["name"], DIGEST, version=1)
    assert refused.status_code == 409, refused.text
    assert refused.json()["code"] == "key_version_not_allowed"
    missing = sign(api, token, key["name"], DIGEST, version=9)
    assert missing.status_code == 404, missing.text
    assert missing.json()["code"] == "key_version_not_found"
    # Naming the current version is the same as naming none.
    assert api.ok(sign(api, token, key["name"], DIGEST, version=3))["key_version"] == 3

    set_min_signing_version(api, key["id"], 2)
    try:
        seq = api.last_seq()
        signed = api.ok(sign(api, token, key["name"], DIGEST, version=2))
        assert signed["key_version"] == 2
        assert signed["certificate_chain"] == version(rotated, 2)["certificate_chain"]
        assert verifies(
            version(rotated, 2)["public_key_pem"], base64.b64decode(signed["signature"]), DIGEST
        )
        (event,) = [e for e in api.events_after(seq) if e["kind"] == "signing.sign.succeeded"]
        assert event["key_version"] == 2
        # Below the policy's minimum: still refused.
        below = sign(api, token, key["name"], DIGEST, version=1)
        assert below.status_code == 409
        assert below.json()["code"] == "key_version_not_allowed"
    finally:
        set_min_signing_version(api, key["id"], None)
    again = sign(api, token, key["name"], DIGEST, version=2)
    assert again.status_code == 409
    assert again.json()["code"] == "key_version_not_allowed"


def test_an_archived_version_with_a_revoked_certificate_does_not_sign(
    api: Api, installation: Installation, tsg: dict[str, Any], token: str
) -> None:
    key = api.create_key(tsg["id"], "EC_P256")
    serial = key["versions"][0]["certificate"]["serial"]
    api.ok(action(api, key["id"], "rotate"))
    api.ok(action(api, key["id"], "revoke-certificate", {"serial": serial}))
    set_min_signing_version(api, key["id"], 1)
    try:
        refused = sign(api, token, key["name"], DIGEST, version=1)
        assert refused.status_code == 409, refused.text
        assert refused.json()["code"] == "certificate_revoked"
        assert api.ok(sign(api, token, key["name"], DIGEST))["key_version"] == 2
    finally:
        set_min_signing_version(api, key["id"], None)


def test_rotation_takes_the_validity_of_the_body(api: Api, tsg: dict[str, Any]) -> None:
    key = api.create_key(tsg["id"], "EC_P256", validity_days=365)
    rotated = api.ok(action(api, key["id"], "rotate", {"validity_days": 30}))
    cert = version(rotated, 2)["certificate"]
    lifetime = datetime.fromisoformat(cert["not_after"]) - datetime.fromisoformat(
        cert["not_before"]
    )
    assert abs(lifetime - timedelta(days=30)) < timedelta(days=1)
    too_long = action(api, key["id"], "rotate", {"validity_days": 3000})
    assert too_long.status_code == 400, too_long.text
    assert key_of(api, key["id"])["current_version"] == 2


def test_a_key_without_ca_rotates_without_certificate(
    api: Api, tsg: dict[str, Any], token: str
) -> None:
    key = api.create_key(tsg["id"], "EC_P256", ca="none")
    rotated = api.ok(action(api, key["id"], "rotate"))
    assert rotated["current_version"] == 2
    assert version(rotated, 2)["certificate"] is None
    signed = api.ok(sign(api, token, key["name"], DIGEST))
    assert verifies(
        version(rotated, 2)["public_key_pem"], base64.b64decode(signed["signature"]), DIGEST
    )


def test_a_failed_rotation_leaves_no_half_created_version(
    api: Api, installation: Installation, tsg: dict[str, Any], token: str
) -> None:
    """Regression guard: the key pair generated for the new version is destroyed
    again when its transaction fails (no orphan material in the store)."""
    key = api.create_key(tsg["id"], "EC_P256")
    before = material_rows(installation)
    seq = api.last_seq()
    with inserts_fail(installation, "key_versions"):
        failed = action(api, key["id"], "rotate")
    assert failed.status_code >= 500, failed.text
    assert material_rows(installation) == before
    after = key_of(api, key["id"])
    assert after["current_version"] == 1
    assert [v["status"] for v in after["versions"]] == ["active"]
    assert not events_of(api, seq, "key.rotated")
    assert api.ok(sign(api, token, key["name"], DIGEST))["key_version"] == 1


def test_rotation_needs_key_manage(api: Api, tsg: dict[str, Any], account: Account) -> None:
    key = api.create_key(tsg["id"], "EC_P256")
    token = api.access_token(account)
    refused = api.http.post(
        f"/api/v1/keys/{key['id']}/rotate", json={}, headers={"Authorization": f"Bearer {token}"}
    )
    assert refused.status_code in (401, 403), refused.text
    assert key_of(api, key["id"])["current_version"] == 1


# ------------------------------------------------------------------ a real server under load


def test_rotating_while_a_client_signs_in_a_loop(
    server_api: Api, installation: Installation
) -> None:
    """A client signs continuously against a real `signery serve` while the key is
    rotated 3 times: no request fails, and every signature verifies under the
    public key of the version its response names."""
    api = server_api
    tsg = api.create_tsg()
    account = api.create_account(tsg["id"])
    token = api.access_token(account)
    key = api.create_key(tsg["id"], "EC_P256")
    results: list[tuple[int, dict[str, Any] | str, bytes]] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=str(api.http.base_url), timeout=30) as http:
            own = Api(http, api.admin_token, api.issuer, api.root_tsg_id)
            n = 0
            while not stop.is_set():
                n += 1
                digest = hashlib.sha256(f"artifact {n}".encode()).digest()
                response = sign(own, token, key["name"], digest)
                body = response.json() if response.status_code == 200 else response.text
                results.append((response.status_code, body, digest))

    thread = threading.Thread(target=client)
    thread.start()
    try:
        for _ in range(3):
            time.sleep(0.3)
            api.ok(action(api, key["id"], "rotate"))
        time.sleep(0.3)
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive()

    final = key_of(api, key["id"])
    assert final["current_version"] == 4
    public = {v["version"]: v["public_key_pem"] for v in final["versions"]}
    failures = [(status, body) for status, body, _ in results if status != 200]
    assert not failures, failures[:5]
    used: set[int] = set()
    for _, body, digest in results:
        assert isinstance(body, dict)
        used.add(body["key_version"])
        assert verifies(public[body["key_version"]], base64.b64decode(body["signature"]), digest)
    assert len(results) > 20
    assert len(used) > 1, used
