"""Acting on another user's credentials (API tokens) and role bindings never
reaches beyond the caller: the caller must hold, at every TSG where the target
has a role, at least that role's permissions (issue 12, item 1)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.server.users.test_users import Person
from tests.support import Api, refused_once

ESCALATION = "authz.escalation.refused"


@pytest.fixture(scope="module")
def tsgs(api: Api) -> dict[str, Any]:
    """root -> a -> a_child; b is a sibling of a."""
    a = api.create_tsg()
    return {"a": a, "a_child": api.create_tsg(parent=a["id"]), "b": api.create_tsg()}


def bind(api: Api, person: Person, role: str, tsg_id: str) -> dict[str, Any]:
    return api.ok(  # type: ignore[no-any-return]
        api.http.post(
            "/api/v1/role-bindings",
            json={"principal_id": person.id, "role": role, "tsg_id": tsg_id},
            headers=api.admin,
        ),
        201,
    )


def tokens_of(api: Api, person: Person) -> list[dict[str, Any]]:
    return api.ok(api.http.get(f"/api/v1/users/{person.id}/tokens", headers=api.admin))  # type: ignore[no-any-return]


def test_a_subtree_superuser_cannot_mint_a_token_for_a_user_whose_roles_reach_beyond_it(
    api: Api, tsgs: dict[str, Any]
) -> None:
    """The reported escalation, exactly: a superuser at A mints a token for a user
    homed in A who is auditor at the root and key_admin at the sibling B."""
    a, b = tsgs["a"]["id"], tsgs["b"]["id"]
    local_super = Person(api, a, "superuser")
    target = Person(api, a, "auditor", bind_at=api.root_tsg_id)
    bind(api, target, "key_admin", b)
    b_key = api.create_key(b, "EC_P256", ca="none")
    before = tokens_of(api, target)

    with refused_once(api, reason="privilege_escalation", kind=ESCALATION):
        r = api.http.post(
            f"/api/v1/users/{target.id}/tokens", json={"name": "x"}, headers=local_super.headers
        )
        assert r.status_code == 403, r.text
    problem = r.json()
    assert problem["code"] == "privilege_escalation"
    assert "token" not in problem
    # Nothing was minted, so nothing can read B: the caller's own credential
    # still sees neither B's keys nor B's audit trail.
    assert tokens_of(api, target) == before
    assert api.http.get(f"/api/v1/keys/{b_key['id']}", headers=local_super.headers).status_code == (
        404
    )
    events = api.ok(
        api.http.get("/api/v1/audit/events", params={"limit": 1000}, headers=local_super.headers)
    )["events"]
    assert all(e["tsg_id"] != b for e in events)
    # The target itself does read B (the credentials were worth stealing), and a
    # superuser at the root, who covers every role, may mint for it.
    assert api.http.get(f"/api/v1/keys/{b_key['id']}", headers=target.headers).status_code == 200
    api.ok(
        api.http.post(f"/api/v1/users/{target.id}/tokens", json={"name": "y"}, headers=api.admin),
        201,
    )


def test_the_refusal_is_audited_with_the_target_and_the_roles_not_covered(
    api: Api, tsgs: dict[str, Any]
) -> None:
    a, b = tsgs["a"]["id"], tsgs["b"]["id"]
    local_super = Person(api, a, "superuser")
    target = Person(api, a, "key_admin", bind_at=b)
    seq = api.last_seq()
    r = api.http.post(
        f"/api/v1/users/{target.username}/tokens", json={"name": "x"}, headers=local_super.headers
    )
    assert r.status_code == 403
    [event] = api.events_after(seq)
    assert event["kind"] == ESCALATION
    assert event["outcome"] == "denied"
    assert event["principal"]["id"] == local_super.id
    assert event["tsg_id"] == a, "recorded where the target lives, visible to the caller's auditors"
    assert event["details"] == {
        "action": "user.api_token.create",
        "user_id": target.id,
        "uncovered_roles": ["key_admin"],
    }
    # The detail does not name TSGs the caller cannot see.
    assert b not in r.text


def test_listing_and_revoking_the_tokens_of_a_wider_user_are_refused(
    api: Api, tsgs: dict[str, Any]
) -> None:
    a = tsgs["a"]["id"]
    local_super = Person(api, a, "superuser")
    target = Person(api, a, "superuser", bind_at=api.root_tsg_id)
    with refused_once(api, reason="privilege_escalation", kind=ESCALATION):
        r = api.http.get(f"/api/v1/users/{target.id}/tokens", headers=local_super.headers)
        assert r.status_code == 403
    with refused_once(api, reason="privilege_escalation", kind=ESCALATION):
        r = api.http.delete(f"/api/v1/tokens/{target.token_id}", headers=local_super.headers)
        assert r.status_code == 403
    assert api.http.get("/api/v1/users/me", headers=target.headers).status_code == 200, (
        "the token was not revoked"
    )


def test_users_within_the_callers_reach_are_managed_as_before(
    api: Api, tsgs: dict[str, Any]
) -> None:
    a, a_child = tsgs["a"]["id"], tsgs["a_child"]["id"]
    local_super = Person(api, a, "superuser")
    no_roles = Person(api, a, None)
    inside = Person(api, a, "key_admin")
    bind(api, inside, "auditor", a_child)
    peer = Person(api, a_child, "superuser", bind_at=a)  # the same reach as the caller
    for target in (no_roles, inside, peer):
        minted = api.ok(
            api.http.post(
                f"/api/v1/users/{target.id}/tokens", json={"name": "m"}, headers=local_super.headers
            ),
            201,
        )
        listed = api.ok(
            api.http.get(f"/api/v1/users/{target.id}/tokens", headers=local_super.headers)
        )
        assert minted["id"] in {t["id"] for t in listed}
        revoked = api.ok(
            api.http.delete(f"/api/v1/tokens/{minted['id']}", headers=local_super.headers)
        )
        assert revoked["revoked"] is True


def test_a_target_the_caller_cannot_see_stays_missing(api: Api, tsgs: dict[str, Any]) -> None:
    local_super = Person(api, tsgs["a"]["id"], "superuser")
    elsewhere = Person(api, tsgs["b"]["id"], "superuser", bind_at=api.root_tsg_id)
    with refused_once(api, reason="user_not_found"):
        r = api.http.post(
            f"/api/v1/users/{elsewhere.id}/tokens", json={"name": "x"}, headers=local_super.headers
        )
        assert r.status_code == 404
    with refused_once(api, reason="api_token_not_found"):
        r = api.http.delete(f"/api/v1/tokens/{elsewhere.token_id}", headers=local_super.headers)
        assert r.status_code == 404


def test_everyone_manages_their_own_tokens(api: Api, tsgs: dict[str, Any]) -> None:
    """A user's own credentials are never an escalation, whatever its roles."""
    person = Person(api, tsgs["a"]["id"], "key_viewer", bind_at=api.root_tsg_id)
    own = api.ok(
        api.http.post("/api/v1/users/me/tokens", json={"name": "own"}, headers=person.headers), 201
    )
    assert own["id"] in {
        t["id"] for t in api.ok(api.http.get("/api/v1/users/me/tokens", headers=person.headers))
    }
    api.ok(api.http.delete(f"/api/v1/tokens/{own['id']}", headers=person.headers))


