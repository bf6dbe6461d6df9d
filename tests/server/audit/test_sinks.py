"""Audit sinks: every event reaches syslog (TCP, UDP) and webhooks, in order, at
least once with its id, through outages, from one replica at a time.

The receivers are real servers on 127.0.0.1 (sockets, http.server), run on
threads; the server is the in-process app on the installation's database."""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import logging
import re
import ssl
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fastapi.testclient import TestClient
from sqlalchemy import delete, func, insert, select, update

from signery.server.app import create_app
from signery.server.audit.models import AuditEventRow, AuditSinkCursorRow
from signery.server.audit.sinks import (
    Forwarder,
    ForwarderConfig,
    SyslogSink,
    SyslogTarget,
    WebhookSink,
    event_json,
    syslog_message,
)
from signery.server.config import load_settings
from signery.server.persistence.db import Database, make_engine
from signery.server.runtime.clock import SystemClock
from tests.server.audit.sink_receivers import SyslogReceiver, WebhookReceiver
from tests.support import Api, FakeClock, Installation, free_port

# Small intervals so that a test waits milliseconds, not the production seconds.
FAST = {
    "audit_sink_poll_seconds": 0.05,
    "audit_sink_retry_max_seconds": 0.2,
    "audit_sink_lease_seconds": 5.0,
    "audit_sink_gap_seconds": 2.0,
    "audit_sink_timeout_seconds": 2.0,
}
TOKEN = "sink-token-4c1d9e"  # a test secret, checked never to be logged
FORGED = 'evil\n<13>1 2026-01-01T00:00:00Z forged signery - - - {"forged":true}\u2028\rx'
# What a client may still send in a one-line field (control characters are
# refused at the edge): line and paragraph separators and a forged syslog header.
FORGED_ONE_LINE = 'evil\u2028<13>1 2026-01-01T00:00:00Z forged signery - - - {"forged":true}\u2029x'

# ------------------------------------------------------------------ helpers


@contextlib.contextmanager
def app_with(installation: Installation, **settings: Any) -> Iterator[Api]:
    base = installation.settings
    merged = load_settings(
        data_dir=base.data_dir,
        database_url=base.database_url,
        access_log=False,
        **{**FAST, **settings},
    )
    with TestClient(create_app(merged)) as client:
        yield Api(
            client,
            installation.admin_token,
            installation.init.issuer,
            installation.init.root_tsg_id,
        )


@pytest.fixture(scope="module")
def db(installation: Installation) -> Iterator[Database]:
    database = Database(make_engine(installation.settings.resolved_database_url, pool_size=2))
    yield database
    database.dispose()


def cursor_of(db: Database, sink: str) -> int:
    with db.read() as s:
        last = s.execute(
            select(AuditSinkCursorRow.last_seq).where(AuditSinkCursorRow.sink == sink)
        ).scalar()
    return int(last or 0)


def events_after(db: Database, seq: int) -> list[tuple[int, str]]:
    with db.read() as s:
        rows = s.execute(
            select(AuditEventRow.seq, AuditEventRow.id)
            .where(AuditEventRow.seq > seq)
            .order_by(AuditEventRow.seq)
        ).all()
    return [(int(r.seq), str(r.id)) for r in rows]


def last_seq(db: Database) -> int:
    with db.read() as s:
        return int(s.execute(select(func.max(AuditEventRow.seq))).scalar() or 0)


