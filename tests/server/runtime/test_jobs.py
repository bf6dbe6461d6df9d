"""Scheduled rotation and the background scheduler: a key with a rotation period
is rotated once its time comes, by exactly one of several schedulers running at
once (two Services on the same database), as the system; a failed rotation is
audited and retried; the scheduler thread runs its jobs and stops promptly."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from datetime import datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from signery.server.app import create_app
from signery.server.runtime.jobs import Job, Scheduler
from tests.server.keys.lifecycle_helpers import action, events_of, key_of, services_of
from tests.support import Api, FakeClock, Installation, inserts_fail, new_installation

DAY = 86400


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def installation(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Installation]:
    data_dir = tmp_path_factory.mktemp(f"signery-scheduler-{request.param}")
    with new_installation(request.param, data_dir, scheduler_interval_seconds=0) as inst:
        yield inst


@pytest.fixture(scope="module")
def replica(installation: Installation, module_clock: FakeClock) -> Iterator[TestClient]:
    """A second in-process server on the same database and clock."""
    with TestClient(
        create_app(installation.settings, clock=module_clock), base_url="http://signery.test"
    ) as client:
        yield client


@pytest.fixture(scope="module")
def tsg(api: Api) -> dict[str, Any]:
    return api.create_tsg()


def set_rotation(api: Api, key_id: str, days: int | None) -> dict[str, Any]:
    return api.ok(  # type: ignore[no-any-return]
        api.http.put(
            f"/api/v1/keys/{key_id}/rotation",
            json={"rotation_period_days": days},
            headers=api.admin,
        )
    )


def test_a_due_rotation_is_done_once_by_concurrent_schedulers(
    api: Api,
    app_client: TestClient,
    replica: TestClient,
    clock: FakeClock,
    tsg: dict[str, Any],
) -> None:
    key = api.create_key(tsg["id"], "EC_P256")
    seq = api.last_seq()
    scheduled = set_rotation(api, key["id"], 30)
    assert scheduled["rotation_period_days"] == 30
    first_due = datetime.fromisoformat(scheduled["next_rotation_at"])
    assert abs(first_due - (clock.now() + timedelta(days=30))) < timedelta(minutes=1)
    (event,) = events_of(api, seq, "key.rotation.scheduled")
    assert event["details"]["rotation_period_days"] == 30

    schedulers = [services_of(app_client).scheduler, services_of(replica).scheduler]
    assert all(s.run_due()["key_rotation"]["done"] == 0 for s in schedulers)
    clock.advance(30 * DAY + 60)
    seq = api.last_seq()
    done: list[int] = []
    for _ in range(3):
        barrier = threading.Barrier(len(schedulers))
        summaries: list[Mapping[str, Mapping[str, int]]] = []

        def run(
            s: Scheduler,
            barrier: threading.Barrier = barrier,
            summaries: list[Mapping[str, Mapping[str, int]]] = summaries,
        ) -> None:
            barrier.wait()
            summaries.append(s.run_due())

        threads = [threading.Thread(target=run, args=(s,)) for s in schedulers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(summaries) == 2
        assert all(summary["key_rotation"]["failed"] == 0 for summary in summaries)
        done.append(sum(summary["key_rotation"]["done"] for summary in summaries))

    assert done == [1, 0, 0]
    rotated = key_of(api, key["id"])
    assert rotated["current_version"] == 2
    assert [v["status"] for v in rotated["versions"]] == ["archived", "active"]
    (event,) = events_of(api, seq, "key.rotated")
    assert event["principal"]["type"] == "system"
    assert event["details"]["previous_version"] == 1
    # The next rotation is one period after this one.
    next_due = datetime.fromisoformat(rotated["next_rotation_at"])
    assert abs(next_due - (clock.now() + timedelta(days=30))) < timedelta(minutes=1)


def test_a_manual_rotation_moves_the_schedule_and_never_stops_it(
    api: Api, clock: FakeClock, tsg: dict[str, Any]
) -> None:
    key = api.create_key(tsg["id"], "EC_P256", rotation_period_days=90)
    assert key["rotation_period_days"] == 90
    created_due = datetime.fromisoformat(key["next_rotation_at"])
    clock.advance(10 * DAY)
    rotated = api.ok(action(api, key["id"], "rotate"))
    moved = datetime.fromisoformat(rotated["next_rotation_at"])
    assert moved - created_due > timedelta(days=9)
    never = set_rotation(api, key["id"], None)
    assert never["rotation_period_days"] is None
    assert never["next_rotation_at"] is None
    bad = api.http.put(
        f"/api/v1/keys/{key['id']}/rotation", json={"rotation_period_days": 0}, headers=api.admin
    )
    assert bad.status_code == 400


def test_a_failed_scheduled_rotation_is_audited_and_retried(
    api: Api,
    installation: Installation,
    app_client: TestClient,
    clock: FakeClock,
    tsg: dict[str, Any],
) -> None:
    key = api.create_key(tsg["id"], "EC_P256", rotation_period_days=1)
    scheduler = services_of(app_client).scheduler
    clock.advance(DAY + 60)
    seq = api.last_seq()
    with inserts_fail(installation, "key_versions"):
        summary = scheduler.run_due()
    assert summary["key_rotation"]["failed"] >= 1
    failed = [e for e in events_of(api, seq, "key.rotation.failed") if e["key_id"] == key["id"]]
    assert len(failed) == 1
    assert failed[0]["principal"]["type"] == "system"
    assert failed[0]["outcome"] == "error"
    assert key_of(api, key["id"])["current_version"] == 1
    # Claimed for a lease: not retried at once, but after it.
    scheduler.run_due()
    assert key_of(api, key["id"])["current_version"] == 1
    clock.advance(11 * 60)
    scheduler.run_due()
    assert key_of(api, key["id"])["current_version"] == 2


def test_a_disabled_key_is_not_rotated_by_the_schedule(
    api: Api, app_client: TestClient, clock: FakeClock, tsg: dict[str, Any]
) -> None:
    key = api.create_key(tsg["id"], "EC_P256", rotation_period_days=1)
    api.ok(action(api, key["id"], "disable"))
    clock.advance(2 * DAY)
    services_of(app_client).scheduler.run_due()
    assert key_of(api, key["id"])["current_version"] == 1


# ------------------------------------------------------------------ the thread


def test_the_thread_runs_every_job_survives_a_failing_one_and_stops_promptly() -> None:
    calls: list[str] = []
    ran = threading.Event()

    def failing(now: datetime) -> Mapping[str, int]:
        calls.append("failing")
        raise RuntimeError("boom")

    def counting(now: datetime) -> Mapping[str, int]:
        calls.append("counting")
        if calls.count("counting") >= 3:
            ran.set()
        return {"done": 0}

    scheduler = Scheduler(
        clock=FakeClock(),
        interval_seconds=0.02,
        jobs=[Job("failing", failing), Job("counting", counting)],
    )
    scheduler.start()
    try:
        assert ran.wait(10)
        assert scheduler.running
    finally:
        started = time.monotonic()
        scheduler.stop()
    assert time.monotonic() - started < 10  # far below the interval: stop does not wait it out
    assert not scheduler.running
    assert calls.count("failing") >= 3
    assert scheduler.run_due()["failing"] == {"error": 1}


def test_a_zero_interval_starts_no_thread() -> None:
    scheduler = Scheduler(clock=FakeClock(), interval_seconds=0, jobs=[])
    scheduler.start()
    assert not scheduler.running
    scheduler.stop()


def test_a_long_interval_still_stops_at_once() -> None:
    scheduler = Scheduler(clock=FakeClock(), interval_seconds=3600, jobs=[])
    scheduler.start()
    started = time.monotonic()
    scheduler.stop()
    assert time.monotonic() - started < 10  # far below the interval: stop does not wait it out
