"""Completeness under crashes: `signery serve` is killed with SIGKILL at random
moments during a stream of signings, again and again, on one installation. Then
every signature a client received must have its audit event (same key, same
version), the usage counters must equal the number of success events, and the
audit chain must verify.

Every server also forwards the trail to a syslog collector (the audit sink):
after the last kill, the collector must have received every event.

Two lanes run side by side (two server processes, two node ids, on the same
database), each restarting its server after every kill, so concurrent writers
are killed too. The seed is printed, to replay a failing run."""

from __future__ import annotations

import base64
import hashlib
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, func, select
from sqlalchemy.engine import Engine

from signery.server.audit.models import (
    AuditEventRow,
    AuditSinkCursorRow,
    UsageCounterRow,
    UsageDailyRow,
)
from signery.server.audit.offline import verify_database
from tests.server.audit.sink_receivers import SyslogReceiver
from tests.support import Api, Installation, free_port, new_installation, running_server

pytestmark = pytest.mark.e2e

CLIENT_THREADS = 3  # concurrent requests per server (keep-alive connections)
KILL_DELAY_MS = (50, 400)  # after the first signature of a trial
LANES = ("crash-a", "crash-b")
SUCCEEDED = "signing.sign.succeeded"


@dataclass
class Received:
    """What clients got back: digest (hex) -> key version, and what went wrong."""

    signatures: dict[str, int] = field(default_factory=dict)
    other_statuses: dict[int, int] = field(default_factory=dict)
    cut_requests: int = 0  # requests in flight when the server died
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(frozen=True)
class Scene:
    token: str
    key_name: str
    key_id: str
    account_id: str


@pytest.fixture(scope="module", params=[("sqlite", 100), ("postgresql", 10)], ids=lambda p: p[0])
def trial_setup(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Installation, int]]:
    backend, trials = request.param
    with new_installation(backend, tmp_path_factory.mktemp(f"crash-{backend}")) as inst:
        yield inst, trials


def prepare(installation: Installation, env: dict[str, str]) -> Scene:
    with (
        running_server(installation, node="crash-setup", **env) as server,
        httpx.Client(base_url=server.url, timeout=30) as http,
    ):
        api = Api(
            http, installation.admin_token, installation.init.issuer, installation.init.root_tsg_id
        )
        tsg = api.create_tsg()
        account = api.create_account(tsg["id"])
        key = api.create_key(tsg["id"], "EC_P256", ca="none")
        # An access token lives 15 minutes and survives restarts (its secret is in
        # the database): one for the whole run.
        return Scene(api.access_token(account), key["name"], key["id"], account.id)


def client_stream(
    url: str, scene: Scene, tag: str, received: Received, first: threading.Event
) -> None:
    body: dict[str, Any] = {"digest_algorithm": "sha256", "scheme": "ecdsa"}
    headers = {"Authorization": f"Bearer {scene.token}"}
    with httpx.Client(base_url=url, timeout=10) as http:
        for i in range(1_000_000):
            digest = hashlib.sha256(f"{tag}-{i}".encode()).digest()
            body["digest"] = base64.b64encode(digest).decode()
            try:
                r = http.post(
                    f"/api/v1/signing/keys/{scene.key_name}/sign", json=body, headers=headers
                )
            except httpx.TransportError:
                with received.lock:
                    received.cut_requests += 1
                return
            with received.lock:
                if r.status_code == 200:
                    received.signatures[digest.hex()] = int(r.json()["key_version"])
                    first.set()
                else:
                    received.other_statuses[r.status_code] = (
                        received.other_statuses.get(r.status_code, 0) + 1
                    )


def sink_env(receiver: SyslogReceiver) -> dict[str, str]:
    """Every server forwards to a syslog collector; a killed holder's lease lapses in 1 s."""
    return {
        "SIGNERY_AUDIT_SYSLOG_URL": f"tcp://127.0.0.1:{receiver.port}",
        "SIGNERY_AUDIT_SINK_POLL_SECONDS": "0.05",
        "SIGNERY_AUDIT_SINK_RETRY_MAX_SECONDS": "0.5",
        "SIGNERY_AUDIT_SINK_LEASE_SECONDS": "1",
        "SIGNERY_AUDIT_SINK_GAP_SECONDS": "2",
    }


def run_lane(
    installation: Installation,
    scene: Scene,
    node: str,
    trials: int,
    seed: int,
    received: Received,
    env: dict[str, str],
) -> None:
    rng = random.Random(f"{seed}-{node}")
    for trial in range(trials):
        with running_server(installation, node=node, **env) as server:
            first = threading.Event()
            clients = [
                threading.Thread(
                    target=client_stream,
                    args=(server.url, scene, f"{seed}-{node}-{trial}-{c}", received, first),
                    daemon=True,
                )
                for c in range(CLIENT_THREADS)
            ]
            for c in clients:
                c.start()
            assert first.wait(30), server.log_tail()
            time.sleep(rng.uniform(*KILL_DELAY_MS) / 1000)
            os.kill(server.process.pid, signal.SIGKILL)
            server.process.wait(10)
            for c in clients:
                c.join(30)
                assert not c.is_alive()


