"""A key name resolves to the nearest key: the account's own TSG first, then its
descendants by depth; only keys at the same depth are ambiguous. A key whose name
would take over a deeper key that an account above resolves today is refused at
creation (``key_name_shadows``). SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
from typing import Any

import httpx
import pytest

from tests.server.users.test_users import Person
from tests.support import Api

DIGEST = hashlib.sha256(b"nearest key").digest()


@pytest.fixture(scope="module")
def parent(api: Api) -> dict[str, Any]:
    return api.create_tsg()


def signed_with(api: Api, token: str, name: str) -> str:
    """The id of the key that signed for ``name``."""
    return str(api.ok(api.sign(token, name, DIGEST))["key_id"])


def create_key_as(api: Api, who: Person, tsg_id: str, name: str) -> httpx.Response:
    return api.http.post(
        "/api/v1/keys",
        json={"name": name, "tsg_id": tsg_id, "algorithm": "EC_P256"},
        headers=who.headers,
    )


def test_a_child_key_of_the_same_name_does_not_break_the_parents_accounts(
    api: Api, parent: dict[str, Any]
) -> None:
    child = api.create_tsg(parent=parent["id"])
    name = api.unique("release")
    mine = api.create_key(parent["id"], name=name)
    parent_token = api.access_token(api.create_account(parent["id"]))
    assert signed_with(api, parent_token, name) == mine["id"]

    # The child's key admin makes a key of the same name in the child: allowed (it
    # shadows nothing: the parent's own key is nearer to the parent's accounts).
    child_admin = Person(api, child["id"], "key_admin")
    theirs = api.ok(create_key_as(api, child_admin, child["id"], name), 201)

    assert signed_with(api, parent_token, name) == mine["id"]
    child_token = api.access_token(api.create_account(child["id"]))
    assert signed_with(api, child_token, name) == theirs["id"]


def test_a_key_that_would_take_over_a_deeper_key_is_refused(
    api: Api, parent: dict[str, Any]
) -> None:
    team_a = api.create_tsg(parent=parent["id"])
    team_b = api.create_tsg(parent=parent["id"])
    deep = api.create_tsg(parent=team_b["id"])
    name = api.unique("release")
    deeper = api.create_key(deep["id"], name=name)
    parent_token = api.access_token(api.create_account(parent["id"]))
    assert signed_with(api, parent_token, name) == deeper["id"]

    # In team A the new key would be nearer to the parent's accounts than the one
    # they sign with today: they would silently sign with team A's key instead.
    team_a_admin = Person(api, team_a["id"], "key_admin")
    seq = api.last_seq()
    refused = create_key_as(api, team_a_admin, team_a["id"], name)
    assert refused.status_code == 409, refused.text
    assert refused.json()["code"] == "key_name_shadows"
    events = api.events_after(seq)
    assert [(e["kind"], e["reason"]) for e in events] == [("request.refused", "key_name_shadows")]
    # Nothing was made, and the parent's accounts sign as before.
    listed = api.ok(
        api.http.get("/api/v1/keys", params={"tsg_id": team_a["id"]}, headers=api.admin)
    )
    assert name not in {k["name"] for k in listed}
    assert signed_with(api, parent_token, name) == deeper["id"]

    # The same holds for the deep key's own parent: team B's accounts resolve it too.
    refused_b = create_key_as(api, Person(api, team_b["id"], "key_admin"), team_b["id"], name)
    assert refused_b.status_code == 409
    assert refused_b.json()["code"] == "key_name_shadows"
    # Deeper than the existing key, or beside it in its own TSG's subtree, is fine.
    below = api.create_tsg(parent=deep["id"])
    api.create_key(below["id"], name=name)
    assert signed_with(api, parent_token, name) == deeper["id"]


def test_keys_at_the_same_depth_stay_ambiguous_for_their_common_ancestor(
    api: Api, parent: dict[str, Any]
) -> None:
    left = api.create_tsg(parent=parent["id"])
    right = api.create_tsg(parent=parent["id"])
    name = api.unique("twin")
    first = api.create_key(left["id"], name=name)
    # Siblings choose their names freely: the second twin is not refused.
    second = api.create_key(right["id"], name=name)
    parent_token = api.access_token(api.create_account(parent["id"]))
    response = api.sign(parent_token, name, DIGEST)
    assert response.status_code == 409
    assert response.json()["code"] == "key_name_ambiguous"
    assert signed_with(api, parent_token, second["id"]) == second["id"]
    # An account in one twin's TSG resolves its own.
    left_token = api.access_token(api.create_account(left["id"]))
    assert signed_with(api, left_token, name) == first["id"]


def test_the_listing_says_how_far_each_key_is(api: Api, parent: dict[str, Any]) -> None:
    child = api.create_tsg(parent=parent["id"])
    name = api.unique("release")
    near = api.create_key(parent["id"], name=name)
    far = api.create_key(child["id"], name=name)
    token = api.access_token(api.create_account(parent["id"]))
    listed = api.ok(
        api.http.get("/api/v1/signing/keys", headers={"Authorization": f"Bearer {token}"})
    )
    distances = {k["id"]: k["distance"] for k in listed if k["name"] == name}
    assert distances == {near["id"]: 0, far["id"]: 1}
