"""Disable / enable a key: the very next signing on any replica is refused
(409 key_disabled), audited and not counted; the key stays visible to its
administrators; enabling lets it sign again."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server.keys.lifecycle_helpers import action, key_of, sign
from tests.support import Account, Api, new_installation, refused_once, running_server

DIGEST = hashlib.sha256(b"build 42").digest()


@pytest.fixture(scope="module")
def tsg(api: Api) -> dict[str, Any]:
    return api.create_tsg()


@pytest.fixture(scope="module")
def account(api: Api, tsg: dict[str, Any]) -> Account:
    return api.create_account(tsg["id"])


@pytest.fixture(scope="module")
def token(api: Api, account: Account) -> str:
    return api.access_token(account)


def listed_for_signing(api: Api, token: str) -> set[str]:
    keys = api.ok(
        api.http.get("/api/v1/signing/keys", headers={"Authorization": f"Bearer {token}"})
    )
    return {k["id"] for k in keys}


def test_a_disabled_key_is_refused_audited_not_counted_and_still_visible(
    api: Api, tsg: dict[str, Any], account: Account, token: str
) -> None:
    key = api.create_key(tsg["id"], "EC_P256")
    api.ok(sign(api, token, key["name"], DIGEST))
    seq = api.last_seq()
    disabled = api.ok(action(api, key["id"], "disable"))
    assert disabled["status"] == "disabled"
    (event,) = [e for e in api.events_after(seq) if e["kind"] == "key.disabled"]
    assert event["key_id"] == key["id"]
    assert event["principal"]["type"] == "user"

    with refused_once(api, reason="key_disabled", kind="signing.sign.denied"):
        refused = sign(api, token, key["name"], DIGEST)
    assert refused.status_code == 409
    assert refused.json()["code"] == "key_disabled"

    # Visible to administrators, absent from the signing plane's listing.
    assert key_of(api, key["id"])["status"] == "disabled"
    listed = api.ok(api.http.get("/api/v1/keys", headers=api.admin))
    assert any(k["id"] == key["id"] and k["status"] == "disabled" for k in listed)
    assert key["id"] not in listed_for_signing(api, token)

    twice = action(api, key["id"], "disable")
    assert twice.status_code == 409
    assert "already disabled" in twice.json()["detail"]

    seq = api.last_seq()
    assert api.ok(action(api, key["id"], "enable"))["status"] == "active"
    assert [e["kind"] for e in api.events_after(seq)] == ["key.enabled"]
    assert api.ok(sign(api, token, key["name"], DIGEST))["key_version"] == 1
    assert key["id"] in listed_for_signing(api, token)
    not_disabled = action(api, key["id"], "enable")
    assert not_disabled.status_code == 409
    assert "not disabled" in not_disabled.json()["detail"]


def test_disable_needs_key_manage(api: Api, tsg: dict[str, Any], token: str) -> None:
    key = api.create_key(tsg["id"], "EC_P256")
    refused = api.http.post(
        f"/api/v1/keys/{key['id']}/disable", headers={"Authorization": f"Bearer {token}"}
    )
    assert refused.status_code in (401, 403), refused.text
    assert key_of(api, key["id"])["status"] == "active"


# ------------------------------------------------------------------ two replicas


@pytest.fixture(scope="module")
def two_replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Api, Api]]:
    """Two `signery serve` processes sharing one PostgreSQL database."""
    data_dir: Path = tmp_path_factory.mktemp("signery-two-replicas")
    with (
        new_installation("postgresql", data_dir) as inst,
        running_server(inst, node="node-a") as a,
        running_server(inst, node="node-b") as b,
        httpx.Client(base_url=a.url, timeout=30) as http_a,
        httpx.Client(base_url=b.url, timeout=30) as http_b,
    ):
        init = inst.init
        yield (
            Api(http_a, inst.admin_token, init.issuer, init.root_tsg_id),
            Api(http_b, inst.admin_token, init.issuer, init.root_tsg_id),
        )


def test_disable_on_one_replica_stops_signing_on_the_other_at_once(
    two_replicas: tuple[Api, Api],
) -> None:
    first, second = two_replicas
    tsg = first.create_tsg()
    account = first.create_account(tsg["id"])
    token = second.access_token(account)
    key = first.create_key(tsg["id"], "EC_P256")
    # The second replica has signed with the key (and cached what it may cache).
    for _ in range(3):
        second.ok(sign(second, token, key["name"], DIGEST))

    first.ok(action(first, key["id"], "disable"))
    seq = second.last_seq()
    with refused_once(second, reason="key_disabled", kind="signing.sign.denied"):
        refused = sign(second, token, key["name"], DIGEST)
    assert refused.status_code == 409, refused.text
    assert refused.json()["code"] == "key_disabled"
    (event,) = [
        e
        for e in second.events_after(seq)
        if e["kind"] == "signing.sign.denied" and e["key_id"] == key["id"]
    ]
    assert event["reason"] == "key_disabled"
    assert event["node_id"] == "node-b"
    usage = second.usage()
    assert second.counter(usage, "key", key["id"]) == (3, 0)
    assert second.counter(usage, "account", account.id) == (3, 0)

    first.ok(action(first, key["id"], "enable"))
    assert second.ok(sign(second, token, key["name"], DIGEST))["key_version"] == 1
