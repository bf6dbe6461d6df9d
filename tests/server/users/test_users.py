"""Users, API tokens and role bindings: TSG-scoped, inherited downwards, deny by default."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from argon2 import PasswordHasher
from fastapi.testclient import TestClient
from sqlalchemy import select

from signery.server.persistence.db import make_engine
from signery.server.users.models import ApiTokenRow, UserRow
from signery.server.users.service import parse_api_token
from tests.server.keys.lifecycle_helpers import services_of
from tests.support import Api, Installation, refused_once


def basic(username: str, password: str) -> dict[str, str]:
    return {
        "Authorization": "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()
    }


class Person:
    def __init__(self, api: Api, tsg_id: str, role: str | None, bind_at: str | None = None) -> None:
        self.password = "correct horse battery staple"
        user = api.ok(
            api.http.post(
                "/api/v1/users",
                json={"username": api.unique("user"), "password": self.password, "tsg_id": tsg_id},
                headers=api.admin,
            ),
            201,
        )
        self.id, self.username = user["id"], user["username"]
        if role:
            api.ok(
                api.http.post(
                    "/api/v1/role-bindings",
                    json={"principal_id": self.id, "role": role, "tsg_id": bind_at or tsg_id},
                    headers=api.admin,
                ),
                201,
            )
        token = api.ok(
            api.http.post(
                "/api/v1/users/me/tokens",
                json={"name": "t"},
                headers=basic(self.username, self.password),
            ),
            201,
        )
        self.token = token["token"]
        self.token_id = token["id"]

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@pytest.fixture(scope="module")
def tree(api: Api) -> dict[str, dict[str, Any]]:
    """root -> org -> {team, team/sub}; org2 is a sibling of org."""
    org = api.create_tsg()
    team = api.create_tsg(parent=org["id"])
    sub = api.create_tsg(parent=team["id"])
    org2 = api.create_tsg()
    return {"org": org, "team": team, "sub": sub, "org2": org2}


def test_secrets_are_stored_only_as_hashes(
    api: Api, installation: Installation, tree: dict[str, Any]
) -> None:
    person = Person(api, tree["org"]["id"], "key_viewer")
    engine = make_engine(installation.settings.resolved_database_url, pool_size=1)
    try:
        with engine.connect() as conn:
            user = conn.execute(
                select(UserRow.__table__).where(UserRow.__table__.c.id == person.id)
            ).one()
            token = conn.execute(
                select(ApiTokenRow.__table__).where(ApiTokenRow.__table__.c.id == person.token_id)
            ).one()
    finally:
        engine.dispose()
    assert user.password_hash.startswith("$argon2id$")
    assert person.password not in user.password_hash
    parsed = parse_api_token(person.token)  # the secret may itself contain "_"
    assert parsed is not None
    assert len(parsed.secret) >= 43
    assert parsed.secret not in token.secret_hash
    assert len(token.secret_hash) == 64


def test_a_role_reaches_its_subtree_only(api: Api, tree: dict[str, Any]) -> None:
    viewer = Person(api, tree["team"]["id"], "key_viewer")
    keys = {
        name: api.create_key(tree[name]["id"], "EC_P256", ca="none")
        for name in ("org", "team", "sub", "org2")
    }
    listed = {k["id"] for k in api.ok(api.http.get("/api/v1/keys", headers=viewer.headers))}
    assert keys["team"]["id"] in listed
    assert keys["sub"]["id"] in listed
    assert keys["org"]["id"] not in listed
    assert keys["org2"]["id"] not in listed
    for name in ("org", "org2"):
        with refused_once(api, reason="key_not_found"):
            r = api.http.get(f"/api/v1/keys/{keys[name]['id']}", headers=viewer.headers)
            assert r.status_code == 404, "objects outside the subtree do not exist for the caller"
    tsgs = {t["id"] for t in api.ok(api.http.get("/api/v1/tsgs", headers=viewer.headers))}
    assert tsgs == {tree["team"]["id"], tree["sub"]["id"]}


def test_a_viewer_may_look_but_not_create(api: Api, tree: dict[str, Any]) -> None:
    viewer = Person(api, tree["team"]["id"], "key_viewer")
    body = {"name": api.unique("k"), "tsg_id": tree["team"]["id"], "algorithm": "EC_P256"}
    with refused_once(api, reason="permission_denied"):
        assert api.http.post("/api/v1/keys", json=body, headers=viewer.headers).status_code == 403
    body["tsg_id"] = tree["org2"]["id"]
    with refused_once(api, reason="tsg_not_found"):
        assert api.http.post("/api/v1/keys", json=body, headers=viewer.headers).status_code == 404


def test_key_admin_creates_keys_in_its_subtree_only(api: Api, tree: dict[str, Any]) -> None:
    admin = Person(api, tree["team"]["id"], "key_admin")
    body = {
        "name": api.unique("k"),
        "tsg_id": tree["sub"]["id"],
        "algorithm": "EC_P256",
        "certificate_authority": "builtin",
    }
    created = api.ok(api.http.post("/api/v1/keys", json=body, headers=admin.headers), 201)
    assert created["tsg_id"] == tree["sub"]["id"]
    body["tsg_id"] = tree["org"]["id"]
    assert api.http.post("/api/v1/keys", json=body, headers=admin.headers).status_code == 404
    # No role to manage accounts: visible TSG, so 403 rather than 404.
    r = api.http.post(
        "/api/v1/accounts", json={"name": "x", "tsg_id": tree["team"]["id"]}, headers=admin.headers
    )
    assert r.status_code == 403


def test_account_admin_and_auditor(api: Api, tree: dict[str, Any]) -> None:
    account_admin = Person(api, tree["team"]["id"], "account_admin")
    created = api.ok(
        api.http.post(
            "/api/v1/accounts",
            json={"name": api.unique("a"), "tsg_id": tree["team"]["id"]},
            headers=account_admin.headers,
        ),
        201,
    )
    auditor = Person(api, tree["team"]["id"], "auditor")
    events = api.ok(
        api.http.get("/api/v1/audit/events", params={"limit": 1000}, headers=auditor.headers)
    )["events"]
    assert any(
        e["kind"] == "account.created" and e["details"]["account_id"] == created["id"]
        for e in events
    )
    assert all(e["tsg_id"] in (tree["team"]["id"], tree["sub"]["id"]) for e in events)
    assert (
        api.http.post("/api/v1/tsgs", json={"name": "no"}, headers=auditor.headers).status_code
        == 403
    )


def test_no_role_means_nothing(api: Api, tree: dict[str, Any]) -> None:
    nobody = Person(api, tree["team"]["id"], None)
    assert api.ok(api.http.get("/api/v1/keys", headers=nobody.headers)) == []
    assert api.ok(api.http.get("/api/v1/tsgs", headers=nobody.headers)) == []
    assert api.ok(api.http.get("/api/v1/audit/events", headers=nobody.headers))["events"] == []
    assert (
        api.http.get(f"/api/v1/tsgs/{tree['team']['id']}", headers=nobody.headers).status_code
        == 404
    )
    # ...but a user can always see themself and manage their own tokens.
    assert api.ok(api.http.get("/api/v1/users/me", headers=nobody.headers))["id"] == nobody.id


def test_only_superusers_bind_roles(api: Api, tree: dict[str, Any]) -> None:
    key_admin = Person(api, tree["team"]["id"], "key_admin")
    body = {"principal_id": key_admin.id, "role": "superuser", "tsg_id": tree["team"]["id"]}
    with refused_once(api, reason="permission_denied"):
        assert (
            api.http.post("/api/v1/role-bindings", json=body, headers=key_admin.headers).status_code
            == 403
        )
    local_super = Person(api, tree["team"]["id"], "superuser")
    assert (
        api.http.post("/api/v1/role-bindings", json=body, headers=local_super.headers).status_code
        == 201
    )
    body["tsg_id"] = tree["org"]["id"]  # above the local superuser's TSG
    assert (
        api.http.post("/api/v1/role-bindings", json=body, headers=local_super.headers).status_code
        == 404
    )


def test_unbinding_takes_effect_at_once(api: Api, tree: dict[str, Any]) -> None:
    person = Person(api, tree["team"]["id"], "key_viewer")
    assert api.http.get("/api/v1/tsgs", headers=person.headers).json() != []
    bindings = api.ok(
        api.http.get(
            "/api/v1/role-bindings", params={"tsg_id": tree["team"]["id"]}, headers=api.admin
        )
    )
    mine = next(b for b in bindings if b["principal_id"] == person.id)
    assert (
        api.http.delete(f"/api/v1/role-bindings/{mine['id']}", headers=api.admin).status_code == 204
    )
    assert api.ok(api.http.get("/api/v1/tsgs", headers=person.headers)) == []


def test_revoked_and_wrong_tokens_are_refused(api: Api, tree: dict[str, Any]) -> None:
    person = Person(api, tree["team"]["id"], "key_viewer")
    assert api.http.get("/api/v1/users/me", headers=person.headers).status_code == 200
    api.ok(api.http.delete(f"/api/v1/tokens/{person.token_id}", headers=person.headers))
    with refused_once(api, reason="invalid_token", kind="auth.authentication.failed"):
        assert api.http.get("/api/v1/users/me", headers=person.headers).status_code == 401
    wrong_secret = person.token[:-3] + "xyz"
    assert (
        api.http.get(
            "/api/v1/users/me", headers={"Authorization": f"Bearer {wrong_secret}"}
        ).status_code
        == 401
    )


def test_password_login_only_creates_tokens(api: Api, tree: dict[str, Any]) -> None:
    person = Person(api, tree["team"]["id"], "key_viewer")
    with refused_once(api, reason="invalid_credentials", kind="auth.authentication.failed"):
        r = api.http.post(
            "/api/v1/users/me/tokens",
            json={"name": "x"},
            headers=basic(person.username, "wrong password!"),
        )
        assert r.status_code == 401
    with refused_once(api, reason="invalid_credentials"):
        r = api.http.post(
            "/api/v1/users/me/tokens",
            json={"name": "x"},
            headers=basic("no-such-user", "whatever-it-is"),
        )
        assert r.status_code == 401
    with refused_once(api, reason="unauthenticated"):
        r = api.http.get("/api/v1/keys", headers=basic(person.username, person.password))
        assert r.status_code == 401


def test_missing_or_malformed_credentials(api: Api) -> None:
    for headers in (
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Token abc"},
        {"Authorization": "Bearer sgy_pat_zz"},
    ):
        r = api.http.get("/api/v1/tsgs", headers=headers)
        assert r.status_code == 401
        assert r.headers["content-type"] == "application/problem+json"


def test_generated_password_is_returned_once(api: Api, tree: dict[str, Any]) -> None:
    created = api.ok(
        api.http.post("/api/v1/users", json={"username": api.unique("gen")}, headers=api.admin), 201
    )
    assert len(created["password"]) >= 16
    shown = api.ok(api.http.get(f"/api/v1/users/{created['id']}", headers=api.admin))
    assert "password" not in shown
    token = api.http.post(
        "/api/v1/users/me/tokens",
        json={"name": "x"},
        headers=basic(created["username"], created["password"]),
    )
    assert token.status_code == 201


def test_duplicate_username_conflicts(api: Api) -> None:
    name = api.unique("dup")
    api.ok(api.http.post("/api/v1/users", json={"username": name}, headers=api.admin), 201)
    r = api.http.post("/api/v1/users", json={"username": name}, headers=api.admin)
    assert r.status_code == 409
    assert r.json()["code"] == "name_taken"


def test_validation_errors_never_echo_secrets(api: Api) -> None:
    r = api.http.post(
        "/api/v1/users",
        json={"username": "bad name!", "password": "short-secret"},
        headers=api.admin,
    )
    assert r.status_code == 400
    assert r.json()["code"] == "validation_failed"
    assert "short-secret" not in r.text


def test_token_secrets_may_contain_underscores() -> None:
    """token_urlsafe() secrets contain "_" now and then; only the first one after
    the id separates id and secret."""
    parsed = parse_api_token("sgy_pat_0123456789abcdef_a_b_c")
    assert parsed is not None
    assert (parsed.token_id, parsed.secret) == ("0123456789abcdef", "a_b_c")
    assert parse_api_token("sgy_pat_0123456789abcdeg_x") is None  # not hex
    assert parse_api_token("sgy_pat_0123456789abcdef") is None  # no secret


class CountingHasher(PasswordHasher):
    """The real argon2id hasher, counting the hashes it makes."""

    def __init__(self) -> None:
        super().__init__(time_cost=1, memory_cost=8, parallelism=1)
        self.hashes = 0

    def hash(self, password: str | bytes, *, salt: bytes | None = None) -> str:
        self.hashes += 1
        return super().hash(password, salt=salt)


def test_user_creation_is_authorized_before_the_password_is_hashed(
    api: Api, app_client: TestClient, tree: dict[str, Any]
) -> None:
    """A caller without user.manage must not make the server run argon2 (64 MiB) per
    request: the refusal comes first."""
    users = services_of(app_client).users
    viewer = Person(api, tree["team"]["id"], "key_viewer")
    real, counting = users._hasher, CountingHasher()
    users._hasher = counting
    try:
        for tsg in (tree["team"]["id"], tree["org2"]["id"]):
            body = {"username": api.unique("u"), "password": "x" * 16, "tsg_id": tsg}
            refused = api.http.post("/api/v1/users", json=body, headers=viewer.headers)
            assert refused.status_code in (403, 404), refused.text
        assert counting.hashes == 0
        body = {"username": api.unique("u"), "tsg_id": tree["team"]["id"]}
        api.ok(api.http.post("/api/v1/users", json=body, headers=api.admin), 201)
        assert counting.hashes == 1
    finally:
        users._hasher = real
