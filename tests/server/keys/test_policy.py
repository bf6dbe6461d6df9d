"""Setting, reading and clearing a key's signing policy: names resolved to ids at
set time inside the TSG boundary, every value checked with a clear 400, the change
audited, the stored form the other parts of the product read. SQLite and PostgreSQL."""

from __future__ import annotations

import json
from typing import Any

import pytest
from sqlalchemy import select

from signery.server.keys.models import KeyUsageQuotaRow, SigningKeyRow
from signery.server.persistence.db import make_engine
from tests.server.users.test_users import Person
from tests.support import Api, Installation


@pytest.fixture(scope="module")
def tree(api: Api) -> dict[str, dict[str, Any]]:
    """org -> {team -> sub}; other is a sibling of org."""
    org = api.create_tsg()
    team = api.create_tsg(parent=org["id"])
    sub = api.create_tsg(parent=team["id"])
    other = api.create_tsg()
    return {"org": org, "team": team, "sub": sub, "other": other}


def put(api: Api, key: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
    return api.http.put(f"/api/v1/keys/{key}/policy", json=body, headers=headers or api.admin)


def stored(installation: Installation, key_id: str) -> dict[str, Any] | None:
    engine = make_engine(installation.settings.resolved_database_url, pool_size=1)
    try:
        with engine.connect() as conn:
            raw = conn.scalar(select(SigningKeyRow.policy_json).where(SigningKeyRow.id == key_id))
    finally:
        engine.dispose()
    return json.loads(raw) if raw else None


def quota_rows(installation: Installation, key_id: str) -> dict[str, int]:
    engine = make_engine(installation.settings.resolved_database_url, pool_size=1)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(KeyUsageQuotaRow.period, KeyUsageQuotaRow.used).where(
                    KeyUsageQuotaRow.key_id == key_id
                )
            ).all()
            return dict(rows)
    finally:
        engine.dispose()


def test_a_policy_is_stored_with_ids_and_shown_with_names(
    api: Api, installation: Installation, tree: dict[str, dict[str, Any]]
) -> None:
    key = api.create_key(tree["team"]["id"])
    builder = api.create_account(tree["team"]["id"])
    above = api.create_account(tree["org"]["id"])
    approver = Person(api, tree["team"]["id"], "approver")
    body = {
        "signers": [builder.name, above.id],
        "signer_tsgs": [tree["org"]["id"]],
        "allowed_schemes": ["ecdsa"],
        "allowed_digests": ["sha256", "sha384"],
        "client_ips": ["10.0.0.0/8", "2001:db8::/32"],
        "time_windows": [{"days": ["mon", "tue"], "start": "09:00", "end": "17:30"}],
        "timezone": "Europe/Berlin",
        "valid_from": "2020-01-01T00:00:00Z",
        "valid_until": "2099-01-01T00:00:00+01:00",
        "min_signing_version": 1,
        "approval": {"required": 1, "approvers": [approver.username], "grant_max_uses": 3},
    }
    seq = api.last_seq()
    shown = api.ok(put(api, key["id"], body))
    assert shown["signers"] == [builder.name, above.name]
    assert shown["approval"]["approvers"] == [approver.username]
    assert shown["timezone"] == "Europe/Berlin"

    raw = stored(installation, key["id"])
    assert raw is not None
    assert raw["signers"] == [builder.id, above.id]
    assert raw["signer_tsgs"] == [tree["org"]["id"]]
    assert raw["signer_tsg_paths"][0].endswith(f"/{tree['org']['id']}/")
    assert raw["approval"]["approvers"] == [approver.id]
    assert raw["min_signing_version"] == 1

    # The same names come back on GET /keys/{key}/policy and GET /keys/{key}.
    assert api.ok(api.http.get(f"/api/v1/keys/{key['id']}/policy", headers=api.admin)) == shown
    assert api.ok(api.http.get(f"/api/v1/keys/{key['id']}", headers=api.admin))["policy"] == shown

    [event] = [e for e in api.events_after(seq) if e["kind"] == "key.policy.updated"]
    assert event["key_id"] == key["id"]
    assert event["outcome"] == "succeeded"
    assert "signers" in event["details"]["rules"]
    assert "approval" in event["details"]["rules"]


