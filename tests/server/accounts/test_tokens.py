"""RFC 7523 token endpoint rules that need key types or time travel (in-process,
with the service clock moved instead of sleeping)."""

from __future__ import annotations

import hashlib
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from tests.support import Account, Api, FakeClock, assertion_claims, refused_once

DIGEST = hashlib.sha256(b"tokens").digest()


def keypair(kind: str) -> Any:
    if kind == "RSA_2048":
        return rsa.generate_private_key(65537, 2048)
    if kind == "RSA_4096":
        return rsa.generate_private_key(65537, 4096)
    if kind == "EC_P256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "EC_P384":
        return ec.generate_private_key(ec.SECP384R1())
    if kind == "EC_P521":
        return ec.generate_private_key(ec.SECP521R1())
    return ed25519.Ed25519PrivateKey.generate()


def pem(private: Any) -> str:
    return str(
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@pytest.fixture(scope="module")
def tsg(api: Api) -> dict[str, Any]:
    return api.create_tsg()


@pytest.mark.parametrize(
    ("kind", "alg"),
    [
        ("RSA_2048", "RS256"),
        ("RSA_4096", "PS256"),
        ("EC_P256", "ES256"),
        ("EC_P384", "ES384"),
        ("EC_P521", "ES512"),
        ("ED25519", "EdDSA"),
    ],
)
def test_uploaded_keys_of_every_type_authenticate(
    api: Api, tsg: dict[str, Any], kind: str, alg: str
) -> None:
    private = keypair(kind)
    account = api.create_account(tsg["id"], public_key_pem=pem(private))
    assertion = jwt.encode(assertion_claims(account.client_id, api.issuer), private, algorithm=alg)
    body = api.ok(api.token_response(assertion))
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 900
    assert body["scope"] == "sign"


@pytest.mark.parametrize(
    ("kind", "alg"),
    [
        ("RSA_2048", "ES256"),
        ("EC_P256", "ES384"),
        ("EC_P384", "ES256"),
        ("ED25519", "ES256"),
        ("EC_P256", "PS256"),
    ],
)
def test_algorithm_not_fitting_the_registered_key_is_refused(
    api: Api, tsg: dict[str, Any], kind: str, alg: str
) -> None:
    """The header's alg must be the one pinned to the registered key's type."""
    private = keypair(kind)
    account = api.create_account(tsg["id"], public_key_pem=pem(private))
    signer = keypair({"ES256": "EC_P256", "ES384": "EC_P384", "PS256": "RSA_2048"}[alg])
    assertion = jwt.encode(assertion_claims(account.client_id, api.issuer), signer, algorithm=alg)
    with refused_once(api, reason="assertion_algorithm_refused"):
        response = api.token_response(assertion)
        assert response.status_code == 400
        assert response.json()["code"] == "assertion_algorithm_refused"


def test_an_account_may_hold_several_keys(api: Api, tsg: dict[str, Any]) -> None:
    account = api.create_account(tsg["id"])
    second = keypair("EC_P384")
    api.ok(
        api.http.post(
            f"/api/v1/accounts/{account.id}/keys",
            json={"public_key_pem": pem(second)},
            headers=api.admin,
        ),
        201,
    )
    assert api.token_response(account.credentials().assertion(api.issuer)).status_code == 200
    assertion = jwt.encode(
        assertion_claims(account.client_id, api.issuer), second, algorithm="ES384"
    )
    assert api.token_response(assertion).status_code == 200


def test_access_tokens_expire_after_fifteen_minutes(
    api: Api, tsg: dict[str, Any], clock: FakeClock
) -> None:
    account = api.create_account(tsg["id"])
    key = api.create_key(tsg["id"], "EC_P256", ca="none")
    token = api.access_token(account)
    clock.advance(14 * 60)
    assert api.sign(token, key["name"], DIGEST).status_code == 200
    clock.advance(61)
    with refused_once(api, reason="invalid_token", kind="auth.authentication.failed"):
        response = api.sign(token, key["name"], DIGEST)
        assert response.status_code == 401
        assert "signature" not in response.json()


def test_expired_account_is_refused_at_once(
    api: Api, tsg: dict[str, Any], clock: FakeClock
) -> None:
    account = api.create_account(tsg["id"], validity_days=1)
    key = api.create_key(tsg["id"], "EC_P256", ca="none")
    token = api.access_token(account)
    assert api.sign(token, key["name"], DIGEST).status_code == 200
    clock.advance(86400 - 60)  # the access token (15 min) would still be valid...
    token = api.access_token(account, now=clock.now().timestamp())
    clock.advance(120)  # ...but the account has now expired
    with refused_once(api, reason="account_expired", account_id=account.id, failures_counted=True):
        assert api.sign(token, key["name"], DIGEST).status_code == 401
    newest = api.http.get(
        "/api/v1/audit/events", params={"order": "desc", "limit": 1}, headers=api.admin
    )
    event = api.ok(newest)["events"][0]
    assert event["reason"] == "account_expired"
    assert event["tsg_id"] == tsg["id"], "the refusal is recorded in the account's TSG"
    with refused_once(api, reason="client_expired"):
        assert (
            api.token_response(
                account.credentials().assertion(api.issuer, now=clock.now().timestamp())
            ).status_code
            == 400
        )
    shown = api.ok(api.http.get(f"/api/v1/accounts/{account.id}", headers=api.admin))
    assert shown["status"] == "expired"


def test_assertion_expiry_follows_the_server_clock(
    api: Api, tsg: dict[str, Any], clock: FakeClock
) -> None:
    account = api.create_account(tsg["id"])
    assertion = account.credentials().assertion(api.issuer)  # exp = now + 60 s
    clock.advance(121)  # beyond exp plus the 60 s skew
    with refused_once(api, reason="assertion_expired"):
        assert api.token_response(assertion).status_code == 400


def test_token_endpoint_requires_form_encoding_and_the_jwt_bearer_grant(
    api: Api, tsg: dict[str, Any]
) -> None:
    account: Account = api.create_account(tsg["id"])
    assertion = account.credentials().assertion(api.issuer)
    with refused_once(api, reason="unsupported_media_type"):
        r = api.http.post("/api/v1/oauth/token", json={"grant_type": "x", "assertion": assertion})
        assert r.status_code == 415
    with refused_once(api, reason="unsupported_grant_type"):
        r = api.http.post(
            "/api/v1/oauth/token", data={"grant_type": "client_credentials", "assertion": assertion}
        )
        assert r.status_code == 400
        assert r.json()["error"] == "unsupported_grant_type"
    with refused_once(api, reason="invalid_request"):
        r = api.http.post(
            "/api/v1/oauth/token",
            data={"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer"},
        )
        assert r.json()["error"] == "invalid_request"
    with refused_once(api, reason="invalid_request"):
        r = api.http.post(
            "/api/v1/oauth/token",
            content=f"grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion={assertion}&assertion={assertion}",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert r.status_code == 400
    # The untouched assertion still works: refusals did not spend its jti.
    assert api.token_response(assertion).status_code == 200


@pytest.mark.parametrize(
    "garbage", ["", "a.b", "a.b.c", "x" * 9000, "eyJhbGciOiJFUzI1NiJ9.e30.AAAA"]
)
def test_garbage_assertions_are_refused_cleanly(api: Api, garbage: str) -> None:
    response = api.token_response(garbage)
    assert response.status_code == 400
    assert response.json()["error"] in ("invalid_grant", "invalid_request")
    assert "access_token" not in response.json()


def test_access_token_carries_the_account_tsg(api: Api, tsg: dict[str, Any]) -> None:
    account = api.create_account(tsg["id"])
    claims = jwt.decode(api.access_token(account), options={"verify_signature": False})
    assert claims["tsg"] == tsg["id"]
    assert claims["sub"] == account.client_id
    assert claims["exp"] - claims["iat"] == 900
    header = jwt.get_unverified_header(api.access_token(account))
    assert header["typ"] == "at+jwt"
