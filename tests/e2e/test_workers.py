"""`signery serve --workers N` on the embedded SQLite database: several processes
commit audit events to one file; every signature still has its event and counter."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
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


METRICS_TOKEN = "workers-metrics-" + "0123456789abcdef" * 2


def succeeded_signings(metrics_text: str) -> float:
    """The sum of every ``signery_signings_total`` sample with outcome succeeded."""
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("signery_signings_total{") and 'outcome="succeeded"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_every_scrape_counts_every_worker(sqlite_installation: Installation) -> None:
    """Regression: with several workers, /metrics showed the counts of whichever
    worker answered the scrape."""
    init = sqlite_installation.init
    with running_server(
        sqlite_installation,
        node="metrics",
        SIGNERY_WORKERS="2",
        SIGNERY_METRICS_TOKEN=METRICS_TOKEN,
    ) as server:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            api = Api(http, sqlite_installation.admin_token, init.issuer, init.root_tsg_id)
            tsg = api.create_tsg()
            key = api.create_key(tsg["id"], "EC_P256")
            token = api.access_token(api.create_account(tsg["id"]))
            seq = api.last_seq()
        signed = 0
        nodes: set[str] = set()
        deadline = time.monotonic() + 120
        while len(nodes) < 2:
            assert time.monotonic() < deadline, f"one worker served every connection: {nodes}"
            for _ in range(10):
                # A connection of its own each time: the kernel spreads new
                # connections over the workers' sockets.
                with httpx.Client(base_url=server.url, timeout=30) as http:
                    worker = Api(http, "", init.issuer, init.root_tsg_id)
                    digest = hashlib.sha256(f"{signed}".encode()).digest()
                    worker.ok(worker.sign(token, key["name"], digest))
                signed += 1
            with httpx.Client(base_url=server.url, timeout=30) as http:
                api = Api(http, sqlite_installation.admin_token, init.issuer, init.root_tsg_id)
                nodes = {
                    e["node_id"]
                    for e in api.events_after(seq)
                    if e["kind"] == "signing.sign.succeeded"
                }
        # Every scrape, whichever worker answers it, shows both workers' signatures.
        for _ in range(6):
            assert succeeded_signings(scrape(server.url)) == signed
        # A worker that dies is replaced; what it counted stays in the sums.
        killed = worker_pids(server.process.pid)[0]
        os.kill(killed, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while len(pids := worker_pids(server.process.pid)) < 2 or killed in pids:
            assert time.monotonic() < deadline, "the supervisor did not replace the worker"
            time.sleep(0.2)
        for _ in range(6):
            assert succeeded_signings(scrape(server.url)) == signed


def scrape(url: str) -> str:
    with httpx.Client(base_url=url, timeout=30) as http:  # a new connection: any worker
        r = http.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert r.status_code == 200, r.text
    return r.text


def worker_pids(supervisor: int) -> list[int]:
    """The supervisor's worker processes (not multiprocessing's resource tracker)."""
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    return [
        int(pid) for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
