"""The signing plane's key listing shows what this account can sign with now;
``?all=true`` adds the other keys it can see, each with the reason it cannot sign
(the code the sign endpoint would answer with). SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from tests.support import Account, Api

DIGEST = hashlib.sha256(b"listing").digest()


@pytest.fixture(scope="module")
def tsg(api: Api) -> dict[str, Any]:
    return api.create_tsg()


@pytest.fixture(scope="module")
def account(api: Api, tsg: dict[str, Any]) -> Account:
    return api.create_account(tsg["id"])


@pytest.fixture(scope="module")
def token(api: Api, account: Account) -> str:
    return api.access_token(account)


def listing(api: Api, token: str, **params: Any) -> dict[str, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}"}
    entries = api.ok(api.http.get("/api/v1/signing/keys", params=params, headers=headers))
    return {k["id"]: k for k in entries}


def test_keys_the_account_cannot_sign_with_are_not_listed_by_default(
    api: Api, tsg: dict[str, Any], token: str
) -> None:
    usable = api.create_key(tsg["id"])
    others_only = api.create_key(tsg["id"])
    somebody = api.create_account(tsg["id"])
    api.ok(
        api.http.put(
            f"/api/v1/keys/{others_only['id']}/policy",
            json={"signers": [somebody.id]},
            headers=api.admin,
        )
    )
    revoked = api.create_key(tsg["id"])
    api.ok(
        api.http.post(
            f"/api/v1/keys/{revoked['id']}/revoke-certificate", json={}, headers=api.admin
        )
    )
    disabled = api.create_key(tsg["id"])
    api.ok(api.http.post(f"/api/v1/keys/{disabled['id']}/disable", json={}, headers=api.admin))

    listed = listing(api, token)
    assert usable["id"] in listed
    assert listed[usable["id"]]["usable"] is True
    assert listed[usable["id"]]["unusable_reason"] is None
    for key in (others_only, revoked, disabled):
        assert key["id"] not in listed

    everything = listing(api, token, all="true")
    reasons = {k: everything[k]["unusable_reason"] for k in everything}
    assert reasons[usable["id"]] is None
    assert reasons[others_only["id"]] == "signer_not_allowed"
    assert reasons[revoked["id"]] == "certificate_revoked"
    assert reasons[disabled["id"]] == "key_disabled"
    assert everything[revoked["id"]]["usable"] is False
    # The reason is the code the sign endpoint answers with.
    for key in (others_only, revoked, disabled):
        refused = api.sign(token, key["id"], DIGEST)
        assert refused.json()["code"] == reasons[key["id"]]
    # The public key stays listed: signatures made earlier still verify with it.
    assert everything[revoked["id"]]["public_key_pem"] == revoked["public_key_pem"]


def test_the_signer_named_by_the_policy_sees_the_key(
    api: Api, tsg: dict[str, Any], account: Account
) -> None:
    key = api.create_key(tsg["id"])
    api.ok(
        api.http.put(
            f"/api/v1/keys/{key['id']}/policy",
            json={"signers": [account.name], "client_ips": ["192.0.2.0/24"]},
            headers=api.admin,
        )
    )
    token = api.access_token(account)
    # Named, but the policy allows another network than this client's.
    everything = listing(api, token, all="true")
    assert everything[key["id"]]["unusable_reason"] == "client_ip_not_allowed"
    assert key["id"] not in listing(api, token)
    api.ok(
        api.http.put(
            f"/api/v1/keys/{key['id']}/policy", json={"signers": [account.name]}, headers=api.admin
        )
    )
    assert listing(api, token)[key["id"]]["usable"] is True
