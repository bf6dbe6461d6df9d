"""`signery serve --workers N` on the embedded SQLite database: several processes
commit audit events to one file; every signature still has its event and counter."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support import Api, Installation, ServerProcess, new_installation, running_server

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def sqlite_installation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installation]:
    with new_installation("sqlite", tmp_path_factory.mktemp("workers")) as inst:
        yield inst


@pytest.fixture(scope="module")
def two_workers(sqlite_installation: Installation) -> Iterator[ServerProcess]:
    with running_server(sqlite_installation, SIGNERY_WORKERS="2") as server:
        yield server


def test_signatures_from_several_workers_are_all_audited(
    sqlite_installation: Installation, two_workers: ServerProcess
) -> None:
    init = sqlite_installation.init
    with httpx.Client(base_url=two_workers.url, timeout=30) as http:
        api = Api(http, sqlite_installation.admin_token, init.issuer, init.root_tsg_id)
        tsg = api.create_tsg()
        key = api.create_key(tsg["id"], "EC_P256")
        account = api.create_account(tsg["id"])
        token = api.access_token(account)
        seq = api.last_seq()
    statuses: list[int] = []
    lock = threading.Lock()

    def hammer(n: int) -> None:
        with httpx.Client(base_url=two_workers.url, timeout=30) as http:
            worker = Api(http, "", init.issuer, init.root_tsg_id)
            for i in range(n):
                r = worker.sign(token, key["name"], hashlib.sha256(f"{i}".encode()).digest())
                with lock:
                    statuses.append(r.status_code)

    threads = [threading.Thread(target=hammer, args=(40,)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [200] * 240
    with httpx.Client(base_url=two_workers.url, timeout=30) as http:
        api = Api(http, sqlite_installation.admin_token, init.issuer, init.root_tsg_id)
        events: list[dict[str, Any]] = [
            e for e in api.events_after(seq) if e["kind"] == "signing.sign.succeeded"
        ]
        assert len(events) == 240
        assert api.counter(api.usage(), "key", key["id"]) == (240, 0)
    # Worker processes name themselves host:pid; the address is the real peer.
    assert all(e["node_id"] and ":" in e["node_id"] for e in events)
    assert {e["client_ip"] for e in events} == {"127.0.0.1"}
