"""Per-key signing policy on the signing path: each rule signs what it allows and
refuses what it does not, with its own status and code, audited once as
``signing.sign.denied`` with that code as the reason. Runs on SQLite and
PostgreSQL; the client-IP rule against a real `signery serve` process (the
in-process client has no IP address), the time rules with the FakeClock."""

from __future__ import annotations

import hashlib
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from signery.server.access.authz import (
    Allowed,
    Denied,
    SigningFacts,
    SigningRules,
    WindowRule,
    decide_signing,
)
from tests.support import Account, Api, FakeClock, refused_once

DIGEST = hashlib.sha256(b"policy").digest()
DIGEST_384 = hashlib.sha384(b"policy").digest()


@pytest.fixture(scope="module")
def tree(api: Api) -> dict[str, Any]:
    org = api.create_tsg()
    team = api.create_tsg(parent=org["id"])
    build = api.create_tsg(parent=team["id"])
    return {"org": org, "team": team, "build": build}


def set_policy(api: Api, key: dict[str, Any], policy: dict[str, Any]) -> None:
    api.ok(api.http.put(f"/api/v1/keys/{key['id']}/policy", json=policy, headers=api.admin))


def token_at(api: Api, account: Account, clock: FakeClock | None = None) -> str:
    return api.access_token(account, now=clock.now().timestamp() if clock else None)


def signs(api: Api, token: str, key: dict[str, Any], **kwargs: Any) -> None:
    response = api.sign(token, key["id"], kwargs.pop("digest", DIGEST), **kwargs)
    assert response.status_code == 200, response.text


def refused(
    api: Api,
    token: str,
    key: dict[str, Any],
    account: Account,
    status: int,
    code: str,
    **kwargs: Any,
) -> None:
    with refused_once(
        api,
        reason=code,
        kind="signing.sign.denied",
        account_id=account.id,
        key_id=key["id"],
        failures_counted=True,
    ):
        response = api.sign(token, key["id"], kwargs.pop("digest", DIGEST), **kwargs)
        assert response.status_code == status, response.text
        assert response.json()["code"] == code


def test_signers_by_account_and_by_child_tsg(api: Api, tree: dict[str, Any]) -> None:
    # A key in org/team/build: every account of org, team and build may use it by
    # the TSG boundary alone; the policy narrows that down.
    key = api.create_key(tree["build"]["id"])
    named = api.create_account(tree["org"]["id"])
    unnamed = api.create_account(tree["org"]["id"])
    in_team = api.create_account(tree["team"]["id"])
    in_build = api.create_account(tree["build"]["id"])
    for account in (named, unnamed, in_team, in_build):
        signs(api, token_at(api, account), key)
    # The named account, and the accounts of the child TSG team (and below it).
    set_policy(api, key, {"signers": [named.name], "signer_tsgs": [tree["team"]["id"]]})
    for account in (named, in_team, in_build):
        signs(api, token_at(api, account), key)
    refused(api, token_at(api, unnamed), key, unnamed, 403, "signer_not_allowed")

    # Without the child TSG, its accounts are refused too.
    set_policy(api, key, {"signers": [named.id]})
    refused(api, token_at(api, in_team), key, in_team, 403, "signer_not_allowed")
    refused(api, token_at(api, in_build), key, in_build, 403, "signer_not_allowed")
    signs(api, token_at(api, named), key)


def test_allowed_schemes(api: Api, tree: dict[str, Any]) -> None:
    key = api.create_key(tree["team"]["id"], "RSA_2048")
    account = api.create_account(tree["team"]["id"])
    token = token_at(api, account)
    set_policy(api, key, {"allowed_schemes": ["rsa-pss"]})
    signs(api, token, key, scheme="rsa-pss")
    refused(api, token, key, account, 403, "policy_scheme_not_allowed", scheme="rsa-pkcs1v15")


def test_allowed_digests(api: Api, tree: dict[str, Any]) -> None:
    key = api.create_key(tree["team"]["id"])
    account = api.create_account(tree["team"]["id"])
    token = token_at(api, account)
    set_policy(api, key, {"allowed_digests": ["sha384"]})
    signs(api, token, key, digest=DIGEST_384, digest_algorithm="sha384")
    refused(api, token, key, account, 403, "policy_digest_not_allowed")