def test_clearing_and_an_empty_policy_store_null(
    api: Api, installation: Installation, tree: dict[str, dict[str, Any]]
) -> None:
    key = api.create_key(tree["team"]["id"])
    api.ok(put(api, key["id"], {"allowed_digests": ["sha512"]}))
    assert stored(installation, key["id"]) == {"allowed_digests": ["sha512"], "timezone": "UTC"}
    seq = api.last_seq()
    assert api.http.delete(f"/api/v1/keys/{key['id']}/policy", headers=api.admin).status_code == 204
    assert stored(installation, key["id"]) is None
    assert api.ok(api.http.get(f"/api/v1/keys/{key['id']}/policy", headers=api.admin)) is None
    [event] = api.events_after(seq)
    assert event["kind"] == "key.policy.updated"
    assert event["details"]["rules"] == []
    assert event["details"]["previous_rules"] == ["allowed_digests"]

    assert api.ok(put(api, key["id"], {})) is None
    assert stored(installation, key["id"]) is None


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"client_ips": ["10.0.0.1/8"]}, "has host bits set"),
        ({"client_ips": ["not-an-ip"]}, "is not a CIDR range"),
        ({"timezone": "Mars/Olympus_Mons"}, "is not an IANA time zone"),
        ({"time_windows": [{"start": "09:00", "end": "09:00"}]}, "the window is empty"),
        ({"valid_from": "2030-01-01T00:00:00Z", "valid_until": "2029-01-01T00:00:00Z"}, "before"),
        ({"valid_from": "2030-01-01T00:00:00"}, "UTC offset"),
        ({"min_signing_version": 2}, "above the key's current version 1"),
        ({"approval": {"approvers": ["no-such-user-anywhere"]}}, "no user"),
        ({"signer_tsgs": ["1000000000"]}, "is neither the key's TSG nor a TSG above it"),
    ],
)
def test_invalid_values_are_refused_with_a_clear_message(
    api: Api, tree: dict[str, dict[str, Any]], body: dict[str, Any], message: str
) -> None:
    key = api.create_key(tree["team"]["id"])
    response = put(api, key["id"], body)
    assert response.status_code == 400, response.text
    assert response.json()["code"] == "invalid_policy"
    assert message in response.json()["detail"]


def test_malformed_policies_fail_validation(api: Api, tree: dict[str, dict[str, Any]]) -> None:
    key = api.create_key(tree["team"]["id"])
    for body in (
        {"time_windows": [{"start": "25:00"}]},
        {"allowed_digests": ["sha1"]},
        {"max_signatures_total": 0},
        {"approval": {"grant_max_uses": None, "grant_ttl_hours": None}},
        {"unknown_rule": True},
    ):
        response = put(api, key["id"], body)
        assert response.status_code == 400, (body, response.text)


def test_more_approvals_than_listed_approvers_is_refused(
    api: Api, tree: dict[str, dict[str, Any]]
) -> None:
    key = api.create_key(tree["team"]["id"])
    approver = Person(api, tree["team"]["id"], "approver")
    response = put(api, key["id"], {"approval": {"required": 2, "approvers": [approver.id]}})
    assert response.status_code == 400
    assert "only 1 approvers" in response.json()["detail"]