def wait_for(condition: Any, timeout: float = 60.0) -> None:
    """Until ``condition()`` holds; the bound is generous (a loaded machine is
    slow, not wrong), and reaching it is a failure."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def received_after(receiver: SyslogReceiver, db: Database, before: int) -> list[dict[str, Any]]:
    """What the collector holds once every event after ``before`` reached it (the
    sender's TCP write completes before the collector's thread has read it)."""

    def arrived() -> bool:
        return {i for _, i in events_after(db, before)} <= {e["id"] for e in receiver.events()}

    wait_for(arrived)
    return receiver.events()


def signer(api: Api) -> tuple[str, str]:
    tsg = api.create_tsg()
    account = api.create_account(tsg["id"])
    key = api.create_key(tsg["id"], "EC_P256", ca="none")
    return api.access_token(account), key["name"]


def sign_many(api: Api, n: int, tag: str) -> None:
    """``n`` signings, each answered 200 (with its signature)."""
    token, key = signer(api)
    for i in range(n):
        api.ok(api.sign(token, key, hashlib.sha256(f"{tag}{i}".encode()).digest()))


def assert_delivered(received: list[dict[str, Any]], db: Database, before: int) -> None:
    """Every event after ``before`` arrived (duplicates allowed, each with its id),
    first deliveries in seq order, and nothing else arrived."""
    expected = events_after(db, before)
    by_id = {e["id"]: e for e in received}
    assert set(by_id) == {i for _, i in expected}
    assert all(by_id[i]["seq"] == seq for seq, i in expected)
    first_seen: list[int] = []
    for e in received:
        if e["seq"] not in first_seen:
            first_seen.append(e["seq"])
    assert first_seen == sorted(first_seen)


# ------------------------------------------------------------------ tests


def test_syslog_message_is_rfc5424_with_one_line_of_json() -> None:
    event = {
        "id": "e1",
        "seq": 7,
        "kind": "signing.sign.succeeded",
        "outcome": "succeeded",
        "time": "2026-11-26T10:00:00.123456+00:00",
        "node_id": "node a\n<13>1",
        "client_machine": FORGED,
    }
    message = syslog_message(event, facility=13).decode("ascii")
    assert message.startswith(
        "<110>1 2026-11-26T10:00:00.123456Z node_a_<13>1 signery - audit "
        '[signery@32473 event_id="e1" seq="7" kind="signing.sign.succeeded"] {'
    )
    for forbidden in ("\n", "\r", "\u2028"):
        assert forbidden not in message
    assert json.loads(message.split("] ", 1)[1])["client_machine"] == FORGED
    assert event_json(event).isascii()


@pytest.mark.parametrize("transport", ["tcp", "udp"])
def test_syslog_receives_every_event_in_order_and_a_forged_line_stays_one_message(
    installation: Installation, db: Database, transport: str
) -> None:
    receiver = SyslogReceiver(transport, free_port())
    receiver.start()
    try:
        before = cursor_of(db, "syslog")
        with app_with(
            installation, audit_syslog_url=f"{transport}://127.0.0.1:{receiver.port}"
        ) as api:
            token, key = signer(api)
            response = api.http.post(
                f"/api/v1/signing/keys/{key}/sign",
                json={
                    "digest": "A" * 43 + "=",
                    "digest_algorithm": "sha256",
                    "scheme": "ecdsa",
                    "client": {"machine": FORGED_ONE_LINE, "tool": "<13>1 - - - - - forged"},
                },
                headers={"Authorization": f"Bearer {token}"},
            )
            api.ok(response)
            sign_many(api, 5, f"syslog-{transport}")
            last = last_seq(db)
            wait_for(lambda: cursor_of(db, "syslog") >= last)
        received = received_after(receiver, db, before)
        assert_delivered(received, db, before)
        forged = [e for e in received if e["client_machine"] == FORGED_ONE_LINE]
        assert len(forged) == 1
        assert forged[0]["client_tool"] == "<13>1 - - - - - forged"
        # Exactly one frame/datagram per event: the forged header never split one.
        assert len(receiver.messages) == len(received)
        assert not any(
            b"\n" in m or b"\xe2\x80\xa8" in m or b"\xe2\x80\xa9" in m for m in receiver.messages
        )
    finally:
        receiver.stop()


def test_syslog_outage_loses_nothing_and_never_slows_signing(
    installation: Installation, db: Database
) -> None:
    receiver = SyslogReceiver("tcp", free_port())
    receiver.start()
    try:
        before = cursor_of(db, "syslog")
        with app_with(installation, audit_syslog_url=f"tcp://127.0.0.1:{receiver.port}") as api:
            sign_many(api, 3, "pre-outage")
            wait_for(lambda: cursor_of(db, "syslog") >= last_seq(db))
            receiver.stop()  # the collector goes away; its port is closed
            sign_many(api, 60, "outage")
            during = last_seq(db)
            services = api.http.app.state.services  # type: ignore[attr-defined]
            wait_for(lambda: services.sinks[0].failures >= 2)  # retries fail meanwhile
            stuck = cursor_of(db, "syslog")
            assert stuck < during
            ready = api.ok(api.http.get("/readyz"))
            assert ready["status"] == "degraded"
            assert ready["checks"]["audit_sink:syslog"].startswith("retrying: syslog tcp")
            receiver.start()
            wait_for(lambda: cursor_of(db, "syslog") >= last_seq(db))
            assert api.ok(api.http.get("/readyz"))["checks"]["audit_sink:syslog"] == "ok"
        # Every signing answered 200 (sign_many asserts it) while the cursor stayed
        # behind their events (stuck < during): none waited for the sink. (No
        # timing assertion: speed is for the benchmarks.)
        assert_delivered(received_after(receiver, db, before), db, before)
        assert cursor_of(db, "syslog") == last_seq(db)
    finally:
        receiver.stop()


def test_webhook_outage_and_refusals_are_retried_until_acknowledged(
    installation: Installation, db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    receiver = WebhookReceiver()
    try:
        before = cursor_of(db, "webhook")
        with (
            caplog.at_level(logging.DEBUG),
            app_with(
                installation, audit_webhook_url=receiver.url, audit_webhook_token=TOKEN
            ) as api,
        ):
            receiver.down_status = 401  # a wrong token at first: logged, retried
            sign_many(api, 25, "webhook-401")
            wait_for(lambda: len(receiver.requests) >= 2)
            receiver.down_status = 503
            sign_many(api, 25, "webhook-503")
            wait_for(lambda: sum(s == 503 for s, _ in receiver.requests) >= 2)
            assert cursor_of(db, "webhook") == before
            receiver.down_status = None
            wait_for(lambda: cursor_of(db, "webhook") >= last_seq(db))
        assert_delivered(receiver.events, db, before)
        assert cursor_of(db, "webhook") == last_seq(db)
        for _, headers in receiver.requests:
            assert headers["Authorization"] == f"Bearer {TOKEN}"
            assert re.fullmatch(r"[0-9a-f]{64}", headers["Idempotency-Key"])
        assert "audit webhook refuses the events" in caplog.text
        assert TOKEN not in caplog.text
    finally:
        receiver.close()


def test_one_forwarder_at_a_time_holds_a_sink(
    installation: Installation, db: Database, api: Api
) -> None:
    """Two replicas configured with the same sink: only the lease holder sends;
    when it stops, the other takes over from the cursor."""
    receiver = SyslogReceiver("tcp", free_port())
    receiver.start()
    config = ForwarderConfig(
        poll_seconds=0.05, retry_max_seconds=0.2, lease_seconds=5, gap_seconds=2.0
    )
    target = SyslogTarget.parse(f"tcp://127.0.0.1:{receiver.port}")
    forwarders = [
        Forwarder(
            db=db,
            sink=SyslogSink(target=target, facility=13, timeout=2.0),
            node_id=f"node-{n}",
            clock=SystemClock(),
            config=config,
        )
        for n in "ab"
    ]
    try:
        before = cursor_of(db, "syslog")
        for f in forwarders:
            f.start()
        sign_many(api, 20, "lease-1")
        wait_for(lambda: cursor_of(db, "syslog") >= last_seq(db))
        holders = [f for f in forwarders if f.delivered > 0]
        assert len(holders) == 1
        idle = next(f for f in forwarders if f is not holders[0])
        assert idle.status().holds_lease is False
        holders[0].stop()  # releases the lease
        sign_many(api, 20, "lease-2")
        wait_for(lambda: cursor_of(db, "syslog") >= last_seq(db))
        assert idle.delivered > 0
        received = received_after(receiver, db, before)
        assert_delivered(received, db, before)
        # No failure happened, so no event was sent twice.
        assert len(received) == len({e["id"] for e in received})
    finally:
        for f in forwarders:
            f.stop()
        receiver.stop()


def test_settings_refuse_unsafe_sink_urls(installation: Installation) -> None:
    from signery.errors import ConfigurationError

    for bad in (
        {"audit_webhook_url": "http://collector.example/audit"},
        {"audit_webhook_url": "ftp://collector.example/"},
        {"audit_syslog_url": "http://collector.example:514"},
        {"audit_syslog_url": "tcp://collector.example:99999"},
    ):
        with pytest.raises(ConfigurationError):
            load_settings(data_dir=installation.settings.data_dir, **bad)
    ok = load_settings(
        data_dir=installation.settings.data_dir,
        audit_webhook_url="https://collector.example/audit",
        audit_syslog_url="udp://collector.example",
    )
    assert SyslogTarget.parse(ok.audit_syslog_url or "").port == 514


def self_signed_tls(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that no system trust store knows."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sink receiver")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "receiver.pem", directory / "receiver.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


def test_webhook_tls_is_always_verified(
    installation: Installation, db: Database, api: Api, tmp_path: Path
) -> None:
    """An HTTPS receiver whose certificate is not trusted gets nothing (there is
    no setting that turns verification off); trusting its CA file delivers."""
    cert_file, key_file = self_signed_tls(tmp_path)
    receiver = WebhookReceiver()
    receiver.down_status = None
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert_file, key_file)
    receiver.server.socket = tls.wrap_socket(receiver.server.socket, server_side=True)
    url = receiver.url.replace("http://", "https://")
    config = ForwarderConfig(poll_seconds=0.05, retry_max_seconds=0.2, gap_seconds=2.0)
    before = cursor_of(db, "webhook")
    sign_many(api, 3, "tls")
    untrusted = Forwarder(
        db=db,
        sink=WebhookSink(url=url, token=None, timeout=2.0),
        node_id="node-t",
        clock=SystemClock(),
        config=config,
    )
    try:
        untrusted.start()
        wait_for(lambda: untrusted.failures >= 2)
        assert untrusted.health() == "retrying: webhook: ConnectError"
        assert receiver.events == []
        assert cursor_of(db, "webhook") == before
    finally:
        untrusted.stop()
    trusted = Forwarder(
        db=db,
        sink=WebhookSink(url=url, token=None, timeout=2.0, ca_file=cert_file),
        node_id="node-t",
        clock=SystemClock(),
        config=config,
    )
    try:
        trusted.start()
        wait_for(lambda: cursor_of(db, "webhook") >= last_seq(db))
        assert_delivered(receiver.events, db, before)
    finally:
        trusted.stop()
        receiver.close()


def test_a_dead_replicas_lease_is_taken_over_when_it_expires(
    installation: Installation, db: Database, api: Api
) -> None:
    receiver = SyslogReceiver("tcp", free_port())
    receiver.start()
    config = ForwarderConfig(
        poll_seconds=0.05, retry_max_seconds=0.2, lease_seconds=5, gap_seconds=2.0
    )
    target = SyslogTarget.parse(f"tcp://127.0.0.1:{receiver.port}")
    # The forwarder's clock: the dead lease expires when the test says so, not
    # when a slow machine happens to get there.
    clock = FakeClock()
    forwarder = Forwarder(
        db=db,
        sink=SyslogSink(target=target, facility=13, timeout=2.0),
        node_id="node-c",
        clock=clock,
        config=config,
    )
    try:
        # A replica that died while holding the lease.
        dead = {
            "lease_owner": "dead-node/1",
            "lease_until": clock.now() + timedelta(seconds=config.lease_seconds),
        }
        with db.write() as s:
            found = s.execute(
                update(AuditSinkCursorRow).where(AuditSinkCursorRow.sink == "syslog").values(**dead)
            ).rowcount  # type: ignore[attr-defined]
            if not found:
                s.execute(
                    insert(AuditSinkCursorRow).values(
                        sink="syslog", last_seq=last_seq(db), updated_at=datetime.now(UTC), **dead
                    )
                )
        before = cursor_of(db, "syslog")
        sign_many(api, 3, "takeover")
        assert forwarder.run_once() is False  # the lease is still the dead replica's
        assert cursor_of(db, "syslog") == before
        assert forwarder.status().holds_lease is False
        clock.advance(config.lease_seconds + 1)
        forwarder.start()
        wait_for(lambda: cursor_of(db, "syslog") >= last_seq(db))
        assert forwarder.status().holds_lease is True
        assert_delivered(received_after(receiver, db, before), db, before)
    finally:
        forwarder.stop()
        receiver.stop()


def test_a_number_that_will_never_come_does_not_hold_the_sink(
    installation: Installation, db: Database, api: Api
) -> None:
    """A hole in seq that no transaction can fill any more (a deleted event; on
    PostgreSQL also a rolled-back insert) is passed without waiting for
    audit_sink_gap_seconds (here an hour): SQLite has one writer, so a hole is
    final at once; PostgreSQL knows it once the transactions running when it
    was seen have ended."""
    receiver = SyslogReceiver("tcp", free_port())
    receiver.start()
    config = ForwarderConfig(poll_seconds=0.05, retry_max_seconds=0.2, gap_seconds=3600)
    target = SyslogTarget.parse(f"tcp://127.0.0.1:{receiver.port}")
    forwarder = Forwarder(
        db=db,
        sink=SyslogSink(target=target, facility=13, timeout=2.0),
        node_id="node-h",
        clock=SystemClock(),
        config=config,
    )
    try:
        before = cursor_of(db, "syslog")
        sign_many(api, 3, "hole")
        hole = events_after(db, before)[-2][0]
        with db.write() as s:
            s.execute(delete(AuditEventRow).where(AuditEventRow.seq == hole))
        forwarder.start()
        wait_for(lambda: cursor_of(db, "syslog") >= last_seq(db), 60)
        assert_delivered(received_after(receiver, db, before), db, before)
        assert hole not in {e["seq"] for e in receiver.events()}
        assert forwarder.status().late == ()
    finally:
        forwarder.stop()
        receiver.stop()
