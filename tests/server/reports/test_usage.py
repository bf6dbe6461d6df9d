"""Usage counters: per key, key version, account and day, with successes, failures
(invalid requests, errors) and denied (decisions) apart; GET /api/v1/usage with a
period, top N and a series per day. SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
from datetime import UTC, date, datetime, timedelta
from typing import Any

from tests.support import Account, Api, FakeClock

DIGEST = hashlib.sha256(b"usage").digest()
DAY = 86400


def noon_in(clock: FakeClock, days: int) -> date:
    """Move the server's clock to noon (UTC) some days ahead: no midnight race."""
    today = datetime.now(UTC).date() + timedelta(days=days)
    clock.offset = datetime(today.year, today.month, today.day, 12, tzinfo=UTC) - datetime.now(UTC)
    return today


def token(api: Api, account: Account, clock: FakeClock) -> str:
    return api.access_token(account, now=clock.now().timestamp())


def usage(api: Api, **params: Any) -> list[dict[str, Any]]:
    return api.ok(api.http.get("/api/v1/usage", params=params, headers=api.admin))["counters"]  # type: ignore[no-any-return]


def counts(c: dict[str, Any]) -> tuple[int, int, int]:
    return c["successes"], c["failures"], c["denied"]


def by_subject(counters: list[dict[str, Any]]) -> dict[tuple[str, str], tuple[int, int, int]]:
    return {(c["subject_type"], c["subject_id"]): counts(c) for c in counters}


def sign(api: Api, tok: str, key: str, status: int, digest: bytes = DIGEST) -> None:
    r = api.sign(tok, key, digest)
    assert r.status_code == status, r.text


def test_each_outcome_counted_in_its_column_per_key_version_account_and_day(
    api: Api, clock: FakeClock
) -> None:
    tsg = api.create_tsg()
    a, b = api.create_account(tsg["id"]), api.create_account(tsg["id"])
    key = api.create_key(tsg["id"], ca="none")
    day1 = noon_in(clock, 3)
    tok = token(api, a, clock)
    for _ in range(3):
        sign(api, tok, key["id"], 200)
    sign(api, tok, key["id"], 400, b"short")  # invalid: a failure
    policy = f"/api/v1/keys/{key['id']}/policy"
    api.ok(api.http.put(policy, json={"allowed_digests": ["sha384"]}, headers=api.admin))
    sign(api, tok, key["id"], 403)  # refused by the key's policy: denied
    api.ok(api.http.put(policy, json={}, headers=api.admin))
    sign(api, tok, "no-such-key", 404)  # denied, counted against the account only
    rotated = api.ok(api.http.post(f"/api/v1/keys/{key['id']}/rotate", json={}, headers=api.admin))
    assert rotated["current_version"] == 2
    for _ in range(2):
        sign(api, tok, key["id"], 200)
    clock.advance(DAY)
    day2 = day1 + timedelta(days=1)
    sign(api, token(api, b, clock), key["id"], 200)

    lifetime = usage(api, tsg_id=tsg["id"])
    got = by_subject(lifetime)
    assert got[("key", key["id"])] == (6, 1, 1)
    assert got[("account", a.id)] == (5, 1, 2)
    assert got[("account", b.id)] == (1, 0, 0)
    versions = {
        c["version"]: counts(c)
        for c in lifetime
        if c["subject_type"] == "key_version" and c["key_id"] == key["id"]
    }
    assert versions == {1: (3, 1, 1), 2: (3, 0, 0)}
    assert {c["name"] for c in lifetime if c["subject_type"] == "key_version"} == {key["name"]}
    assert {c["name"] for c in lifetime if c["subject_type"] == "account"} == {a.name, b.name}

    # The counters equal the number of success events.
    events = api.ok(
        api.http.get(
            "/api/v1/audit/events",
            params={"key_id": key["id"], "outcome": "succeeded", "limit": 1000},
            headers=api.admin,
        )
    )["events"]
    assert len([e for e in events if e["kind"] == "signing.sign.succeeded"]) == 6

    series = usage(api, tsg_id=tsg["id"], scope="key", group_by="day")
    assert [(c["day"], counts(c)) for c in series] == [
        (day1.isoformat(), (5, 1, 1)),
        (day2.isoformat(), (1, 0, 0)),
    ]
    only_day2 = usage(api, tsg_id=tsg["id"], since=day2.isoformat())
    assert by_subject(only_day2) == {
        ("key", key["id"]): (1, 0, 0),
        ("key_version", next(c["subject_id"] for c in lifetime if c.get("version") == 2)): (
            1,
            0,
            0,
        ),
        ("account", b.id): (1, 0, 0),
    }
    only_day1 = usage(api, tsg_id=tsg["id"], scope="account", until=day1.isoformat())
    assert by_subject(only_day1) == {("account", a.id): (5, 1, 2)}
    period = api.ok(
        api.http.get(
            "/api/v1/usage",
            params={"since": day1.isoformat(), "until": day2.isoformat(), "tsg_id": tsg["id"]},
            headers=api.admin,
        )
    )
    assert (period["since"], period["until"]) == (day1.isoformat(), day2.isoformat())
    assert by_subject(period["counters"])[("key", key["id"])] == (6, 1, 1)


