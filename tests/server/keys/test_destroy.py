"""Scheduled destruction: 7 to 30 days of waiting with the key disabled, a cancel
that restores it, then the scheduler erases the material of every version in its
store (built-in: the encrypted row; SoftHSM2: the PKCS#11 objects; AWS KMS (moto):
ScheduleKeyDeletion) and the key is destroyed for good, its metadata and history
kept. The background scheduler is off here: the tests run it themselves."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from signery.server.app import create_app
from tests.keystores.moto import kms_settings, moto_kms
from tests.keystores.softhsm import claim_token, pkcs11_tool
from tests.server.keys.lifecycle_helpers import (
    action,
    builtin_material,
    events_of,
    key_of,
    services_of,
    sign,
    store_refs,
)
from tests.support import Account, Api, FakeClock, Installation, new_installation

DIGEST = hashlib.sha256(b"to be destroyed").digest()
DAY = 86400


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def installation(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Installation]:
    data_dir = tmp_path_factory.mktemp(f"signery-destroy-{request.param}")
    with new_installation(request.param, data_dir, scheduler_interval_seconds=0) as inst:
        yield inst


@pytest.fixture(scope="module")
def tsg(api: Api) -> dict[str, Any]:
    return api.create_tsg()


@pytest.fixture(scope="module")
def account(api: Api, tsg: dict[str, Any]) -> Account:
    return api.create_account(tsg["id"])


def refused(response: Any, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["code"] == code, response.text


def test_destruction_waits_can_be_cancelled_then_erases_every_version(
    api: Api,
    installation: Installation,
    app_client: TestClient,
    clock: FakeClock,
    tsg: dict[str, Any],
    account: Account,
) -> None:
    token = api.access_token(account)
    key = api.create_key(tsg["id"], "EC_P256")
    api.ok(action(api, key["id"], "rotate"))
    refs = store_refs(installation, key["id"])
    assert len(refs) == 2
    assert builtin_material(installation, refs) == 2

    # 7 to 30 days, like KMS.
    for days in (6, 31):
        refused(action(api, key["id"], "destroy", {"after_days": days}), 400, "validation_failed")
    seq = api.last_seq()
    scheduled = api.ok(action(api, key["id"], "destroy", {"after_days": 7}))
    assert scheduled["status"] == "disabled"
    assert scheduled["destroy_at"] is not None
    (event,) = events_of(api, seq, "key.destruction.scheduled")
    assert event["details"]["after_days"] == 7
    assert event["details"]["status_before"] == "active"
    # Disabled meanwhile: refused, enable refused, a second schedule refused.
    refused(sign(api, token, key["name"], DIGEST), 409, "key_disabled")
    refused(action(api, key["id"], "enable"), 409, "key_destruction_scheduled")
    refused(action(api, key["id"], "destroy", {"after_days": 10}), 409, "key_destruction_scheduled")
    refused(action(api, key["id"], "rotate"), 409, "key_destruction_scheduled")

    seq = api.last_seq()
    cancelled = api.ok(action(api, key["id"], "cancel-destroy"))
    assert cancelled["status"] == "active"
    assert cancelled["destroy_at"] is None
    assert [e["kind"] for e in api.events_after(seq)] == ["key.destruction.cancelled"]
    assert api.ok(sign(api, token, key["name"], DIGEST))["key_version"] == 2
    refused(action(api, key["id"], "cancel-destroy"), 409, "conflict")

    api.ok(action(api, key["id"], "destroy", {"after_days": 7}))
    scheduler = services_of(app_client).scheduler
    # Not yet due: nothing happens.
    clock.advance(6 * DAY)
    scheduler.run_due()
    assert builtin_material(installation, refs) == 2
    assert key_of(api, key["id"])["status"] == "disabled"

    clock.advance(2 * DAY)
    seq = api.last_seq()
    summary = scheduler.run_due()
    assert summary["key_destruction"] == {"done": 1, "failed": 0}
    assert builtin_material(installation, refs) == 0
    destroyed = key_of(api, key["id"])
    assert destroyed["status"] == "destroyed"
    assert destroyed["destroyed_at"] is not None
    assert destroyed["destroy_at"] is None
    # Metadata, public keys and certificates remain.
    assert [v["status"] for v in destroyed["versions"]] == ["destroyed", "destroyed"]
    assert all(v["destroyed_at"] and v["public_key_pem"] for v in destroyed["versions"])
    assert all(v["certificate_chain"] for v in destroyed["versions"])
    (event,) = events_of(api, seq, "key.destroyed")
    assert event["principal"]["type"] == "system"
    assert event["details"]["versions"] == [1, 2]
    assert event["key_id"] == key["id"]

    # Final: everything refuses, signing answers 409 key_destroyed (not counted).
    token = api.access_token(account, now=clock.now().timestamp())
    usage = api.usage()
    refused(sign(api, token, key["name"], DIGEST), 409, "key_destroyed")
    assert api.counter(api.usage(), "key", key["id"]) == api.counter(usage, "key", key["id"])
    for name, body in (
        ("enable", None),
        ("disable", None),
        ("cancel-destroy", None),
        ("rotate", None),
        ("renew", None),
        ("reissue", {"subject": {"common_name": "Other"}}),
        ("destroy", {"after_days": 7}),
    ):
        refused(action(api, key["id"], name, body), 409, "key_destroyed")
    refused(
        api.http.put(
            f"/api/v1/keys/{key['id']}/rotation",
            json={"rotation_period_days": 30},
            headers=api.admin,
        ),
        409,
        "key_destroyed",
    )
    # Still listed, with its history.
    listed = api.ok(api.http.get("/api/v1/keys", headers=api.admin))
    assert any(k["id"] == key["id"] and k["status"] == "destroyed" for k in listed)
    history = api.ok(
        api.http.get(
            "/api/v1/audit/events", params={"key_id": key["id"], "limit": 1000}, headers=api.admin
        )
    )["events"]
    assert {"key.created", "key.rotated", "key.destroyed"} <= {e["kind"] for e in history}
    # A second run does nothing more.
    assert scheduler.run_due()["key_destruction"] == {"done": 0, "failed": 0}


def test_a_disabled_key_gets_its_status_back_when_destruction_is_cancelled(
    api: Api, tsg: dict[str, Any]
) -> None:
    key = api.create_key(tsg["id"], "EC_P256")
    api.ok(action(api, key["id"], "disable"))
    api.ok(action(api, key["id"], "destroy", {"after_days": 30}))
    assert api.ok(action(api, key["id"], "cancel-destroy"))["status"] == "disabled"


def test_a_failed_destruction_is_audited_and_retried(
    api: Api,
    installation: Installation,
    app_client: TestClient,
    clock: FakeClock,
    tsg: dict[str, Any],
) -> None:
    """The store fails the first time (the key's store is unknown to this server
    for a moment): key.destruction.failed, the key stays disabled and cannot be
    un-scheduled any more, and a later run completes the destruction."""
    from sqlalchemy import update

    from signery.server.keys.models import SigningKeyRow
    from signery.server.persistence.db import make_engine

    key = api.create_key(tsg["id"], "EC_P256")
    refs = store_refs(installation, key["id"])
    api.ok(action(api, key["id"], "destroy", {"after_days": 7}))
    engine = make_engine(installation.settings.resolved_database_url, pool_size=1)

    def set_storage(name: str) -> None:
        with engine.begin() as conn:
            conn.execute(
                update(SigningKeyRow).where(SigningKeyRow.id == key["id"]).values(storage=name)
            )

    scheduler = services_of(app_client).scheduler
    clock.advance(8 * DAY)
    seq = api.last_seq()
    try:
        set_storage("missing-store")
        assert scheduler.run_due()["key_destruction"] == {"done": 0, "failed": 1}
    finally:
        set_storage("builtin")
        engine.dispose()
    (event,) = events_of(api, seq, "key.destruction.failed")
    assert event["outcome"] == "error"
    assert event["principal"]["type"] == "system"
    assert builtin_material(installation, refs) == 1
    assert key_of(api, key["id"])["status"] == "disabled"
    refused(action(api, key["id"], "cancel-destroy"), 409, "conflict")
    # Retried once the claim's lease ends.
    assert scheduler.run_due()["key_destruction"] == {"done": 0, "failed": 0}
    clock.advance(11 * 60)
    assert scheduler.run_due()["key_destruction"] == {"done": 1, "failed": 0}
    assert builtin_material(installation, refs) == 0
    assert key_of(api, key["id"])["status"] == "destroyed"


# ------------------------------------------------------------------ hardware stores


def _pkcs11(tmp: Path) -> Iterator[tuple[Installation, dict[str, Any]]]:
    token = claim_token()
    with new_installation(
        "sqlite", tmp, pkcs11=token.settings(), scheduler_interval_seconds=0
    ) as inst:
        yield inst, {"token": token}


def _aws_kms(tmp: Path) -> Iterator[tuple[Installation, dict[str, Any]]]:
    server = moto_kms()
    settings = kms_settings(server.url, alias_prefix="alias/signery-destroy-test")
    with new_installation("sqlite", tmp, aws_kms=settings, scheduler_interval_seconds=0) as inst:
        yield inst, {"kms": server.client()}


@pytest.fixture(scope="module", params=["pkcs11", "aws-kms"])
def hardware(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Installation, dict[str, Any], Api, TestClient, FakeClock]]:
    make = _pkcs11 if request.param == "pkcs11" else _aws_kms
    for inst, where in make(tmp_path_factory.mktemp(f"destroy-{request.param}")):
        fake = FakeClock()
        with TestClient(
            create_app(inst.settings, clock=fake), base_url="http://signery.test"
        ) as client:
            init = inst.init
            yield (
                request.param,
                inst,
                where,
                Api(client, inst.admin_token, init.issuer, init.root_tsg_id),
                client,
                fake,
            )


def private_keys_on_token(where: dict[str, Any]) -> int:
    listed = pkcs11_tool(where["token"], "--list-objects", "--type", "privkey")
    assert listed.returncode == 0, listed.stderr
    return listed.stdout.count("Private Key Object")


def test_destruction_in_a_hardware_store(
    hardware: tuple[str, Installation, dict[str, Any], Api, TestClient, FakeClock],
) -> None:
    store, installation, where, api, client, fake = hardware
    tsg = api.create_tsg()
    signer = api.create_account(tsg["id"])
    token = api.access_token(signer)
    key = api.create_key(tsg["id"], "EC_P256", storage=store)
    api.ok(action(api, key["id"], "rotate"))
    assert api.ok(sign(api, token, key["name"], DIGEST))["key_version"] == 2
    refs = store_refs(installation, key["id"])
    if store == "pkcs11":
        before = private_keys_on_token(where)
        assert before >= 2
    else:
        for ref in refs:
            assert where["kms"].describe_key(KeyId=ref)["KeyMetadata"]["KeyState"] == "Enabled"

    api.ok(action(api, key["id"], "destroy", {"after_days": 7}))
    fake.advance(7 * DAY + 60)
    assert services_of(client).scheduler.run_due()["key_destruction"] == {"done": 1, "failed": 0}

    if store == "pkcs11":
        assert private_keys_on_token(where) == before - 2
    else:
        for ref in refs:
            state = where["kms"].describe_key(KeyId=ref)["KeyMetadata"]["KeyState"]
            assert state == "PendingDeletion"
    assert key_of(api, key["id"])["status"] == "destroyed"
    token = api.access_token(signer, now=fake.now().timestamp())
    refused(sign(api, token, key["name"], DIGEST), 409, "key_destroyed")