def test_unbinding_within_reach_is_allowed_and_above_it_is_not_visible(
    api: Api, tsgs: dict[str, Any]
) -> None:
    """A binding is removed only by whoever could have granted it: a subtree
    superuser may remove a root superuser's binding at its own TSG, not the root
    binding of that user, though the user is homed in its subtree."""
    a = tsgs["a"]["id"]
    local_super = Person(api, a, "superuser")
    root_super = Person(api, a, "superuser", bind_at=api.root_tsg_id)
    at_a = bind(api, root_super, "approver", a)
    bindings = api.ok(
        api.http.get("/api/v1/role-bindings", params={"tsg_id": api.root_tsg_id}, headers=api.admin)
    )
    at_root = next(x for x in bindings if x["principal_id"] == root_super.id)
    with refused_once(api, reason="role_binding_not_found"):
        r = api.http.delete(f"/api/v1/role-bindings/{at_root['id']}", headers=local_super.headers)
        assert r.status_code == 404
    r = api.http.delete(f"/api/v1/role-bindings/{at_a['id']}", headers=local_super.headers)
    assert r.status_code == 204


def test_built_in_accounts_have_no_api_tokens(api: Api, tsgs: dict[str, Any]) -> None:
    account = api.create_account(tsgs["a"]["id"])
    bearer = {"Authorization": f"Bearer {api.access_token(account)}"}
    with refused_once(api, reason="permission_denied"):
        assert api.http.get("/api/v1/users/me/tokens", headers=bearer).status_code == 403
    with refused_once(api, reason="permission_denied"):
        r = api.http.post("/api/v1/users/me/tokens", json={"name": "x"}, headers=bearer)
        assert r.status_code == 403
