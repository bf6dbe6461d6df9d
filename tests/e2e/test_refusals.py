"""Every refusal the foundation issue lists, against a real `signery serve` process.

Each test asserts the refusal contract (tests.support.refused_once): nothing
signed or issued, no success counted, exactly one audit event with the reason
code, and the server still ready afterwards. Runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization

from tests.support import Account, Api, assertion_claims, b64url, raw_jwt, refused_once

pytestmark = pytest.mark.e2e

DIGEST = hashlib.sha256(b"artifact").digest()


@pytest.fixture(scope="module")
def world(server_api: Api) -> dict[str, Any]:
    api = server_api
    tsg_a = api.create_tsg()
    tsg_b = api.create_tsg()
    ec_account = api.create_account(tsg_a["id"])
    rsa_account = api.create_account(tsg_a["id"], key_algorithm="RSA_3072")
    return {
        "tsg_a": tsg_a,
        "tsg_b": tsg_b,
        "ec_account": ec_account,
        "rsa_account": rsa_account,
        "ec_key": api.create_key(tsg_a["id"], "EC_P256"),
        "rsa_key": api.create_key(tsg_a["id"], "RSA_2048", ca="none"),
        "sibling_key": api.create_key(tsg_b["id"], "EC_P256"),
    }


def public_pem(account: Account) -> bytes:
    key = serialization.load_pem_private_key(account.private_key_pem.encode(), None)
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def assert_no_token(response: httpx.Response, code: str) -> None:
    assert response.status_code == 400, response.text
    body = response.json()
    assert response.headers["content-type"].startswith("application/problem+json")
    assert body["code"] == code
    assert body["error"] == "invalid_grant"
    assert "access_token" not in body
    assert response.headers["cache-control"] == "no-store"


def assert_no_signature(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == code
    assert "signature" not in body
    assert response.headers["content-type"].startswith("application/problem+json")


# ------------------------------------------------------------------ token endpoint


def test_assertion_with_alg_none_is_refused(server_api: Api, world: dict[str, Any]) -> None:
    account: Account = world["ec_account"]
    token = raw_jwt(
        {"alg": "none", "typ": "JWT"}, assertion_claims(account.client_id, server_api.issuer)
    )
    with refused_once(server_api, reason="assertion_algorithm_refused", kind="auth.token.refused"):
        assert_no_token(server_api.token_response(token), "assertion_algorithm_refused")


@pytest.mark.parametrize("account_name", ["ec_account", "rsa_account"])
def test_assertion_hmac_signed_with_the_public_key_is_refused(
    server_api: Api, world: dict[str, Any], account_name: str
) -> None:
    """The classic algorithm-confusion attack: HS256 keyed with the PEM public key."""
    account: Account = world[account_name]
    token = raw_jwt(
        {"alg": "HS256", "typ": "JWT"},
        assertion_claims(account.client_id, server_api.issuer),
        hmac_key=public_pem(account),
    )
    with refused_once(server_api, reason="assertion_algorithm_refused"):
        assert_no_token(server_api.token_response(token), "assertion_algorithm_refused")


@pytest.mark.parametrize(
    "audience",
    [
        pytest.param(lambda issuer: issuer[:-3], id="prefix"),
        pytest.param(lambda issuer: [issuer], id="array"),
        pytest.param(lambda issuer: issuer + "/", id="trailing-slash"),
        pytest.param(lambda issuer: [issuer, "https://other.example"], id="array-with-other"),
    ],
)
def test_wrong_audience_is_refused(server_api: Api, world: dict[str, Any], audience: Any) -> None:
    account: Account = world["ec_account"]
    claims = assertion_claims(account.client_id, audience(server_api.issuer))
    token = _sign_claims(account, claims)
    with refused_once(server_api, reason="assertion_audience_mismatch", account_id=None):
        assert_no_token(server_api.token_response(token), "assertion_audience_mismatch")


def test_assertion_living_longer_than_five_minutes_is_refused(
    server_api: Api, world: dict[str, Any]
) -> None:
    account: Account = world["ec_account"]
    token = _sign_claims(
        account, assertion_claims(account.client_id, server_api.issuer, lifetime=301)
    )
    with refused_once(server_api, reason="assertion_lifetime_too_long"):
        assert_no_token(server_api.token_response(token), "assertion_lifetime_too_long")


def test_assertion_of_exactly_five_minutes_is_accepted(
    server_api: Api, world: dict[str, Any]
) -> None:
    account: Account = world["ec_account"]
    token = _sign_claims(
        account, assertion_claims(account.client_id, server_api.issuer, lifetime=300)
    )
    assert server_api.token_response(token).status_code == 200


def test_replayed_jti_is_refused(server_api: Api, world: dict[str, Any]) -> None:
    account: Account = world["ec_account"]
    assertion = account.credentials().assertion(server_api.issuer)
    assert server_api.token_response(assertion).status_code == 200
    with refused_once(server_api, reason="assertion_replayed"):
        assert_no_token(server_api.token_response(assertion), "assertion_replayed")


def test_concurrent_replay_yields_exactly_one_token(server_api: Api, world: dict[str, Any]) -> None:
    account: Account = world["ec_account"]
    assertion = account.credentials().assertion(server_api.issuer)
    seq = server_api.last_seq()
    barrier = threading.Barrier(8)
    responses: list[httpx.Response] = []
    lock = threading.Lock()

    def attempt() -> None:
        with httpx.Client(base_url=str(server_api.http.base_url), timeout=30) as http:
            barrier.wait()
            r = http.post(
                "/api/v1/oauth/token",
                data={
                    "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
                    "assertion": assertion,
                },
            )
        with lock:
            responses.append(r)

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = [r for r in responses if r.status_code == 200]
    assert len(ok) == 1, [r.status_code for r in responses]
    for r in responses:
        if r.status_code != 200:
            assert_no_token(r, "assertion_replayed")
    kinds = sorted((e["kind"], e["reason"]) for e in server_api.events_after(seq))
    assert kinds == sorted(
        [("auth.token.issued", None)] + [("auth.token.refused", "assertion_replayed")] * 7
    )


def test_tampered_payload_is_refused(server_api: Api, world: dict[str, Any]) -> None:
    account: Account = world["ec_account"]
    header, payload, signature = account.credentials().assertion(server_api.issuer).split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["exp"] += 30  # still within 5 minutes; only the signature can tell
    tampered = f"{header}.{b64url(json.dumps(claims).encode())}.{signature}"
    with refused_once(server_api, reason="assertion_signature_invalid"):
        assert_no_token(server_api.token_response(tampered), "assertion_signature_invalid")


def test_assertion_signed_by_another_key_is_refused(server_api: Api, world: dict[str, Any]) -> None:
    victim: Account = world["ec_account"]
    attacker: Account = server_api.create_account(world["tsg_a"]["id"])
    claims = assertion_claims(victim.client_id, server_api.issuer)
    with refused_once(server_api, reason="assertion_signature_invalid"):
        assert_no_token(
            server_api.token_response(_sign_claims(attacker, claims)), "assertion_signature_invalid"
        )


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"sub": "00000000-0000-0000-0000-000000000000"}, "assertion_claims_invalid"),
        ({"jti": None}, "assertion_claims_invalid"),
        ({"exp": None}, "assertion_claims_invalid"),
        ({"iat_offset": 120}, "assertion_expired"),
        ({"iat_offset": -400}, "assertion_expired"),
    ],
    ids=["sub-differs", "no-jti", "no-exp", "iat-in-future", "expired"],
)
def test_invalid_claims_are_refused(
    server_api: Api, world: dict[str, Any], change: dict[str, Any], reason: str
) -> None:
    account: Account = world["ec_account"]
    change = dict(change)
    claims = assertion_claims(
        account.client_id, server_api.issuer, iat_offset=change.pop("iat_offset", 0)
    )
    for name, value in change.items():
        if value is None:
            del claims[name]
        else:
            claims[name] = value
    with refused_once(server_api, reason=reason):
        assert_no_token(server_api.token_response(_sign_claims(account, claims)), reason)


def test_unknown_client_is_refused(server_api: Api, world: dict[str, Any]) -> None:
    account: Account = world["ec_account"]
    claims = assertion_claims("11111111-2222-3333-4444-555555555555", server_api.issuer)
    with refused_once(server_api, reason="unknown_client"):
        assert_no_token(server_api.token_response(_sign_claims(account, claims)), "unknown_client")


# ------------------------------------------------------------------ disabled account


def test_disabled_account_gets_no_token_and_its_tokens_stop_at_once(
    server_api: Api, world: dict[str, Any]
) -> None:
    account = server_api.create_account(world["tsg_a"]["id"])
    token = server_api.access_token(account)
    key = world["ec_key"]
    assert server_api.sign(token, key["name"], DIGEST).status_code == 200
    server_api.ok(
        server_api.http.post(f"/api/v1/accounts/{account.id}/disable", headers=server_api.admin)
    )

    with refused_once(
        server_api,
        reason="account_disabled",
        kind="signing.sign.denied",
        account_id=account.id,
        failures_counted=True,
    ):
        response = server_api.sign(token, key["name"], DIGEST)
        assert_no_signature(response, 401, "account_disabled")
        assert response.headers["www-authenticate"].startswith("Bearer")
    with refused_once(server_api, reason="client_disabled", kind="auth.token.refused"):
        assert_no_token(
            server_api.token_response(account.credentials().assertion(server_api.issuer)),
            "client_disabled",
        )

    server_api.ok(
        server_api.http.post(f"/api/v1/accounts/{account.id}/enable", headers=server_api.admin)
    )
    # Enabling it again revives none of the tokens issued before the disable
    # (issue 12, item 18): the account signs again with a new one.
    assert_no_signature(server_api.sign(token, key["name"], DIGEST), 401, "invalid_token")
    fresh = server_api.access_token(account)
    assert server_api.sign(fresh, key["name"], DIGEST).status_code == 200


# ------------------------------------------------------------------ signing plane


@pytest.fixture(scope="module")
def ec_token(server_api: Api, world: dict[str, Any]) -> str:
    return server_api.access_token(world["ec_account"])


def test_key_in_a_sibling_tsg_is_not_found(
    server_api: Api, world: dict[str, Any], ec_token: str
) -> None:
    account: Account = world["ec_account"]
    sibling = world["sibling_key"]
    for ref in (sibling["name"], sibling["id"]):
        with refused_once(
            server_api, reason="key_not_found", account_id=account.id, failures_counted=True
        ):
            assert_no_signature(server_api.sign(ec_token, ref, DIGEST), 404, "key_not_found")
    # Indistinguishable from a key that does not exist at all:
    missing = server_api.sign(ec_token, "no-such-key", DIGEST).json()
    found = server_api.sign(ec_token, sibling["name"], DIGEST).json()
    assert {k: v for k, v in missing.items() if k not in ("request_id", "instance")} == {
        k: v for k, v in found.items() if k not in ("request_id", "instance")
    }


@pytest.mark.parametrize("length", [0, 31, 33, 48, 64])
def test_digest_of_the_wrong_length_is_refused(
    server_api: Api, world: dict[str, Any], ec_token: str, length: int
) -> None:
    account: Account = world["ec_account"]
    key = world["ec_key"]
    with refused_once(
        server_api,
        reason="digest_length_mismatch",
        account_id=account.id,
        key_id=key["id"],
        failures_counted=True,
    ):
        assert_no_signature(
            server_api.sign(ec_token, key["name"], b"\x01" * length), 400, "digest_length_mismatch"
        )


B64_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
CANONICAL = base64.b64encode(DIGEST).decode()  # 43 characters and one "=" for 32 bytes
SHA384 = hashlib.sha384(b"artifact").digest()  # 48 bytes: 64 characters, no padding
URL_SAFE_DIGEST = hashlib.sha256(b"artifact 7").digest()  # its base64 has a "+" or a "/"


def _trailing_bits_set(canonical: str) -> str:
    """The last character before the "=" carries 2 unused bits; set one of them."""
    last = B64_ALPHABET.index(canonical[-2])
    return canonical[:-2] + B64_ALPHABET[last | 1] + "="


@pytest.mark.parametrize(
    ("digest_algorithm", "encoded"),
    [
        pytest.param("sha256", _trailing_bits_set(CANONICAL), id="unused-trailing-bits-set"),
        pytest.param("sha256", CANONICAL.rstrip("="), id="missing-padding"),
        pytest.param("sha384", base64.b64encode(SHA384).decode() + "====", id="excess-padding"),
        pytest.param(
            "sha256", base64.urlsafe_b64encode(URL_SAFE_DIGEST).decode(), id="url-safe-alphabet"
        ),
        pytest.param("sha256", CANONICAL[:20] + "\n" + CANONICAL[20:], id="embedded-newline"),
        pytest.param("sha256", CANONICAL[:20] + "\x00" + CANONICAL[20:], id="embedded-nul"),
        pytest.param("sha256", " " + CANONICAL, id="leading-space"),
    ],
)
def test_a_digest_not_in_canonical_base64_is_refused(
    server_api: Api, world: dict[str, Any], ec_token: str, digest_algorithm: str, encoded: str
) -> None:
    """Regression: bytes have one base64 spelling (RFC 4648 §3.5: the unused bits
    are zero). A digest with its unused bits set was signed as if it were the
    canonical one, so the audit trail and the request disagreed on what was sent."""
    assert set("-_") & set(base64.urlsafe_b64encode(URL_SAFE_DIGEST).decode())
    account: Account = world["ec_account"]
    key = world["ec_key"]
    with refused_once(
        server_api,
        reason="invalid_digest_encoding",
        account_id=account.id,
        key_id=key["id"],
        failures_counted=True,
    ):
        response = server_api.http.post(
            f"/api/v1/signing/keys/{key['name']}/sign",
            json={"digest": encoded, "digest_algorithm": digest_algorithm, "scheme": "ecdsa"},
            headers={"Authorization": f"Bearer {ec_token}"},
        )
        assert_no_signature(response, 400, "invalid_digest_encoding")


def test_unknown_scheme_is_refused(server_api: Api, world: dict[str, Any], ec_token: str) -> None:
    account: Account = world["ec_account"]
    key = world["ec_key"]
    with refused_once(
        server_api,
        reason="unsupported_scheme",
        account_id=account.id,
        key_id=key["id"],
        failures_counted=True,
    ):
        assert_no_signature(
            server_api.sign(ec_token, key["name"], DIGEST, scheme="ecdsa-raw"),
            400,
            "unsupported_scheme",
        )


@pytest.mark.parametrize("scheme", ["rsa-pkcs1v15", "rsa-pss"])
def test_rsa_scheme_on_an_ec_key_is_refused(
    server_api: Api, world: dict[str, Any], ec_token: str, scheme: str
) -> None:
    account: Account = world["ec_account"]
    key = world["ec_key"]
    with refused_once(
        server_api,
        reason="scheme_not_allowed",
        account_id=account.id,
        key_id=key["id"],
        failures_counted=True,
    ):
        assert_no_signature(
            server_api.sign(ec_token, key["name"], DIGEST, scheme=scheme), 400, "scheme_not_allowed"
        )


def test_ecdsa_on_an_rsa_key_is_refused(
    server_api: Api, world: dict[str, Any], ec_token: str
) -> None:
    account: Account = world["ec_account"]
    key = world["rsa_key"]
    with refused_once(
        server_api,
        reason="scheme_not_allowed",
        account_id=account.id,
        key_id=key["id"],
        failures_counted=True,
    ):
        assert_no_signature(
            server_api.sign(ec_token, key["name"], DIGEST, scheme="ecdsa"),
            400,
            "scheme_not_allowed",
        )


def test_oversize_body_is_refused(server_api: Api, world: dict[str, Any], ec_token: str) -> None:
    key = world["ec_key"]
    body = json.dumps({"digest": "A" * 40_000, "digest_algorithm": "sha256", "scheme": "ecdsa"})
    with refused_once(server_api, reason="request_too_large"):
        response = server_api.http.post(
            f"/api/v1/signing/keys/{key['name']}/sign",
            content=body,
            headers={"Authorization": f"Bearer {ec_token}", "Content-Type": "application/json"},
        )
        assert_no_signature(response, 413, "request_too_large")


def test_oversize_chunked_body_is_refused(
    server_api: Api, world: dict[str, Any], ec_token: str
) -> None:
    """No Content-Length: the limit is enforced while reading."""
    key = world["ec_key"]

    def chunks() -> Any:
        for _ in range(64):
            yield b"x" * 1024

    with refused_once(server_api, reason="request_too_large"):
        response = server_api.http.post(
            f"/api/v1/signing/keys/{key['name']}/sign",
            content=chunks(),
            headers={"Authorization": f"Bearer {ec_token}", "Content-Type": "application/json"},
        )
        assert_no_signature(response, 413, "request_too_large")


@pytest.mark.parametrize("body", [b"{not json", b"", b"[1, 2", b'{"digest": "AAAA"'])
def test_malformed_json_is_refused(
    server_api: Api, world: dict[str, Any], ec_token: str, body: bytes
) -> None:
    account: Account = world["ec_account"]
    key = world["ec_key"]
    with refused_once(
        server_api,
        reason="malformed_json",
        account_id=account.id,
        key_id=key["id"],
        failures_counted=True,
    ):
        response = server_api.http.post(
            f"/api/v1/signing/keys/{key['name']}/sign",
            content=body,
            headers={"Authorization": f"Bearer {ec_token}", "Content-Type": "application/json"},
        )
        assert_no_signature(response, 400, "malformed_json")


def test_bad_bearer_token_is_refused(server_api: Api, world: dict[str, Any], ec_token: str) -> None:
    key = world["ec_key"]
    forged = ec_token[:-4] + ("AAAA" if not ec_token.endswith("AAAA") else "BBBB")
    with refused_once(server_api, reason="invalid_token", kind="auth.authentication.failed"):
        assert_no_signature(server_api.sign(forged, key["name"], DIGEST), 401, "invalid_token")


def test_management_token_cannot_sign(server_api: Api, world: dict[str, Any]) -> None:
    key = world["ec_key"]
    with refused_once(server_api, reason="invalid_token"):
        assert_no_signature(
            server_api.sign(server_api.admin_token, key["name"], DIGEST), 401, "invalid_token"
        )


def test_events_record_the_real_peer_address(server_api: Api, world: dict[str, Any]) -> None:
    """Regression: a server handed a bare file descriptor took its TCP socket for a
    UNIX one, lost client addresses (and TCP_NODELAY)."""
    token = server_api.access_token(world["ec_account"])
    seq = server_api.last_seq()
    assert server_api.sign(token, world["ec_key"]["name"], DIGEST).status_code == 200
    [event] = server_api.events_after(seq)
    assert event["client_ip"] == "127.0.0.1"


def _sign_claims(account: Account, claims: dict[str, Any]) -> str:
    import jwt

    key = serialization.load_pem_private_key(account.private_key_pem.encode(), None)
    return jwt.encode(claims, key, algorithm="ES256")  # type: ignore[arg-type]
