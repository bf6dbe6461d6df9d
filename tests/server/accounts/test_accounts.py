"""Built-in accounts: generated or uploaded keys, validity, disable/enable."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, rsa

from tests.support import Api, Installation, refused_once


@pytest.fixture(scope="module")
def tsg(api: Api) -> dict[str, Any]:
    return api.create_tsg()


def public_pem(private: Any) -> str:
    return str(
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@pytest.mark.parametrize("algorithm", ["EC_P256", "EC_P384", "RSA_3072", "ED25519"])
def test_generated_key_pair_is_returned_once_and_never_stored(
    api: Api, installation: Installation, tsg: dict[str, Any], algorithm: str
) -> None:
    created = api.ok(
        api.http.post(
            "/api/v1/accounts",
            json={"name": api.unique("a"), "tsg_id": tsg["id"], "key_algorithm": algorithm},
            headers=api.admin,
        ),
        201,
    )
    uuid.UUID(created["client_id"])
    private = serialization.load_pem_private_key(created["private_key_pem"].encode(), None)
    assert created["keys"][0]["public_key_pem"] == public_pem(private)
    shown = api.ok(api.http.get(f"/api/v1/accounts/{created['client_id']}", headers=api.admin))
    assert "private_key_pem" not in shown
    # Nowhere in the database: the private key's own DER encoding never appears.
    der = private.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    if installation.backend == "sqlite":
        data = b"".join(
            p.read_bytes() for p in Path(installation.settings.data_dir).glob("signery.db*")
        )
        assert der not in data
        assert created["private_key_pem"].encode()[40:100] not in data


def test_uploaded_public_key_gets_no_private_key_back(api: Api, tsg: dict[str, Any]) -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    created = api.ok(
        api.http.post(
            "/api/v1/accounts",
            json={
                "name": api.unique("a"),
                "tsg_id": tsg["id"],
                "public_key_pem": public_pem(private),
            },
            headers=api.admin,
        ),
        201,
    )
    assert created["private_key_pem"] is None
    assert created["keys"][0]["algorithm"] == "EC_P256"


@pytest.mark.parametrize(
    "pem",
    [
        pytest.param(
            lambda: public_pem(rsa.generate_private_key(65537, 1024)),  # noqa: S505 - under test
            id="rsa-1024",
        ),
        pytest.param(lambda: public_pem(rsa.generate_private_key(3, 2048)), id="rsa-e3"),
        pytest.param(lambda: public_pem(ec.generate_private_key(ec.SECP256K1())), id="secp256k1"),
        pytest.param(lambda: public_pem(dsa.generate_private_key(2048)), id="dsa"),
        pytest.param(
            lambda: "-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n",
            id="garbage",
        ),
    ],
)
def test_weak_or_unsupported_public_keys_are_refused(
    api: Api, tsg: dict[str, Any], pem: Any
) -> None:
    with refused_once(api, reason="invalid_public_key"):
        r = api.http.post(
            "/api/v1/accounts",
            json={"name": api.unique("a"), "tsg_id": tsg["id"], "public_key_pem": pem()},
            headers=api.admin,
        )
        assert r.status_code == 400


def test_validity_and_listing(api: Api, tsg: dict[str, Any]) -> None:
    created = api.ok(
        api.http.post(
            "/api/v1/accounts",
            json={"name": api.unique("a"), "tsg_id": tsg["id"], "validity_days": 10},
            headers=api.admin,
        ),
        201,
    )
    from datetime import datetime

    valid_until = datetime.fromisoformat(created["valid_until"])
    created_at = datetime.fromisoformat(created["created_at"])
    assert (valid_until - created_at).days == 10
    listed = api.ok(
        api.http.get("/api/v1/accounts", params={"tsg_id": tsg["id"]}, headers=api.admin)
    )
    assert created["id"] in {a["id"] for a in listed}
    for bad in (0, 3651):
        assert (
            api.http.post(
                "/api/v1/accounts",
                json={"name": api.unique("a"), "tsg_id": tsg["id"], "validity_days": bad},
                headers=api.admin,
            ).status_code
            == 400
        )


def test_disable_and_enable_are_audited(api: Api, tsg: dict[str, Any]) -> None:
    account = api.create_account(tsg["id"])
    seq = api.last_seq()
    assert (
        api.ok(api.http.post(f"/api/v1/accounts/{account.client_id}/disable", headers=api.admin))[
            "status"
        ]
        == "disabled"
    )
    assert (
        api.ok(api.http.post(f"/api/v1/accounts/{account.id}/disable", headers=api.admin))["status"]
        == "disabled"
    )
    assert (
        api.ok(api.http.post(f"/api/v1/accounts/{account.id}/enable", headers=api.admin))["status"]
        == "active"
    )
    kinds = [e["kind"] for e in api.events_after(seq)]
    assert kinds == ["account.disabled", "account.enabled"], "disabling twice records one change"


def test_duplicate_names_and_unknown_accounts(api: Api, tsg: dict[str, Any]) -> None:
    account = api.create_account(tsg["id"])
    r = api.http.post(
        "/api/v1/accounts", json={"name": account.name, "tsg_id": tsg["id"]}, headers=api.admin
    )
    assert r.status_code == 409
    assert api.http.get(f"/api/v1/accounts/{uuid.uuid4()}", headers=api.admin).status_code == 404
    r = api.http.post(
        "/api/v1/accounts",
        json={"name": "x", "tsg_id": tsg["id"], "key_algorithm": "DSA"},
        headers=api.admin,
    )
    assert r.status_code == 400