def test_sha1_is_always_refused_and_audited(api: Api, tree: dict[str, Any]) -> None:
    key = api.create_key(tree["team"]["id"])
    account = api.create_account(tree["team"]["id"])
    token = token_at(api, account)
    sha1 = hashlib.sha1(b"policy", usedforsecurity=False).digest()
    for policy in ({}, {"allowed_schemes": ["ecdsa"]}):
        set_policy(api, key, policy)
        with refused_once(
            api,
            reason="unsupported_digest_algorithm",
            kind="signing.sign.invalid",
            account_id=account.id,
            key_id=key["id"],
            failures_counted=True,
        ):
            response = api.sign(token, key["id"], sha1, digest_algorithm="sha1")
            assert response.status_code == 400
            assert response.json()["code"] == "unsupported_digest_algorithm"
    # Nor can a policy name it.
    response = api.http.put(
        f"/api/v1/keys/{key['id']}/policy",
        json={"allowed_digests": ["sha1"]},
        headers=api.admin,
    )
    assert response.status_code == 400


def test_an_allow_list_refuses_a_client_without_an_address(api: Api, tree: dict[str, Any]) -> None:
    # The in-process test client has no IP address: an allow-list fails closed.
    key = api.create_key(tree["team"]["id"])
    account = api.create_account(tree["team"]["id"])
    set_policy(api, key, {"client_ips": ["0.0.0.0/0", "::/0"]})
    refused(api, token_at(api, account), key, account, 403, "client_ip_not_allowed")


def test_client_ip_allow_list_on_a_real_server(server_api: Api, tree: dict[str, Any]) -> None:
    api = server_api
    key = api.create_key(tree["team"]["id"])
    account = api.create_account(tree["team"]["id"])
    token = token_at(api, account)
    set_policy(api, key, {"client_ips": ["10.0.0.0/8", "127.0.0.0/8"]})
    signs(api, token, key)
    set_policy(api, key, {"client_ips": ["10.0.0.0/8", "::1/128", "127.0.0.2/32"]})
    seq = api.last_seq()
    refused(api, token, key, account, 403, "client_ip_not_allowed")
    [event] = api.events_after(seq)
    assert event["client_ip"] == "127.0.0.1"


def at_local(clock: FakeClock, zone: str, day: date, hhmm: str, second: int = 30) -> None:
    """Move the FakeClock to ``day`` ``hhmm``:``second`` local time in ``zone``."""
    hours, minutes = map(int, hhmm.split(":"))
    target = datetime(day.year, day.month, day.day, hours, minutes, second, tzinfo=ZoneInfo(zone))
    clock.offset = target.astimezone(UTC) - datetime.now(UTC)


def test_time_windows_in_a_named_zone(api: Api, tree: dict[str, Any], clock: FakeClock) -> None:
    zone = "Asia/Tokyo"
    key = api.create_key(tree["team"]["id"])
    account = api.create_account(tree["team"]["id"])
    day = datetime.now(ZoneInfo(zone)).date() + timedelta(days=2)
    weekday = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"][day.weekday()]
    set_policy(
        api,
        key,
        {
            "time_windows": [{"days": [weekday], "start": "09:00", "end": "17:00"}],
            "timezone": zone,
        },
    )

    def attempt(when: date, hhmm: str, ok: bool) -> None:
        at_local(clock, zone, when, hhmm)
        token = token_at(api, account, clock)
        if ok:
            signs(api, token, key)
        else:
            refused(api, token, key, account, 403, "outside_signing_window")

    attempt(day, "08:59", ok=False)
    attempt(day, "09:00", ok=True)
    attempt(day, "16:59", ok=True)
    attempt(day, "17:00", ok=False)  # the end is exclusive
    attempt(day + timedelta(days=1), "10:00", ok=False)  # another weekday

    # Across midnight: the window belongs to the day it starts on.
    set_policy(
        api,
        key,
        {
            "time_windows": [{"days": [weekday], "start": "22:00", "end": "02:00"}],
            "timezone": zone,
        },
    )
    attempt(day, "21:59", ok=False)
    attempt(day, "23:00", ok=True)
    attempt(day + timedelta(days=1), "01:59", ok=True)
    attempt(day + timedelta(days=1), "02:00", ok=False)
    attempt(day + timedelta(days=1), "23:00", ok=False)


