"""What an unauthenticated caller can cost: failed sign-ins and refused token
requests are limited per source and per username, in the database; password
verifications are bounded per process."""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from signery.server.app import create_app
from tests.support import Api, Installation, assertion_claims, raw_jwt

RIGHT = "correct horse battery staple"


def basic(username: str, password: str) -> dict[str, str]:
    return {
        "Authorization": "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()
    }


@contextlib.contextmanager
def server_with(installation: Installation, **settings: Any) -> Iterator[Api]:
    """An in-process server of the module's installation with other settings."""
    app = create_app(installation.settings.model_copy(update=settings))
    with TestClient(app, base_url="http://signery.test") as client:
        yield Api(
            client,
            installation.admin_token,
            installation.init.issuer,
            installation.init.root_tsg_id,
        )


def new_user(api: Api) -> str:
    username = api.unique("user")
    api.ok(
        api.http.post(
            "/api/v1/users",
            json={"username": username, "password": RIGHT, "tsg_id": api.root_tsg_id},
            headers=api.admin,
        ),
        201,
    )
    return username


def sign_in(api: Api, username: str, password: str, source: str) -> httpx.Response:
    """A password sign-in (creating an API token) from the address ``source``."""
    return api.http.post(
        "/api/v1/users/me/tokens",
        json={"name": "t"},
        headers={**basic(username, password), "X-Forwarded-For": source},
    )


def assert_throttled(response: httpx.Response) -> None:
    assert response.status_code == 429, response.text
    assert response.json()["code"] == "too_many_failed_attempts"
    assert int(response.headers["retry-after"]) >= 1


@pytest.fixture(scope="module")
def limited(installation: Installation) -> Iterator[Api]:
    # The test client's address is "testclient"; as a trusted proxy it lets each
    # test speak from addresses of its own (X-Forwarded-For).
    with server_with(
        installation,
        trusted_proxies=["testclient"],
        auth_password_failures_per_user=3,
        auth_password_failures_per_source=5,
        auth_token_failures_per_source=3,
    ) as api:
        yield api


def test_failed_sign_ins_for_a_username_are_limited(limited: Api) -> None:
    """Regression: every Basic attempt ran argon2id, without any limit."""
    username = new_user(limited)
    for n in range(3):
        r = sign_in(limited, username, "wrong", f"192.0.2.{n + 1}")
        assert r.status_code == 401, r.text
    # From yet another address, and with the right password: the username waits.
    assert_throttled(sign_in(limited, username, RIGHT, "192.0.2.9"))
    # A username that is no user is limited alike (its existence does not show).
    for n in range(3):
        assert sign_in(limited, "nobody-" + username, "x", f"192.0.2.{n + 1}").status_code == 401
    assert_throttled(sign_in(limited, "nobody-" + username, "x", "192.0.2.10"))
    # Other users are not held back.
    assert sign_in(limited, new_user(limited), RIGHT, "192.0.2.11").status_code == 201


def test_a_right_password_is_never_counted(limited: Api) -> None:
    username = new_user(limited)
    for _ in range(6):
        assert sign_in(limited, username, RIGHT, "198.51.100.1").status_code == 201
    for _ in range(2):
        assert sign_in(limited, username, "wrong", "198.51.100.1").status_code == 401
    assert sign_in(limited, username, RIGHT, "198.51.100.1").status_code == 201


def test_failed_sign_ins_from_one_source_are_limited(limited: Api) -> None:
    for _ in range(5):
        r = sign_in(limited, new_user(limited), "wrong", "203.0.113.5")
        assert r.status_code == 401, r.text
    assert_throttled(sign_in(limited, new_user(limited), RIGHT, "203.0.113.5"))
    # IPv6: one source is a /64.
    for n in range(5):
        r = sign_in(limited, new_user(limited), "wrong", f"2001:db8:5:6::{n + 1}")
        assert r.status_code == 401, r.text
    assert_throttled(sign_in(limited, new_user(limited), RIGHT, "2001:db8:5:6:ffff::1"))
    assert sign_in(limited, new_user(limited), RIGHT, "2001:db8:5:7::1").status_code == 201


def token_request(api: Api, assertion: str, source: str) -> httpx.Response:
    return api.http.post(
        "/api/v1/oauth/token",
        data={"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion": assertion},
        headers={"X-Forwarded-For": source},
    )


def test_refused_token_requests_from_one_source_are_limited(limited: Api) -> None:
    """Regression: the token endpoint had no limit at all."""
    account = limited.create_account(limited.create_tsg()["id"])
    # A CI fleet behind one address fetching tokens: successes are never counted.
    for _ in range(8):
        good = account.credentials().assertion(limited.issuer)
        assert token_request(limited, good, "192.0.2.77").status_code == 200
    forged = raw_jwt(
        {"alg": "ES256", "typ": "JWT"},
        assertion_claims(account.client_id, limited.issuer),
        b"\x00" * 64,
    )
    for _ in range(3):
        r = token_request(limited, forged, "192.0.2.77")
        assert r.status_code == 400, r.text
        assert r.json()["code"] == "assertion_signature_invalid"
    refused = token_request(limited, account.credentials().assertion(limited.issuer), "192.0.2.77")
    assert_throttled(refused)
    assert refused.headers["cache-control"] == "no-store"
    assert refused.json()["error"]  # RFC 6749 §5.2: OAuth clients look for it
    # Another source is not held back.
    other = token_request(limited, account.credentials().assertion(limited.issuer), "192.0.2.78")
    assert other.status_code == 200
