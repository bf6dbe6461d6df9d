"""The audit hash chain and signed checkpoints (issue 7, integrity).

Chain writing and checkpoints run on SQLite and PostgreSQL. The tamper matrix
runs on SQLite copies of the database (a consistent copy through SQLite's
backup API, then direct SQL on the copy); the verifier is the same pure
function whatever database the rows came from."""

# The tamper matrix edits database copies with hand-written SQL on purpose.
# ruff: noqa: S608

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import sqlite3
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from typer.testing import CliRunner

from signery.auditchain import (
    GENESIS_HASH,
    FindingKind,
    Report,
    event_hash,
    read_exported,
    verify,
)
from signery.cli import app as cli_app
from signery.server.app import create_app
from signery.server.audit.offline import verify_database
from tests.support import (
    SIGNERY,
    Api,
    FakeClock,
    Installation,
    new_installation,
    running_server,
)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def inst(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Installation]:
    data_dir = tmp_path_factory.mktemp(f"chain-{request.param}")
    with new_installation(
        request.param, data_dir, audit_checkpoint_dir=data_dir / "checkpoints"
    ) as installation:
        yield installation


@pytest.fixture(scope="module")
def capi(inst: Installation) -> Iterator[Api]:
    app = create_app(inst.settings, clock=FakeClock())
    with TestClient(app, base_url="http://signery.test") as client:
        yield Api(client, inst.admin_token, inst.init.issuer, inst.init.root_tsg_id)


@pytest.fixture(scope="module")
def scene(capi: Api) -> dict[str, Any]:
    """Management changes (recorded in their transaction) and signings (group
    commit), refusals included, then a checkpoint."""
    tsg = capi.create_tsg()
    account = capi.create_account(tsg["id"])
    key = capi.create_key(tsg["id"], "EC_P256", ca="none")
    token = capi.access_token(account)
    for i in range(12):
        capi.ok(capi.sign(token, key["name"], hashlib.sha256(str(i).encode()).digest()))
    capi.sign(token, key["name"], b"short")  # an invalid attempt is chained too
    capi.create_tsg()
    return {"key": key, "token": token}


def url_of(inst: Installation) -> str:
    return inst.settings.resolved_database_url


def checkpoint_now(api: Api) -> list[dict[str, Any]]:
    made = api.ok(api.http.post("/api/v1/audit/checkpoints", headers=api.admin))
    return made["checkpoints"]  # type: ignore[no-any-return]


def test_both_write_paths_form_one_valid_chain_per_node(
    inst: Installation, capi: Api, scene: dict[str, Any]
) -> None:
    engine = create_engine(url_of(inst))
    with engine.connect() as conn:
        rows = [
            dict(r._mapping)
            for r in conn.execute(text("SELECT * FROM audit_events ORDER BY seq")).all()
        ]
        heads = dict(conn.execute(text("SELECT node_id, seq FROM audit_chain_heads")).all())
    engine.dispose()
    kinds = {r["kind"] for r in rows}
    assert {"tsg.created", "key.created", "signing.sign.succeeded", "signing.sign.invalid"} <= kinds
    by_node: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_node.setdefault(r["node_id"], []).append(r)
    for node, events in by_node.items():
        assert [e["node_seq"] for e in events] == list(range(1, len(events) + 1))
        assert events[0]["prev_hash"] == GENESIS_HASH
        for before, after in itertools.pairwise(events):
            assert after["prev_hash"] == before["hash"]
        assert all(e["hash"] == event_hash(e) for e in events)
        assert heads[node] == len(events)
    report = verify_database(url_of(inst))
    assert report.clean, report.findings
    assert report.chained == len(rows)
    assert report.unchained == 0


def test_checkpoints_are_signed_exported_and_listed(
    inst: Installation, capi: Api, scene: dict[str, Any]
) -> None:
    made = checkpoint_now(capi)
    assert made
    assert all(cp["seq"] > 0 for cp in made)
    assert checkpoint_now(capi) == []  # nothing moved since
    listed = capi.ok(capi.http.get("/api/v1/audit/checkpoints", headers=capi.admin))
    assert {cp["id"] for cp in made} <= {cp["id"] for cp in listed["checkpoints"]}
    key = capi.ok(capi.http.get("/api/v1/audit/checkpoints/public-key", headers=capi.admin))
    public = serialization.load_pem_public_key(key["public_key_pem"].encode())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    export_dir = inst.settings.audit_checkpoint_dir
    assert export_dir is not None
    for cp in made:
        files = list(export_dir.glob(f"*-{cp['seq']}.json"))
        assert len(files) == 1
        doc = json.loads(files[0].read_text())
        assert doc["public_key"] == key["public_key_pem"]
        assert json.loads(doc["payload"])["head_hash"] == cp["head_hash"]
        # Verified by cryptography alone, as a monitor would.
        public.verify(
            base64.b64decode(doc["signature"]), doc["payload"].encode(), ec.ECDSA(hashes.SHA256())
        )
    report = verify_database(url_of(inst), read_exported(export_dir))
    assert report.clean, report.findings
    assert report.checkpoints >= 2 * len(made)
    # An account (no audit role) gets nothing.
    refused = capi.http.post(
        "/api/v1/audit/checkpoints", headers={"Authorization": f"Bearer {scene['token']}"}
    )
    assert refused.status_code in (401, 403)


