"""Usage limits of keys, enforced by the database: a total limit hit by concurrent
clients of a real `signery serve` process lets exactly the limit through; a
per-day limit answers 429 with Retry-After until the next local midnight; a slot
taken by a signing that then fails is given back. SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import threading
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from sqlalchemy import select

from signery.server.keys.models import KeyUsageQuotaRow
from signery.server.persistence.db import make_engine
from tests.support import Api, FakeClock, Installation, ServerProcess, inserts_fail, refused_once

DIGEST = hashlib.sha256(b"limited").digest()
CLIENTS = 8
REQUESTS = 200
LIMIT = 100


@pytest.fixture(scope="module")
def tsg(api: Api) -> dict[str, Any]:
    return api.create_tsg()


def set_policy(api: Api, key: dict[str, Any], policy: dict[str, Any]) -> None:
    api.ok(api.http.put(f"/api/v1/keys/{key['id']}/policy", json=policy, headers=api.admin))


def quota_rows(installation: Installation, key_id: str) -> dict[str, int]:
    engine = make_engine(installation.settings.resolved_database_url, pool_size=1)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(KeyUsageQuotaRow.period, KeyUsageQuotaRow.used).where(
                    KeyUsageQuotaRow.key_id == key_id
                )
            ).all()
            return dict(rows)  # type: ignore[arg-type]
    finally:
        engine.dispose()


def test_a_limit_of_100_hit_by_8_concurrent_clients_lets_exactly_100_through(
    server_api: Api, server: ServerProcess, installation: Installation, tsg: dict[str, Any]
) -> None:
    api = server_api
    key = api.create_key(tsg["id"])
    set_policy(api, key, {"max_signatures_total": LIMIT})
    accounts = [api.create_account(tsg["id"]) for _ in range(CLIENTS)]
    tokens = [api.access_token(a) for a in accounts]
    statuses: Counter[tuple[int, str | None]] = Counter()
    lock = threading.Lock()
    start = threading.Barrier(CLIENTS)
    errors: list[BaseException] = []

    def client(token: str) -> None:
        try:
            with httpx.Client(base_url=server.url, timeout=60) as http:
                own = Api(http, api.admin_token, api.issuer, api.root_tsg_id)
                start.wait()
                for i in range(REQUESTS // CLIENTS):
                    response = own.sign(token, key["id"], hashlib.sha256(b"%d" % i).digest())
                    code = response.json().get("code") if response.status_code != 200 else None
                    with lock:
                        statuses[(response.status_code, code)] += 1
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    seq = api.last_seq()
    threads = [threading.Thread(target=client, args=(t,)) for t in tokens]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert statuses == {(200, None): LIMIT, (409, "usage_limit_reached"): REQUESTS - LIMIT}

    counted = api.usage()[("key", key["id"])]
    # A limit that refuses is a decision: counted as denied, not as a failure.
    assert (counted["successes"], counted["denied"], counted["failures"]) == (
        LIMIT,
        REQUESTS - LIMIT,
        0,
    )
    assert quota_rows(installation, key["id"]) == {"total": LIMIT}
    usage = api.ok(api.http.get(f"/api/v1/keys/{key['id']}", headers=api.admin))["usage"]
    assert usage["total"] == LIMIT
    events = [e for e in api.events_after(seq) if e["key_id"] == key["id"]]
    assert Counter((e["kind"], e["reason"]) for e in events) == {
        ("signing.sign.succeeded", None): LIMIT,
        ("signing.sign.denied", "usage_limit_reached"): REQUESTS - LIMIT,
    }


def test_a_daily_limit_resets_at_local_midnight(
    api: Api, installation: Installation, tsg: dict[str, Any], clock: FakeClock
) -> None:
    zone = ZoneInfo("Pacific/Auckland")
    key = api.create_key(tsg["id"])
    account = api.create_account(tsg["id"])
    set_policy(
        api,
        key,
        {"max_signatures_per_day": 3, "max_signatures_total": 50, "timezone": zone.key},
    )
    # 22:00 local, two days ahead: the next day starts in two hours.
    local = datetime.now(zone).date() + timedelta(days=2)
    evening = datetime(local.year, local.month, local.day, 22, 0, tzinfo=zone)
    clock.offset = evening.astimezone(UTC) - datetime.now(UTC)
    token = api.access_token(account, now=clock.now().timestamp())
    for _ in range(3):
        api.ok(api.sign(token, key["id"], DIGEST))
    with refused_once(
        api,
        reason="daily_limit_reached",
        kind="signing.sign.denied",
        account_id=account.id,
        key_id=key["id"],
        failures_counted=True,
    ):
        response = api.sign(token, key["id"], DIGEST)
        assert response.status_code == 429, response.text
        assert response.json()["code"] == "daily_limit_reached"
    retry_after = int(response.headers["retry-after"])
    assert 2 * 3600 - 5 <= retry_after <= 2 * 3600 + 1
    # The full day did not take a slot of the total.
    assert quota_rows(installation, key["id"]) == {"total": 3, local.isoformat(): 3}
    shown = api.ok(api.http.get(f"/api/v1/keys/{key['id']}", headers=api.admin))["usage"]
    assert shown == {"total": 3, "today": 3, "day": local.isoformat()}

    clock.advance(retry_after + 1)
    token = api.access_token(account, now=clock.now().timestamp())
    api.ok(api.sign(token, key["id"], DIGEST))
    tomorrow = (local + timedelta(days=1)).isoformat()
    assert quota_rows(installation, key["id"]) == {
        "total": 4,
        local.isoformat(): 3,
        tomorrow: 1,
    }


def test_a_signing_that_fails_after_its_reservation_gives_the_slot_back(
    api: Api, installation: Installation, tsg: dict[str, Any]
) -> None:
    key = api.create_key(tsg["id"])
    account = api.create_account(tsg["id"])
    token = api.access_token(account)
    set_policy(api, key, {"max_signatures_total": 2, "max_signatures_per_day": 2})
    with inserts_fail(installation, "audit_events"):
        for _ in range(3):
            response = api.sign(token, key["id"], DIGEST)
            assert response.status_code == 503, response.text
            assert "signature" not in response.json()
    assert set(quota_rows(installation, key["id"]).values()) == {0}
    for _ in range(2):
        api.ok(api.sign(token, key["id"], DIGEST))
    response = api.sign(token, key["id"], DIGEST)
    assert response.status_code == 409
    assert response.json()["code"] == "usage_limit_reached"


def test_refusals_by_other_rules_take_no_slot(
    api: Api, installation: Installation, tsg: dict[str, Any]
) -> None:
    key = api.create_key(tsg["id"])
    account = api.create_account(tsg["id"])
    token = api.access_token(account)
    set_policy(api, key, {"max_signatures_total": 1, "allowed_digests": ["sha512"]})
    response = api.sign(token, key["id"], DIGEST)
    assert response.json()["code"] == "policy_digest_not_allowed"
    assert quota_rows(installation, key["id"]) == {"total": 0}