def assert_chain_clean(db_url: str) -> None:
    """`signery audit verify` on the database reports nothing: every node's hash
    chain is whole (no altered, missing, inserted or reordered event, no truncated
    tail) after all the kills."""
    report = verify_database(db_url)
    assert report.clean, report.as_dict()
    assert report.chained > 0
    assert report.unchained == 0, "every event of the trials is chained"


def success_events(engine: Engine, key_id: str) -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(AuditEventRow.digest, AuditEventRow.key_version).where(
                AuditEventRow.kind == SUCCEEDED, AuditEventRow.key_id == key_id
            )
        ).all()
    events: dict[str, int] = {}
    for digest, version in rows:
        assert digest not in events, f"two success events for digest {digest}"
        events[str(digest).lower()] = int(version)
    return events


def all_event_ids(engine: Engine) -> list[tuple[int, str]]:
    with engine.connect() as conn:
        rows = conn.execute(select(AuditEventRow.seq, AuditEventRow.id).order_by(AuditEventRow.seq))
        return [(int(seq), str(id_)) for seq, id_ in rows]


def sink_cursor(engine: Engine) -> int:
    with engine.connect() as conn:
        last = conn.execute(
            select(AuditSinkCursorRow.last_seq).where(AuditSinkCursorRow.sink == "syslog")
        ).scalar()
    return int(last or 0)


def counters(engine: Engine, scope: str, subject: str) -> tuple[int, int]:
    with engine.connect() as conn:
        total = conn.execute(
            select(UsageCounterRow.successes).where(
                UsageCounterRow.scope == scope, UsageCounterRow.subject_id == subject
            )
        ).scalar()
        daily = conn.execute(
            select(func.sum(UsageDailyRow.successes)).where(
                UsageDailyRow.scope == scope, UsageDailyRow.subject_id == subject
            )
        ).scalar()
    return int(total or 0), int(daily or 0)


@pytest.fixture
def collector() -> Iterator[SyslogReceiver]:
    receiver = SyslogReceiver("tcp", free_port())
    receiver.start()
    yield receiver
    receiver.stop()


def test_no_received_signature_is_missing_from_the_audit_trail_after_sigkills(
    trial_setup: tuple[Installation, int], collector: SyslogReceiver
) -> None:
    installation, trials = trial_setup
    env = sink_env(collector)
    scene = prepare(installation, env)
    seed = int(os.environ.get("SIGNERY_CRASH_SEED", random.SystemRandom().randrange(10**6)))
    received = Received()
    started = time.monotonic()
    errors: list[BaseException] = []

    def lane(node: str) -> None:
        try:
            run_lane(installation, scene, node, trials // len(LANES), seed, received, env)
        except BaseException as e:  # surfaced below, in the test's thread
            errors.append(e)

    runners = [threading.Thread(target=lane, args=(node,)) for node in LANES]
    for r in runners:
        r.start()
    for r in runners:
        r.join()
    if errors:
        raise errors[0]
    elapsed = time.monotonic() - started

    engine = create_engine(installation.settings.resolved_database_url)
    try:
        # One more server: it takes over the sink from the killed holder and
        # forwards whatever is left; then the collector must have every event.
        with running_server(installation, node="crash-final", **env):
            deadline = time.monotonic() + 30
            while sink_cursor(engine) < all_event_ids(engine)[-1][0]:
                assert time.monotonic() < deadline, "the sink did not catch up"
                time.sleep(0.1)
        trail = all_event_ids(engine)
        forwarded = [e["id"] for e in collector.events()]
        events = success_events(engine, scene.key_id)
        key_counter = counters(engine, "key", scene.key_id)
        account_counter = counters(engine, "account", scene.account_id)
    finally:
        engine.dispose()
    found = [d for d in received.signatures if d in events]
    lost = len(received.signatures) - len(found)
    print(
        f"\ncrash trials [{installation.backend}] seed={seed}: "
        f"trials={trials // len(LANES) * len(LANES)} "
        f"signatures received={len(received.signatures)} events found={len(found)} lost={lost} "
        f"success events={len(events)} (signed, answer cut by the kill: "
        f"{len(events) - len(found)}) requests cut={received.cut_requests} "
        f"other statuses={received.other_statuses} time={elapsed:.0f}s"
    )
    print(
        f"sink [{installation.backend}]: events in the trail={len(trail)} "
        f"forwarded={len(set(forwarded))} missing={len({i for _, i in trail} - set(forwarded))} "
        f"sent again (at least once)={len(forwarded) - len(set(forwarded))}"
    )
    assert lost == 0
    assert set(forwarded) == {i for _, i in trail}
    assert all(events[d] == v for d, v in received.signatures.items())
    assert received.other_statuses == {}
    assert key_counter == (len(events), len(events))
    assert account_counter == (len(events), len(events))
    assert_chain_clean(installation.settings.resolved_database_url)