def test_disabled_key_refusals_and_other_tsgs_are_not_counted(api: Api) -> None:
    tsg, other = api.create_tsg(), api.create_tsg()
    account = api.create_account(tsg["id"])
    key = api.create_key(tsg["id"], ca="none")
    tok = api.access_token(account)
    sign(api, tok, key["id"], 200)
    api.ok(api.http.post(f"/api/v1/keys/{key['id']}/disable", json={}, headers=api.admin))
    sign(api, tok, key["id"], 409)
    got = by_subject(usage(api, tsg_id=tsg["id"]))
    assert got[("key", key["id"])] == (1, 0, 0)
    assert got[("account", account.id)] == (1, 0, 0)
    assert usage(api, tsg_id=other["id"]) == []


def test_top_keys_and_accounts_over_a_period(api: Api, clock: FakeClock) -> None:
    tsg = api.create_tsg()
    accounts = [api.create_account(tsg["id"]) for _ in range(3)]
    keys = [api.create_key(tsg["id"], ca="none") for _ in range(3)]
    day1 = noon_in(clock, 5)
    # Day 1: key 0 signs 3 times (account 0), key 1 twice (account 1).
    for i, n in ((0, 3), (1, 2)):
        tok = token(api, accounts[i], clock)
        for _ in range(n):
            sign(api, tok, keys[i]["id"], 200)
    clock.advance(DAY)
    # Day 2: key 2 signs 4 times (account 2).
    tok = token(api, accounts[2], clock)
    for _ in range(4):
        sign(api, tok, keys[2]["id"], 200)

    def top(**params: Any) -> list[tuple[str | None, str, int]]:
        return [
            (c["day"], c["name"], c["successes"])
            for c in usage(api, tsg_id=tsg["id"], scope="key", **params)
        ]

    assert top(top=2) == [(None, keys[2]["name"], 4), (None, keys[0]["name"], 3)]
    assert top(top=2, until=day1.isoformat()) == [
        (None, keys[0]["name"], 3),
        (None, keys[1]["name"], 2),
    ]
    day2 = (day1 + timedelta(days=1)).isoformat()
    assert top(top=2, group_by="day") == [
        (day1.isoformat(), keys[0]["name"], 3),
        (day2, keys[2]["name"], 4),
    ]
    accounts_top = usage(api, tsg_id=tsg["id"], scope="account", top=1)
    assert [(c["name"], c["successes"]) for c in accounts_top] == [(accounts[2].name, 4)]


def test_bad_usage_queries_are_refused(api: Api) -> None:
    for params in (
        {"top": 0},
        {"top": 5000},
        {"since": "2025-02-01", "until": "2025-01-01"},
        {"since": "yesterday"},
        {"scope": "nope"},
        {"group_by": "week"},
    ):
        r = api.http.get("/api/v1/usage", params=params, headers=api.admin)
        assert r.status_code == 400, (params, r.text)