def test_valid_from_and_valid_until(api: Api, tree: dict[str, Any], clock: FakeClock) -> None:
    key = api.create_key(tree["team"]["id"])
    account = api.create_account(tree["team"]["id"])
    now = clock.now()
    set_policy(
        api,
        key,
        {
            "valid_from": (now + timedelta(hours=1)).isoformat(),
            "valid_until": (now + timedelta(hours=3)).isoformat(),
        },
    )
    refused(api, token_at(api, account, clock), key, account, 409, "key_not_yet_valid")
    clock.advance(2 * 3600)
    signs(api, token_at(api, account, clock), key)
    clock.advance(2 * 3600)
    refused(api, token_at(api, account, clock), key, account, 409, "key_validity_ended")


def test_a_cleared_policy_restricts_nothing(api: Api, tree: dict[str, Any]) -> None:
    key = api.create_key(tree["team"]["id"])
    account = api.create_account(tree["team"]["id"])
    token = token_at(api, account)
    set_policy(api, key, {"allowed_digests": ["sha512"]})
    refused(api, token, key, account, 403, "policy_digest_not_allowed")
    assert api.http.delete(f"/api/v1/keys/{key['id']}/policy", headers=api.admin).status_code == 204
    signs(api, token, key)


# ------------------------------------------------------------------ the pure decision


def facts(now: datetime, **overrides: Any) -> SigningFacts:
    values: dict[str, Any] = {
        "account_id": "a",
        "account_tsg_path": "/1000000000/",
        "scheme": "ecdsa",
        "digest_algorithm": "sha256",
        "client_ip": "192.0.2.7",
        "now": now,
    }
    values.update(overrides)
    return SigningFacts(**values)


def test_windows_follow_local_time_across_a_dst_change() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    # Weekdays 09:00-17:00 in Berlin: 08:00 UTC is 09:00 in summer (CEST, UTC+2 ->
    # 10:00) and 09:00 in winter (CET, UTC+1). DST ended on Sunday 27 October 2024.
    rules = SigningRules(zone=berlin, windows=(WindowRule(frozenset(range(5)), 9 * 60, 17 * 60),))
    friday_summer = datetime(2024, 10, 25, 7, 30, tzinfo=UTC)  # 09:30 CEST
    monday_winter = datetime(2024, 10, 28, 7, 30, tzinfo=UTC)  # 08:30 CET
    assert isinstance(decide_signing(rules, facts(friday_summer)), Allowed)
    denied = decide_signing(rules, facts(monday_winter))
    assert isinstance(denied, Denied)
    assert denied.reason == "outside_signing_window"
    assert isinstance(decide_signing(rules, facts(monday_winter + timedelta(hours=1))), Allowed)


def test_ip_rules_match_ipv4_mapped_addresses_and_fail_closed() -> None:
    import ipaddress

    rules = SigningRules(zone=UTC, networks=(ipaddress.ip_network("10.0.0.0/8"),))
    now = datetime.now(UTC)
    assert isinstance(decide_signing(rules, facts(now, client_ip="10.1.2.3")), Allowed)
    assert isinstance(decide_signing(rules, facts(now, client_ip="::ffff:10.1.2.3")), Allowed)
    for ip in ("11.0.0.1", None, "testclient", "::1"):
        assert isinstance(decide_signing(rules, facts(now, client_ip=ip)), Denied)


def test_rules_are_checked_in_order() -> None:
    now = datetime.now(UTC)
    rules = SigningRules(
        zone=UTC,
        signers=frozenset({"b"}),
        schemes=frozenset({"rsa-pss"}),
        valid_until=now - timedelta(days=1),
    )
    decision = decide_signing(rules, facts(now))
    assert isinstance(decision, Denied)
    assert decision.reason == "signer_not_allowed"
    decision = decide_signing(rules, facts(now, account_id="b"))
    assert isinstance(decision, Denied)
    assert decision.reason == "policy_scheme_not_allowed"
    decision = decide_signing(rules, facts(now, account_id="b", scheme="rsa-pss"))
    assert isinstance(decision, Denied)
    assert decision.reason == "key_validity_ended"