def test_scheduled_checkpoints_only_when_a_head_moved_and_the_interval_passed(
    capi: Api, scene: dict[str, Any]
) -> None:
    services = capi.http.app.state.services  # type: ignore[attr-defined]
    clock: FakeClock = services.core.clock
    checkpoint_now(capi)
    capi.ok(capi.sign(scene["token"], scene["key"]["name"], hashlib.sha256(b"x").digest()))
    assert services.checkpoints.due(clock.now()) == {"checkpoints": 0}  # too soon
    clock.advance(301)
    assert services.checkpoints.due(clock.now()) == {"checkpoints": 1}
    assert services.checkpoints.due(clock.now()) == {"checkpoints": 0}


# ------------------------------------------------------------------ tamper matrix (SQLite)


@pytest.fixture(scope="module")
def sqlite_scene(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """An installation with an older copy of its database taken half way, then
    more signings and an exported checkpoint covering them."""
    data_dir = tmp_path_factory.mktemp("chain-tamper")
    export = data_dir / "checkpoints"
    with new_installation("sqlite", data_dir, audit_checkpoint_dir=export) as inst:
        app = create_app(inst.settings, clock=FakeClock())
        with TestClient(app, base_url="http://signery.test") as client:
            api = Api(client, inst.admin_token, inst.init.issuer, inst.init.root_tsg_id)
            tsg = api.create_tsg()
            account = api.create_account(tsg["id"])
            key = api.create_key(tsg["id"], "EC_P256", ca="none")
            token = api.access_token(account)
            for i in range(6):
                api.ok(api.sign(token, key["name"], hashlib.sha256(str(i).encode()).digest()))
            checkpoint_now(api)
            older = data_dir / "older.db"
            backup(data_dir / "signery.db", older)
            for i in range(6):
                api.ok(api.sign(token, key["name"], hashlib.sha256(f"b{i}".encode()).digest()))
            checkpoint_now(api)
            yield {"inst": inst, "db": data_dir / "signery.db", "older": older, "export": export}


def backup(source: Path, target: Path) -> None:
    with sqlite3.connect(source) as src, sqlite3.connect(target) as dst:
        src.backup(dst)
    dst.close()
    src.close()


def tampered(
    scene: dict[str, Any], tmp_path: Path, *statements: str, exported: bool = False
) -> Report:
    copy = tmp_path / f"copy-{uuid.uuid4().hex[:6]}.db"
    backup(scene["db"], copy)
    conn = sqlite3.connect(copy)
    with conn:
        for sql in statements:
            conn.execute(sql)
    conn.close()
    return verify_database(f"sqlite:///{copy}", read_exported(scene["export"]) if exported else ())


def signing_events(scene: dict[str, Any]) -> list[sqlite3.Row]:
    conn = sqlite3.connect(scene["db"])
    conn.row_factory = sqlite3.Row
    rows = conn.execute(
        "SELECT * FROM audit_events WHERE kind = 'signing.sign.succeeded' ORDER BY seq"
    ).fetchall()
    conn.close()
    return rows


def kinds(report: Report) -> set[tuple[FindingKind, str]]:
    return {(f.kind, i) for f in report.findings for i in f.event_ids}


def test_an_untouched_copy_is_clean_through_the_cli(
    sqlite_scene: dict[str, Any], tmp_path: Path
) -> None:
    copy = tmp_path / "copy.db"
    backup(sqlite_scene["db"], copy)
    result = CliRunner().invoke(
        cli_app,
        [
            "audit",
            "verify",
            "--database-url",
            f"sqlite:///{copy}",
            "--checkpoints",
            str(sqlite_scene["export"]),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["clean"]
    assert report["checkpoints"] >= 4


def test_an_edited_field_is_altered(sqlite_scene: dict[str, Any], tmp_path: Path) -> None:
    victim = signing_events(sqlite_scene)[3]["id"]
    report = tampered(
        sqlite_scene, tmp_path, f"UPDATE audit_events SET digest = 'ff' WHERE id = '{victim}'"
    )
    assert kinds(report) == {(FindingKind.ALTERED, victim)}


def test_a_deleted_row_is_a_gap(sqlite_scene: dict[str, Any], tmp_path: Path) -> None:
    events = signing_events(sqlite_scene)
    report = tampered(
        sqlite_scene, tmp_path, f"DELETE FROM audit_events WHERE id = '{events[4]['id']}'"
    )
    assert [f.kind for f in report.findings] == [FindingKind.DELETED]
    assert report.findings[0].event_ids == (events[3]["id"], events[5]["id"])
    assert report.findings[0].node_seq == events[4]["node_seq"]


def test_two_swapped_rows_are_reordered(sqlite_scene: dict[str, Any], tmp_path: Path) -> None:
    events = signing_events(sqlite_scene)
    a, b = events[2], events[7]
    columns = [c for c in a.keys() if c != "seq"]  # noqa: SIM118 - sqlite3.Row

    def assign(row: sqlite3.Row, seq: int) -> str:
        values = ", ".join(f"{c} = {sql_literal(row[c])}" for c in columns)
        return f"UPDATE audit_events SET {values} WHERE seq = {seq}"

    report = tampered(
        sqlite_scene,
        tmp_path,
        f"UPDATE audit_events SET id = 'tmp', node_seq = -1 WHERE seq = {a['seq']}",
        assign(a, b["seq"]),
        assign(b, a["seq"]),
    )
    assert kinds(report) == {(FindingKind.REORDERED, a["id"]), (FindingKind.REORDERED, b["id"])}


def sql_literal(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, int):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


def test_forged_rows_are_inserted(sqlite_scene: dict[str, Any], tmp_path: Path) -> None:
    model = signing_events(sqlite_scene)[1]
    columns = [c for c in model.keys() if c != "seq"]  # noqa: SIM118 - sqlite3.Row

    def forged(**changes: Any) -> tuple[str, str]:
        row = {c: model[c] for c in columns} | {"id": str(uuid.uuid4())} | changes
        names = ", ".join(row)
        values = ", ".join(sql_literal(v) for v in row.values())
        return row["id"], f"INSERT INTO audit_events ({names}) VALUES ({values})"

    # Without chain columns, after the chain began.
    bare_id, bare = forged(node_seq=None, prev_hash=None, hash=None)
    assert kinds(tampered(sqlite_scene, tmp_path, bare)) == {(FindingKind.INSERTED, bare_id)}
    # With a well-made link after the last event: the chain itself fits (it has
    # no secret), the head row does not.
    conn = sqlite3.connect(sqlite_scene["db"])
    head_seq, head_hash = conn.execute(
        "SELECT seq, hash FROM audit_chain_heads WHERE node_id = ?", (model["node_id"],)
    ).fetchone()
    conn.close()
    chained = {c: model[c] for c in columns} | {
        "id": str(uuid.uuid4()),
        "node_seq": head_seq + 1,
        "prev_hash": head_hash,
    }
    chained["hash"] = event_hash(chained)
    row_id, sql = forged(**chained)
    assert kinds(tampered(sqlite_scene, tmp_path, sql)) == {(FindingKind.INSERTED, row_id)}


def test_a_dropped_tail_is_truncated_and_a_rewound_head_is_caught_by_the_export(
    sqlite_scene: dict[str, Any], tmp_path: Path
) -> None:
    events = signing_events(sqlite_scene)
    node = events[0]["node_id"]
    kept = events[-4]
    drop = f"DELETE FROM audit_events WHERE node_id = '{node}' AND node_seq > {kept['node_seq']}"
    report = tampered(sqlite_scene, tmp_path, drop)
    assert (FindingKind.TRUNCATED, kept["id"]) in kinds(report)
    assert {f.kind for f in report.findings} == {FindingKind.TRUNCATED}
    # The attacker rewinds the head and removes the stored checkpoints too: the
    # database alone now looks consistent; the exported checkpoint does not.
    rewind = (
        f"UPDATE audit_chain_heads SET seq = {kept['node_seq']}, hash = '{kept['hash']}' "
        f"WHERE node_id = '{node}'"
    )
    assert tampered(sqlite_scene, tmp_path, drop, rewind, "DELETE FROM audit_checkpoints").clean
    report = tampered(
        sqlite_scene, tmp_path, drop, rewind, "DELETE FROM audit_checkpoints", exported=True
    )
    assert {f.kind for f in report.findings} == {FindingKind.ROLLED_BACK}
    assert (FindingKind.ROLLED_BACK, kept["id"]) in kinds(report)


def test_an_older_database_copy_is_rolled_back_against_the_export(
    sqlite_scene: dict[str, Any],
) -> None:
    older = f"sqlite:///{sqlite_scene['older']}"
    assert verify_database(older).clean  # consistent in itself
    report = verify_database(older, read_exported(sqlite_scene["export"]))
    assert report.findings
    assert {f.kind for f in report.findings} == {FindingKind.ROLLED_BACK}
    result = CliRunner().invoke(
        cli_app,
        ["audit", "verify", "--database-url", older, "--checkpoints", str(sqlite_scene["export"])],
    )
    assert result.exit_code == 1
    assert "rolled_back" in result.output


def test_a_forged_checkpoint_file_is_reported(sqlite_scene: dict[str, Any], tmp_path: Path) -> None:
    source = sorted(sqlite_scene["export"].glob("*.json"))[-1]
    doc = json.loads(source.read_text())
    payload = json.loads(doc["payload"])
    payload["seq"] += 1000
    # Signed with the attacker's own key, published with it: the verifier trusts
    # the database's audit key (or a pinned one), not the file's.
    own = ec.generate_private_key(ec.SECP256R1())
    forged_payload = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    doc["payload"] = forged_payload.decode()
    doc["signature"] = base64.b64encode(
        own.sign(forged_payload, ec.ECDSA(hashes.SHA256()))
    ).decode()
    doc["public_key"] = (
        own.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    export = tmp_path / "export"
    export.mkdir()
    (export / source.name).write_text(json.dumps(doc))
    report = verify_database(f"sqlite:///{sqlite_scene['db']}", read_exported(export))
    assert [f.kind for f in report.findings] == [FindingKind.BAD_CHECKPOINT]


def test_events_before_the_chain_are_counted_not_reported() -> None:
    legacy = {"seq": 1, "id": "old", "node_id": "n", "node_seq": None}
    first = {
        "seq": 2,
        "id": "new",
        "time": "2024-01-01T00:00:00+00:00",
        "kind": "k",
        "node_id": "n",
        "node_seq": 1,
        "prev_hash": GENESIS_HASH,
        "details": "{}",
    }
    first["hash"] = event_hash(first)
    report = verify([legacy, first])
    assert report.clean
    assert report.unchained == 1
    assert report.chained == 1


# ------------------------------------------------------------------ two processes, one PostgreSQL


def test_two_servers_on_one_postgresql_keep_gapless_chains_per_node(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    data_dir = tmp_path_factory.mktemp("chain-two-replicas")
    with (
        new_installation("postgresql", data_dir) as inst,
        running_server(inst, node="node-a") as a,
        running_server(inst, node="node-b") as b,
        httpx.Client(base_url=a.url, timeout=30) as http_a,
        httpx.Client(base_url=b.url, timeout=30) as http_b,
    ):
        apis = [
            Api(h, inst.admin_token, inst.init.issuer, inst.init.root_tsg_id)
            for h in (http_a, http_b)
        ]
        tsg = apis[0].create_tsg()
        account = apis[0].create_account(tsg["id"])
        key = apis[1].create_key(tsg["id"], "EC_P256", ca="none")
        tokens = [api.access_token(account) for api in apis]
        errors: list[BaseException] = []

        def sign_many(api: Api, token: str, worker: int) -> None:
            try:
                for i in range(50):
                    digest = hashlib.sha256(f"{worker}-{i}".encode()).digest()
                    api.ok(api.sign(token, key["name"], digest))
            except BaseException as e:  # reported by the main thread
                errors.append(e)

        threads = [
            threading.Thread(target=sign_many, args=(apis[w % 2], tokens[w % 2], w))
            for w in range(6)
        ]
        for t in threads:
            t.start()
        for w in range(3):  # management events (recorded in their transaction) meanwhile
            apis[w % 2].create_tsg()
        for t in threads:
            t.join()
        assert not errors, errors
        url = inst.settings.resolved_database_url
        report = verify_database(url)
        assert report.clean, report.findings
        engine = create_engine(url)
        with engine.connect() as conn:
            counts = dict(
                conn.execute(
                    text(
                        "SELECT node_id, count(*) FROM audit_events "
                        "WHERE kind = 'signing.sign.succeeded' GROUP BY node_id"
                    )
                ).all()
            )
        engine.dispose()
        assert counts == {"node-a": 150, "node-b": 150}
        assert report.nodes["node-a"] >= 150
        assert report.nodes["node-b"] >= 150
        # And through the API, with the CLI, as an auditor would run it.
        env = {k: v for k, v in os.environ.items() if not k.startswith("SIGNERY_")}
        env.update({"SIGNERY_HOME": str(data_dir / "home"), "NO_COLOR": "1"})
        done = subprocess.run(
            [
                SIGNERY,
                "--server",
                a.url,
                "--api-token",
                inst.admin_token,
                "audit",
                "verify",
                "--json",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert json.loads(done.stdout)["clean"]
