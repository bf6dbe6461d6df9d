"""Several `signery serve` replicas on one PostgreSQL database: the scale-out
deployment. Rules that must hold across replicas, not just within one process."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import Api, Installation, ServerProcess, new_installation, running_server

pytestmark = pytest.mark.e2e
DIGEST = hashlib.sha256(b"multi").digest()


@pytest.fixture(scope="module")
def pg_installation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installation]:
    with new_installation("postgresql", tmp_path_factory.mktemp("multinode")) as inst:
        yield inst


@pytest.fixture(scope="module")
def nodes(pg_installation: Installation) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    # Debug logging on both, so the secrecy test below reads everything they write.
    with (
        running_server(pg_installation, node="node-a", SIGNERY_LOG_LEVEL="debug") as a,
        running_server(pg_installation, node="node-b", SIGNERY_LOG_LEVEL="debug") as b,
    ):
        yield a, b


@pytest.fixture(scope="module")
def apis(
    pg_installation: Installation, nodes: tuple[ServerProcess, ServerProcess]
) -> Iterator[tuple[Api, Api]]:
    init = pg_installation.init
    with (
        httpx.Client(base_url=nodes[0].url, timeout=30) as ha,
        httpx.Client(base_url=nodes[1].url, timeout=30) as hb,
    ):
        yield (
            Api(ha, pg_installation.admin_token, init.issuer, init.root_tsg_id),
            Api(hb, pg_installation.admin_token, init.issuer, init.root_tsg_id),
        )


@pytest.fixture(scope="module")
def scene(apis: tuple[Api, Api]) -> dict[str, Any]:
    a, _ = apis
    tsg = a.create_tsg()
    return {"tsg": tsg, "key": a.create_key(tsg["id"], "EC_P256")}


def test_an_assertion_is_single_use_across_replicas(
    apis: tuple[Api, Api], scene: dict[str, Any]
) -> None:
    a, b = apis
    account = a.create_account(scene["tsg"]["id"])
    assertion = account.credentials().assertion(a.issuer)
    assert a.token_response(assertion).status_code == 200
    replay = b.token_response(assertion)
    assert replay.status_code == 400
    assert replay.json()["code"] == "assertion_replayed"


def test_concurrent_replay_on_two_replicas_yields_one_token(
    apis: tuple[Api, Api], scene: dict[str, Any]
) -> None:
    a, b = apis
    account = a.create_account(scene["tsg"]["id"])
    for _ in range(5):
        assertion = account.credentials().assertion(a.issuer)
        barrier = threading.Barrier(6)
        codes: list[int] = []
        lock = threading.Lock()

        def attempt(
            url: str,
            assertion: str,
            barrier: threading.Barrier,
            codes: list[int],
            lock: threading.Lock,
        ) -> None:
            with httpx.Client(base_url=url, timeout=30) as http:
                barrier.wait()
                r = http.post(
                    "/api/v1/oauth/token",
                    data={
                        "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
                        "assertion": assertion,
                    },
                )
            with lock:
                codes.append(r.status_code)

        threads = [
            threading.Thread(
                target=attempt, args=(str(api.http.base_url), assertion, barrier, codes, lock)
            )
            for api in (a, b, a, b, a, b)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(codes) == [200, 400, 400, 400, 400, 400]


def test_disabling_on_one_replica_stops_signing_on_the_other_at_once(
    apis: tuple[Api, Api], scene: dict[str, Any]
) -> None:
    a, b = apis
    account = a.create_account(scene["tsg"]["id"])
    token = b.access_token(account)
    assert b.sign(token, scene["key"]["name"], DIGEST).status_code == 200
    a.ok(a.http.post(f"/api/v1/accounts/{account.id}/disable", headers=a.admin))
    refused = b.sign(token, scene["key"]["name"], DIGEST)
    assert refused.status_code == 401
    assert refused.json()["code"] == "account_disabled"


def test_counters_and_events_add_up_across_replicas(
    apis: tuple[Api, Api], scene: dict[str, Any]
) -> None:
    a, b = apis
    account = a.create_account(scene["tsg"]["id"])
    tokens = {"a": a.access_token(account), "b": b.access_token(account)}
    seq = a.last_seq()

    def hammer(api: Api, token: str, n: int) -> None:
        with httpx.Client(base_url=str(api.http.base_url), timeout=30) as http:
            worker = Api(http, api.admin_token, api.issuer, api.root_tsg_id)
            for i in range(n):
                worker.ok(
                    worker.sign(
                        token, scene["key"]["name"], hashlib.sha256(f"{i}".encode()).digest()
                    )
                )

    threads = [
        threading.Thread(target=hammer, args=(api, tokens[name], 25))
        for api, name in ((a, "a"), (b, "b"), (a, "a"), (b, "b"))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    events = [e for e in a.events_after(seq) if e["kind"] == "signing.sign.succeeded"]
    assert len(events) == 100
    assert {e["node_id"] for e in events} == {"node-a", "node-b"}
    assert a.counter(a.usage(), "account", account.id) == (100, 0)
    assert b.counter(b.usage(), "account", account.id) == (100, 0)


def test_logs_never_contain_secrets(
    pg_installation: Installation,
    nodes: tuple[ServerProcess, ServerProcess],
    apis: tuple[Api, Api],
    scene: dict[str, Any],
) -> None:
    a, _ = apis
    account = a.create_account(scene["tsg"]["id"])
    assertion = account.credentials().assertion(a.issuer)
    token = a.ok(a.token_response(assertion))["access_token"]
    a.sign(token, scene["key"]["name"], DIGEST)
    a.sign(token, scene["key"]["name"], b"bad")
    a.http.get(
        "/api/v1/keys", headers={"Authorization": "Bearer sgy_pat_0123456789abcdef_notarealsecret"}
    )
    logs = "".join(Path(n.log).read_text(errors="replace") for n in nodes)
    assert '"path": "/api/v1/oauth/token"' in logs, (
        "the access log must be on for this test to mean anything"
    )
    for secret in (
        pg_installation.admin_token,
        assertion,
        token,
        account.private_key_pem.splitlines()[1],
        "notarealsecret",
    ):
        assert secret not in logs
