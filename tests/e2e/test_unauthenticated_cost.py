"""What an unauthenticated caller can cost a real `signery serve`: a flood of
password sign-ins, failure limits shared by replicas, and the audit rows a flood
of refusals leaves."""

from __future__ import annotations

import asyncio
import base64
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from signery.server.audit.models import AuditEventRow
from signery.server.persistence.db import make_engine
from tests.support import Api, Installation, ServerProcess, new_installation, running_server

pytestmark = pytest.mark.e2e

FLOOD = 300
# Peak resident memory allowed to the server while it refuses the flood. Each
# argon2id verification takes 64 MiB: before the bound on verifications at once,
# the thread pool ran 40 of them together (2.5 GB measured here).
PEAK_MEMORY_BOUND_KB = 1024 * 1024
RIGHT = "correct horse battery staple"


def basic(username: str, password: str) -> dict[str, str]:
    return {
        "Authorization": "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()
    }


def peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc")  # pragma: no cover - Linux has it


def refusals_counted(events: list[dict[str, Any]]) -> int:
    """Refusals ``events`` account for, the summing events' counts included."""
    return sum(int(e["details"].get("aggregated", 1)) for e in events)


async def flood(url: str, n: int) -> list[int | str]:
    """``n`` password sign-ins at once, each on a connection of its own."""
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:

        async def one(i: int) -> int | str:
            try:
                r = await http.post(
                    "/api/v1/users/me/tokens",
                    json={"name": "t"},
                    headers=basic(f"nobody-{i % 7}", "guess"),
                )
            except httpx.HTTPError as e:
                return type(e).__name__
            return r.status_code

        return await asyncio.gather(*(one(i) for i in range(n)))


@pytest.fixture(scope="module")
def sqlite_installation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installation]:
    with new_installation("sqlite", tmp_path_factory.mktemp("flood")) as inst:
        yield inst


def events_in_database(installation: Installation, after_seq: int) -> list[dict[str, Any]]:
    engine = make_engine(installation.settings.resolved_database_url, pool_size=1)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(AuditEventRow.kind, AuditEventRow.principal_type, AuditEventRow.details)
                .where(AuditEventRow.seq > after_seq)
                .order_by(AuditEventRow.seq)
            ).all()
    finally:
        engine.dispose()
    return [
        {"kind": r.kind, "principal_type": r.principal_type, "details": json.loads(r.details)}
        for r in rows
    ]


def test_a_flood_of_sign_ins_is_refused_cheaply(sqlite_installation: Installation) -> None:
    """Regression: 300 concurrent Basic attempts each ran argon2id at 64 MiB (3
    requests/s, 1.86 GB), and each refusal was a durable audit row of its own."""
    init = sqlite_installation.init
    with (
        running_server(sqlite_installation, node="flood") as server,
        httpx.Client(base_url=server.url, timeout=60) as http,
    ):
        api = Api(http, sqlite_installation.admin_token, init.issuer, init.root_tsg_id)
        seq = api.last_seq()
        statuses = Counter(asyncio.run(flood(server.url, FLOOD)))
        # Every attempt was answered: refused as a wrong password, or as over a
        # limit; never a server error or a dropped connection.
        assert set(statuses) <= {401, 429}, statuses
        assert statuses[429] > FLOOD // 2, statuses
        assert peak_rss_kb(server.process.pid) < PEAK_MEMORY_BOUND_KB
        # The server still works for everyone else.
        assert http.get("/readyz").status_code == 200
        assert api.ok(http.get("/api/v1/users/me", headers=api.admin))
    # Stopped: the summaries of the interval under way were written on the way out.
    events = events_in_database(sqlite_installation, seq)
    assert {e["principal_type"] for e in events} == {"anonymous"}
    # Each refusal is accounted for: one by one up to the source's share (100 by
    # default, in the one-minute interval), in summing events beyond it.
    assert refusals_counted(events) == FLOOD
    assert len([e for e in events if "aggregated" not in e["details"]]) == 100
    assert len(events) < 100 + 5


# ------------------------------------------------------------------ replicas


@pytest.fixture(scope="module")
def pg_installation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installation]:
    with new_installation("postgresql", tmp_path_factory.mktemp("limits")) as inst:
        yield inst


@pytest.fixture(scope="module")
def replicas(pg_installation: Installation) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    env = {"SIGNERY_AUTH_PASSWORD_FAILURES_PER_USER": "4"}
    with (
        running_server(pg_installation, node="node-a", **env) as a,
        running_server(pg_installation, node="node-b", **env) as b,
    ):
        yield a, b


def test_the_failure_limit_of_a_username_holds_across_replicas(
    pg_installation: Installation, replicas: tuple[ServerProcess, ServerProcess]
) -> None:
    init = pg_installation.init
    with (
        httpx.Client(base_url=replicas[0].url, timeout=60) as a,
        httpx.Client(base_url=replicas[1].url, timeout=60) as b,
    ):
        admin = Api(a, pg_installation.admin_token, init.issuer, init.root_tsg_id)
        username = admin.unique("user")
        admin.ok(
            a.post(
                "/api/v1/users",
                json={"username": username, "password": RIGHT, "tsg_id": init.root_tsg_id},
                headers=admin.admin,
            ),
            201,
        )

        def sign_in(http: httpx.Client, password: str) -> httpx.Response:
            return http.post(
                "/api/v1/users/me/tokens", json={"name": "t"}, headers=basic(username, password)
            )

        for http in (a, b, a, b):
            assert sign_in(http, "wrong").status_code == 401
        # Two failures on each replica, four in all: both refuse, even the right password.
        for http in (a, b):
            refused = sign_in(http, RIGHT)
            assert refused.status_code == 429, refused.text
            assert refused.json()["code"] == "too_many_failed_attempts"
            assert int(refused.headers["retry-after"]) >= 1
