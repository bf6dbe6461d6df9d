"""Master-key rotation: online, crash-safe, complete; and the integrity of the
encrypted material (swapping two keys' material makes signing fail)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, text

from signery.crypto import Hashed
from signery.keystores import (
    BUILTIN_METADATA,
    BuiltinKeyStore,
    KeyContext,
    KeyHandle,
    KeyringFile,
)
from signery.protocol import Algorithm, DigestAlgorithm, SignatureScheme
from signery.server.app import create_app
from signery.server.container import load_keyring
from signery.server.installation.masterkey import rotate_master_key
from signery.server.persistence import meta
from signery.server.persistence.db import Database, make_engine
from tests.support import SIGNERY, Api, Installation, new_installation, server_env

DIGEST = Hashed(DigestAlgorithm.SHA256, hashlib.sha256(b"rotation").digest())
MATERIAL = BUILTIN_METADATA.tables["builtin_key_material"]


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Installation]:
    """An installation of its own: rotation changes the master key file."""
    with new_installation(request.param, tmp_path / "data") as inst:
        yield inst


def store_for(inst: Installation) -> tuple[BuiltinKeyStore, Database]:
    db = Database(make_engine(inst.settings.resolved_database_url, pool_size=2))
    return BuiltinKeyStore(db.engine, load_keyring(inst.settings)), db


def wrapped_by(inst: Installation) -> dict[str, int]:
    engine = make_engine(inst.settings.resolved_database_url, pool_size=1)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(MATERIAL.c.master_key_id, func.count()).group_by(MATERIAL.c.master_key_id)
            )
            return {k: int(n) for k, n in rows}
    finally:
        engine.dispose()


def make_keys(inst: Installation, n: int) -> list[KeyHandle]:
    store, db = store_for(inst)
    try:
        handles = []
        for i in range(n):
            context = KeyContext(str(uuid.uuid4()), 1, inst.init.root_tsg_id, label=f"rot-{i}")
            handles.append(store.generate(Algorithm.EC_P256, context).handle)
        return handles
    finally:
        db.dispose()


def sign_all(inst: Installation, handles: list[KeyHandle]) -> None:
    """Sign with every key through a store that has never seen them (cold cache)."""
    store, db = store_for(inst)
    try:
        for handle in handles:
            assert store.sign(handle, DIGEST, SignatureScheme.ECDSA)
    finally:
        db.dispose()


def test_rotation_rewraps_everything_and_retires_the_old_key(fresh: Installation) -> None:
    handles = make_keys(fresh, 20)
    [old_id] = wrapped_by(fresh)
    report = rotate_master_key(fresh.settings)
    assert report.previous_key_ids == [old_id]
    # The keys above, the CA's two keys and the time-stamping authority's key.
    assert report.rewrapped == 20 + 3
    assert not report.resumed
    assert wrapped_by(fresh) == {report.new_key_id: 23}
    primary, entries = KeyringFile(fresh.settings.resolved_master_key_file).read()
    assert primary == report.new_key_id
    assert [e.key.key_id for e in entries] == [report.new_key_id]
    sign_all(fresh, handles)
    # The installation follows: a server starts, signs and issues tokens with it.
    app = create_app(fresh.settings)
    with TestClient(app) as client:
        api = Api(client, fresh.admin_token, fresh.init.issuer, fresh.init.root_tsg_id)
        tsg = api.create_tsg()
        key = api.create_key(tsg["id"], "EC_P384")  # the CA signs with a re-wrapped key
        token = api.access_token(api.create_account(tsg["id"]))
        assert (
            api.sign(token, key["name"], hashlib.sha384(b"x").digest(), "sha384").status_code == 200
        )
        events = api.ok(
            client.get("/api/v1/audit/events", params={"kind": "keystore"}, headers=api.admin)
        )
        [event] = events["events"]
        assert event["details"]["to"] == report.new_key_id
        assert event["details"]["rewrapped"] == 23
    db = Database(make_engine(fresh.settings.resolved_database_url, pool_size=1))
    try:
        with db.read() as s:
            assert meta.read_meta(s)[meta.MASTER_KEY_ID] == report.new_key_id
    finally:
        db.dispose()


def test_a_rotation_killed_part_way_leaves_every_key_usable(fresh: Installation) -> None:
    handles = make_keys(fresh, 300)
    [old_id] = wrapped_by(fresh)
    env = server_env(fresh)
    proc = subprocess.Popen(
        [SIGNERY, "keystore", "rotate-master-key", "--rate", "150", "--json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            counts = wrapped_by(fresh)
            moved = sum(n for k, n in counts.items() if k != old_id)
            if 10 <= moved < 250:
                break
            assert proc.poll() is None, "the rotation ended before it could be interrupted"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        assert proc.stderr is not None
        proc.stdout.close()
        proc.stderr.close()
    counts = wrapped_by(fresh)
    assert len(counts) == 2, "killed half-way: some keys re-wrapped, some not"
    sign_all(fresh, handles)
    # Run again: it finishes the interrupted rotation instead of starting another.
    report = rotate_master_key(fresh.settings)
    assert report.resumed
    assert report.previous_key_ids == [old_id]
    assert wrapped_by(fresh) == {report.new_key_id: 303}  # + the CA's 2 and the TSA's
    sign_all(fresh, handles)


def test_a_server_keeps_signing_during_a_rotation(fresh: Installation) -> None:
    from tests.support import running_server

    make_keys(fresh, 150)
    with running_server(fresh) as server:
        import httpx

        with httpx.Client(base_url=server.url, timeout=30) as http:
            api = Api(http, fresh.admin_token, fresh.init.issuer, fresh.init.root_tsg_id)
            tsg = api.create_tsg()
            keys = [api.create_key(tsg["id"], "EC_P256", ca="none") for _ in range(3)]
            token = api.access_token(api.create_account(tsg["id"]))
            proc = subprocess.Popen(
                [SIGNERY, "keystore", "rotate-master-key", "--rate", "100", "--json"],
                env=server_env(fresh),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            statuses: list[int] = []
            while proc.poll() is None:
                for key in keys:
                    statuses.append(api.sign(token, key["name"], DIGEST.digest).status_code)
                    # A new key during the rotation is wrapped by the newest primary.
                if len(statuses) % 30 == 0:
                    keys.append(api.create_key(tsg["id"], "EC_P256", ca="none"))
            out, errors = proc.communicate()
            assert proc.returncode == 0, errors
            report: dict[str, Any] = json.loads(out)
            assert statuses, "the rotation was too quick to sign during it"
            assert set(statuses) == {200}
            # Cold caches: a key created during the rotation still signs after it.
            assert api.ok(http.get("/readyz"))["checks"]["keystore:builtin"] == "ok"
    assert set(wrapped_by(fresh)) == {report["new_key_id"]}
    with (
        running_server(fresh, node="after") as server,
        httpx.Client(base_url=server.url, timeout=30) as http,
    ):
        api = Api(http, fresh.admin_token, fresh.init.issuer, fresh.init.root_tsg_id)
        token = api.access_token(api.create_account(tsg["id"]))
        for key in keys:
            assert api.sign(token, key["name"], DIGEST.digest).status_code == 200


def test_rotation_needs_the_key_file(tmp_path: Path) -> None:
    import base64
    import secrets

    from signery.errors import ConfigurationError

    with (
        new_installation(
            "sqlite",
            tmp_path / "data",
            master_key=base64.b64encode(secrets.token_bytes(32)).decode(),
        ) as inst,
        pytest.raises(ConfigurationError, match="SIGNERY_MASTER_KEY"),
    ):
        rotate_master_key(inst.settings)


def test_swapped_material_fails_with_an_integrity_error(fresh: Installation) -> None:
    """Moving one key's encrypted material into another key's row must not sign
    with the wrong key: the AAD (key id, version, TSG) does not match."""
    app = create_app(fresh.settings)
    with TestClient(app) as client:
        api = Api(client, fresh.admin_token, fresh.init.issuer, fresh.init.root_tsg_id)
        tsg = api.create_tsg()
        a = api.create_key(tsg["id"], "EC_P256", ca="none")
        b = api.create_key(tsg["id"], "EC_P256", ca="none")
        account = api.create_account(tsg["id"])
    engine = make_engine(fresh.settings.resolved_database_url, pool_size=1)
    try:
        with engine.begin() as conn:
            rows = {
                r.key_id: r
                for r in conn.execute(
                    select(MATERIAL).where(MATERIAL.c.key_id.in_([a["id"], b["id"]]))
                )
            }
            for mine, theirs in ((a["id"], b["id"]), (b["id"], a["id"])):
                conn.execute(
                    MATERIAL.update()
                    .where(MATERIAL.c.key_id == mine)
                    .values(
                        ciphertext=rows[theirs].ciphertext, wrapped_dek=rows[theirs].wrapped_dek
                    )
                )
            conn.execute(text("SELECT 1"))
    finally:
        engine.dispose()
    app = create_app(fresh.settings)  # a new process: nothing decrypted in memory
    with TestClient(app, raise_server_exceptions=False) as client:
        api = Api(client, fresh.admin_token, fresh.init.issuer, fresh.init.root_tsg_id)
        token = api.access_token(account)
        seq = api.last_seq()
        before = api.usage()
        response = api.sign(token, a["name"], DIGEST.digest)
        assert response.status_code == 500
        assert response.json()["code"] == "master_key_mismatch"
        assert "signature" not in response.json()
        [event] = api.events_after(seq)
        assert (event["kind"], event["reason"], event["key_id"]) == (
            "signing.sign.error",
            "master_key_mismatch",
            a["id"],
        )
        after = api.usage()
        assert api.counter(after, "key", a["id"])[0] == api.counter(before, "key", a["id"])[0]