def test_signers_must_be_inside_the_keys_tsg_boundary(
    api: Api, tree: dict[str, dict[str, Any]]
) -> None:
    # An account reaches the keys of its TSG's subtree: for a key in team, the
    # accounts of team, org and the root. Others can never sign with it, so they
    # cannot be named (the answer is the same whether they exist or not).
    key = api.create_key(tree["team"]["id"])
    outside = api.create_account(tree["other"]["id"])
    below = api.create_account(tree["sub"]["id"])
    for ref in (outside.name, outside.id, below.name, below.id, "no-such-account"):
        response = put(api, key["id"], {"signers": [ref]})
        assert response.status_code == 400, response.text
        assert response.json()["code"] == "invalid_policy"
        assert "that can reach the key" in response.json()["detail"]
    for tsg in (tree["sub"]["id"], tree["other"]["id"]):
        response = put(api, key["id"], {"signer_tsgs": [tsg]})
        assert response.status_code == 400
        assert "is neither the key's TSG nor a TSG above it" in response.json()["detail"]
    assert api.ok(put(api, key["id"], {"signer_tsgs": [tree["team"]["id"], tree["org"]["id"]]}))


def test_an_ambiguous_signer_name_asks_for_the_id(
    api: Api, tree: dict[str, dict[str, Any]]
) -> None:
    key = api.create_key(tree["team"]["id"])
    name = api.unique("twin")
    first = api.create_account(tree["team"]["id"], name=name)
    second = api.create_account(tree["org"]["id"], name=name)
    response = put(api, key["id"], {"signers": [name]})
    assert response.status_code == 400
    assert "name it by its id" in response.json()["detail"]
    assert {c["id"] for c in response.json()["candidates"]} == {first.id, second.id}
    assert api.ok(put(api, key["id"], {"signers": [second.id]}))["signers"] == [name]


def test_only_key_managers_set_policies(api: Api, tree: dict[str, dict[str, Any]]) -> None:
    key = api.create_key(tree["team"]["id"])
    viewer = Person(api, tree["team"]["id"], "key_viewer")
    admin = Person(api, tree["team"]["id"], "key_admin")
    stranger = Person(api, tree["other"]["id"], "key_admin")
    body = {"allowed_schemes": ["ecdsa"]}
    assert put(api, key["id"], body, viewer.headers).status_code == 403
    assert put(api, key["id"], body, stranger.headers).status_code == 404
    assert (
        api.http.delete(f"/api/v1/keys/{key['id']}/policy", headers=viewer.headers).status_code
        == 403
    )
    assert put(api, key["id"], body, admin.headers).status_code == 200
    got = api.http.get(f"/api/v1/keys/{key['id']}/policy", headers=viewer.headers)
    assert got.json()["allowed_schemes"] == ["ecdsa"]


def test_a_total_limit_counts_the_keys_past_signatures(
    api: Api, installation: Installation, tree: dict[str, dict[str, Any]]
) -> None:
    import hashlib

    key = api.create_key(tree["team"]["id"])
    account = api.create_account(tree["team"]["id"])
    token = api.access_token(account)
    for i in range(3):
        api.ok(api.sign(token, key["id"], hashlib.sha256(b"%d" % i).digest()))
    api.ok(put(api, key["id"], {"max_signatures_total": 10, "max_signatures_per_day": 5}))
    assert quota_rows(installation, key["id"]) == {"total": 3}
    usage = api.ok(api.http.get(f"/api/v1/keys/{key['id']}", headers=api.admin))["usage"]
    assert usage["total"] == 3
    assert usage["today"] == 0
    # Changing other rules keeps the count; it is not seeded again.
    api.ok(put(api, key["id"], {"max_signatures_total": 20}))
    assert quota_rows(installation, key["id"]) == {"total": 3}


def test_an_unlimited_grant_stays_unlimited(
    api: Api, installation: Installation, tree: dict[str, dict[str, Any]]
) -> None:
    # Regression: dropping every null when storing turned grant_max_uses=null
    # (unlimited uses until the grant expires) into the default of one use.
    key = api.create_key(tree["team"]["id"])
    body = {"approval": {"grant_max_uses": None, "grant_ttl_hours": 8}}
    shown = api.ok(put(api, key["id"], body))
    assert shown["approval"]["grant_max_uses"] is None
    raw = stored(installation, key["id"])
    assert raw is not None
    assert raw["approval"]["grant_max_uses"] is None
    assert "signers" not in raw
