"""Reading the audit trail: filters, paging, subtree scoping; usage counters."""

from __future__ import annotations

import base64
import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from signery.protocol import AuditOutcome
from signery.server.access.context import RequestContext
from signery.server.audit.events import ANONYMOUS, AuditRecord, EventKind
from tests.support import Api


@pytest.fixture(scope="module")
def scene(api: Api) -> dict[str, Any]:
    tsg = api.create_tsg()
    other = api.create_tsg()
    account = api.create_account(tsg["id"])
    key = api.create_key(tsg["id"], "EC_P256", ca="none")
    token = api.access_token(account)
    start = datetime.now(UTC) - timedelta(seconds=1)
    for i in range(5):
        api.ok(api.sign(token, key["name"], hashlib.sha256(str(i).encode()).digest()))
    api.sign(token, key["name"], b"short")  # one invalid attempt
    return {"tsg": tsg, "other": other, "account": account, "key": key, "start": start}


def events(api: Api, **params: Any) -> list[dict[str, Any]]:
    return api.ok(
        api.http.get("/api/v1/audit/events", params={"limit": 1000, **params}, headers=api.admin)
    )["events"]  # type: ignore[no-any-return]


def test_filters(api: Api, scene: dict[str, Any]) -> None:
    by_key = events(api, key_id=scene["key"]["id"])
    assert by_key[0]["kind"] == "key.created"
    assert [e["outcome"] for e in by_key[1:]] == ["succeeded"] * 5 + ["invalid"]
    assert [e["reason"] for e in events(api, key_id=scene["key"]["id"], outcome="invalid")] == [
        "digest_length_mismatch"
    ]
    by_account = events(api, account_id=scene["account"].id, kind="signing.sign")
    assert len(by_account) == 6
    assert {e["tsg_id"] for e in events(api, tsg_id=scene["tsg"]["id"])} == {scene["tsg"]["id"]}
    assert events(api, tsg_id=scene["other"]["id"], kind="signing") == []
    assert (
        len(
            events(api, key_id=scene["key"]["id"], kind="signing", since=scene["start"].isoformat())
        )
        == 6
    )
    assert events(api, key_id=scene["key"]["id"], until=scene["start"].isoformat()) == []


def test_paging_in_both_directions(api: Api, scene: dict[str, Any]) -> None:
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"key_id": scene["key"]["id"], "limit": 4}
        if cursor:
            params["cursor"] = cursor
        page = api.ok(api.http.get("/api/v1/audit/events", params=params, headers=api.admin))
        seen += [e["id"] for e in page["events"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [e["id"] for e in events(api, key_id=scene["key"]["id"])]
    newest = api.ok(
        api.http.get(
            "/api/v1/audit/events",
            params={"key_id": scene["key"]["id"], "order": "desc", "limit": 2},
            headers=api.admin,
        )
    )
    assert [e["id"] for e in newest["events"]] == list(reversed(seen))[:2]


def test_bad_queries_are_refused(api: Api) -> None:
    for params in (
        {"limit": 0},
        {"limit": 5000},
        {"cursor": "abc"},
        {"outcome": "maybe"},
        {"since": "yesterday"},
    ):
        r = api.http.get("/api/v1/audit/events", params=params, headers=api.admin)
        assert r.status_code == 400, params


def test_usage_counters(api: Api, scene: dict[str, Any]) -> None:
    usage = api.usage()
    assert api.counter(usage, "key", scene["key"]["id"]) == (5, 1)
    assert api.counter(usage, "account", scene["account"].id) == (5, 1)
    only_keys = api.ok(
        api.http.get(
            "/api/v1/usage",
            params={"scope": "key", "tsg_id": scene["tsg"]["id"]},
            headers=api.admin,
        )
    )
    assert [(c["name"], c["successes"]) for c in only_keys["counters"]] == [
        (scene["key"]["name"], 5)
    ]
    assert (
        api.http.get("/api/v1/usage", params={"scope": "tsg"}, headers=api.admin).status_code == 400
    )


def test_a_nul_in_a_client_string_is_refused_not_a_server_error(api: Api) -> None:
    """Regression guard: PostgreSQL text cannot hold NUL, so a client string with
    one failed the audit insert and (failing closed) the signing: a client could
    turn its own requests into 503s. No request text may hold a control character
    (issue 12 item 8): the request is refused as malformed, and recorded."""
    tsg = api.create_tsg()
    account = api.create_account(tsg["id"])
    key = api.create_key(tsg["id"], "EC_P256")
    seq = api.last_seq()
    response = api.http.post(
        f"/api/v1/signing/keys/{key['name']}/sign",
        json={
            "digest": base64.b64encode(hashlib.sha256(b"nul").digest()).decode(),
            "digest_algorithm": "sha256",
            "scheme": "ecdsa",
            "client": {"machine": "build\x00host", "tool": "x\x00"},
        },
        headers={"Authorization": f"Bearer {api.access_token(account)}"},
    )
    assert response.status_code == 400, response.text
    assert response.json()["code"] == "validation_failed"
    refused = [e for e in api.events_after(seq) if e["reason"] == "validation_failed"]
    assert [e["principal"]["id"] for e in refused] == [account.id]


def test_a_nul_in_a_client_string_is_recorded_with_a_replacement(api: Api) -> None:
    """The recorder's own guard, for any client string that reaches it: PostgreSQL
    text cannot hold NUL, and failing the insert would refuse the request."""
    services = api.http.app.state.services  # type: ignore[attr-defined]
    seq = api.last_seq()
    services.recorder.commit_sync(
        AuditRecord(
            EventKind.REQUEST_REFUSED,
            AuditOutcome.INVALID,
            ANONYMOUS,
            reason="nul_test",
            context=RequestContext(machine="build\x00host", tool="x\x00", user_agent="a\x00"),
        )
    )
    (event,) = api.events_after(seq)
    assert event["client_machine"] == "build\ufffdhost"
    assert event["client_tool"] == "x\ufffd"
    assert event["user_agent"] == "a\ufffd"
