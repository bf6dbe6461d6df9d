"""An account's credentials: its registered public keys and the access tokens they
mint (issue 12, items 4 and 18).

Adding a key to an account is taking over its identity: an account admin may do
it, except on an account that a signing key's policy names as a signer, which
needs key_admin on those keys. Keys can be removed (never the last one), and
removing one, like disabling the account, ends every access token issued before.
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from tests.server.accounts.test_tokens import pem
from tests.server.users.test_users import Person
from tests.support import Account, Api, assertion_claims, refused_once

DIGEST = hashlib.sha256(b"account credentials").digest()
ESCALATION = "authz.escalation.refused"


@pytest.fixture(scope="module")
def tsg(api: Api) -> dict[str, Any]:
    return api.create_tsg()


def bind(api: Api, person: Person, role: str, tsg_id: str) -> None:
    api.ok(
        api.http.post(
            "/api/v1/role-bindings",
            json={"principal_id": person.id, "role": role, "tsg_id": tsg_id},
            headers=api.admin,
        ),
        201,
    )


def set_policy(api: Api, key: dict[str, Any], policy: dict[str, Any]) -> None:
    api.ok(api.http.put(f"/api/v1/keys/{key['id']}/policy", json=policy, headers=api.admin))


def add_key(api: Api, account: Account, public_pem: str, headers: dict[str, str]) -> Any:
    return api.http.post(
        f"/api/v1/accounts/{account.id}/keys", json={"public_key_pem": public_pem}, headers=headers
    )


def token_with(api: Api, account: Account, private: Any, alg: str = "ES256") -> Any:
    assertion = jwt.encode(assertion_claims(account.client_id, api.issuer), private, algorithm=alg)
    return api.token_response(assertion)


def keys_of(api: Api, account: Account) -> list[dict[str, Any]]:
    return api.ok(api.http.get(f"/api/v1/accounts/{account.id}", headers=api.admin))["keys"]  # type: ignore[no-any-return]


# ------------------------------------------------------------------ adding keys (item 4)


def test_an_account_admin_cannot_take_over_an_account_a_policy_names_as_its_signer(
    api: Api, tsg: dict[str, Any]
) -> None:
    account_admin = Person(api, tsg["id"], "account_admin")
    signer = api.create_account(tsg["id"])
    key = api.create_key(tsg["id"], "EC_P256", ca="none")
    set_policy(api, key, {"signers": [signer.id]})
    mine = ec.generate_private_key(ec.SECP256R1())

    seq = api.last_seq()
    with refused_once(api, reason="signer_key_admin_required", kind=ESCALATION):
        r = add_key(api, signer, pem(mine), account_admin.headers)
        assert r.status_code == 403, r.text
    assert len(keys_of(api, signer)) == 1, "the key was not registered"
    # So the account admin cannot sign as the named signer.
    with refused_once(api, reason="assertion_signature_invalid"):
        assert token_with(api, signer, mine).status_code == 400
    refusal = api.events_after(seq)[0]
    assert refusal["principal"]["id"] == account_admin.id
    assert refusal["details"] == {
        "action": "account.key.add",
        "account_id": signer.id,
        "signer_of_keys": [key["id"]],
    }


def test_key_admin_on_the_naming_keys_may_add_a_key_and_the_event_names_who(
    api: Api, tsg: dict[str, Any]
) -> None:
    both = Person(api, tsg["id"], "account_admin")
    bind(api, both, "key_admin", tsg["id"])
    signer = api.create_account(tsg["id"])
    set_policy(api, api.create_key(tsg["id"], "EC_P256", ca="none"), {"signers": [signer.id]})
    second = ec.generate_private_key(ec.SECP256R1())
    seq = api.last_seq()
    added = api.ok(add_key(api, signer, pem(second), both.headers), 201)
    [event] = api.events_after(seq)
    new_key = next(k for k in added["keys"] if k["public_key_pem"] == pem(second))
    assert event["kind"] == "account.key.added"
    assert event["principal"]["id"] == both.id
    assert event["details"] == {
        "account_id": signer.id,
        "key_id": new_key["id"],
        "key_fingerprint": new_key["fingerprint"],
    }
    assert token_with(api, signer, second).status_code == 200


def test_accounts_named_by_no_policy_or_only_through_their_tsg_need_account_admin(
    api: Api, tsg: dict[str, Any]
) -> None:
    """A TSG-scoped signer rule gives nothing an account admin there does not
    already have: it may create a new account in that TSG, which the rule lets
    sign too. So only accounts named one by one are protected."""
    account_admin = Person(api, tsg["id"], "account_admin")
    plain = api.create_account(tsg["id"])
    by_tsg = api.create_account(tsg["id"])
    set_policy(api, api.create_key(tsg["id"], "EC_P256", ca="none"), {"signer_tsgs": [tsg["id"]]})
    for account in (plain, by_tsg):
        api.ok(
            add_key(
                api, account, pem(ec.generate_private_key(ec.SECP256R1())), account_admin.headers
            ),
            201,
        )


# ------------------------------------------------------------------ removing keys (item 4)


def test_removing_a_key_ends_its_assertions_and_every_access_token_issued_before(
    api: Api, tsg: dict[str, Any]
) -> None:
    account_admin = Person(api, tsg["id"], "account_admin")
    account = api.create_account(tsg["id"])
    key = api.create_key(tsg["id"], "EC_P256", ca="none")
    [first] = keys_of(api, account)
    second = ec.generate_private_key(ec.SECP256R1())
    api.ok(add_key(api, account, pem(second), api.admin), 201)
    old_token = api.access_token(account)
    assert api.sign(old_token, key["name"], DIGEST).status_code == 200

    seq = api.last_seq()
    r = api.http.delete(
        f"/api/v1/accounts/{account.id}/keys/{first['id']}", headers=account_admin.headers
    )
    remaining = api.ok(r)["keys"]
    assert [k["id"] for k in remaining] == [k["id"] for k in keys_of(api, account)]
    assert first["id"] not in {k["id"] for k in remaining}
    [event] = api.events_after(seq)
    assert event["kind"] == "account.key.removed"
    assert event["principal"]["id"] == account_admin.id
    assert event["tsg_id"] == tsg["id"]
    assert event["details"] == {
        "account_id": account.id,
        "key_id": first["id"],
        "key_fingerprint": first["fingerprint"],
    }

    with refused_once(api, reason="assertion_signature_invalid"):
        assert api.token_response(account.credentials().assertion(api.issuer)).status_code == 400
    with refused_once(api, reason="invalid_token", account_id=account.id, failures_counted=True):
        assert api.sign(old_token, key["name"], DIGEST).status_code == 401
    fresh = api.ok(token_with(api, account, second))["access_token"]
    assert api.sign(fresh, key["name"], DIGEST).status_code == 200


def test_the_last_key_of_an_account_is_not_removed(api: Api, tsg: dict[str, Any]) -> None:
    account = api.create_account(tsg["id"])
    [only] = keys_of(api, account)
    with refused_once(api, reason="last_account_key"):
        r = api.http.delete(f"/api/v1/accounts/{account.id}/keys/{only['id']}", headers=api.admin)
        assert r.status_code == 409
    assert keys_of(api, account) == [only]
    assert api.token_response(account.credentials().assertion(api.issuer)).status_code == 200


def test_removing_unknown_keys_or_keys_out_of_reach(api: Api, tsg: dict[str, Any]) -> None:
    account = api.create_account(tsg["id"])
    other = api.create_account(tsg["id"])
    [other_key] = keys_of(api, other)
    with refused_once(api, reason="account_key_not_found"):
        r = api.http.delete(f"/api/v1/accounts/{account.id}/keys/{uuid.uuid4()}", headers=api.admin)
        assert r.status_code == 404
    with refused_once(api, reason="account_key_not_found"):
        r = api.http.delete(
            f"/api/v1/accounts/{account.id}/keys/{other_key['id']}", headers=api.admin
        )
        assert r.status_code == 404, "another account's key is not this account's"
    elsewhere = Person(api, api.create_tsg()["id"], "account_admin")
    with refused_once(api, reason="account_not_found"):
        r = api.http.delete(
            f"/api/v1/accounts/{other.id}/keys/{other_key['id']}", headers=elsewhere.headers
        )
        assert r.status_code == 404
    reader = Person(api, tsg["id"], "auditor")  # sees the account, may not change it
    with refused_once(api, reason="permission_denied"):
        r = api.http.delete(
            f"/api/v1/accounts/{other.id}/keys/{other_key['id']}", headers=reader.headers
        )
        assert r.status_code == 403
    assert keys_of(api, other) == [other_key]


# ------------------------------------------------------------------ disable / enable (item 18)


def test_reenabling_an_account_does_not_revive_the_tokens_issued_before_it_was_disabled(
    api: Api, tsg: dict[str, Any]
) -> None:
    account = api.create_account(tsg["id"])
    key = api.create_key(tsg["id"], "EC_P256", ca="none")
    token = api.access_token(account)
    bearer = {"Authorization": f"Bearer {token}"}
    assert api.sign(token, key["name"], DIGEST).status_code == 200
    api.ok(api.http.post(f"/api/v1/accounts/{account.id}/disable", headers=api.admin))
    assert api.sign(token, key["name"], DIGEST).status_code == 401
    api.ok(api.http.post(f"/api/v1/accounts/{account.id}/enable", headers=api.admin))

    with refused_once(api, reason="invalid_token", account_id=account.id, failures_counted=True):
        response = api.sign(token, key["name"], DIGEST)
        assert response.status_code == 401
        assert "signature" not in response.json()
    # Every other place that takes an access token refuses it too.
    assert api.http.get("/api/v1/signing/keys", headers=bearer).status_code == 401
    assert api.http.get("/api/v1/tsgs", headers=bearer).status_code == 401
    # A token issued after the re-enable works.
    assert api.sign(api.access_token(account), key["name"], DIGEST).status_code == 200
