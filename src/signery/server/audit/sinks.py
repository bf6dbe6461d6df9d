"""Audit sinks: every audit event forwarded to syslog and/or an HTTP webhook.

The audit table is the durable queue. One forwarder thread per configured sink
and process tails ``audit_events`` by ``seq`` after the sink's cursor
(``audit_sink_cursors``); the replica holding the sink's lease (a
compare-and-set on ``lease_owner`` / ``lease_until``, renewed while it
forwards, taken over once expired) is the only sender, so events go out in
order. The cursor moves only after the sink acknowledged a batch (TCP write
completed, HTTP 2xx). A sink that is down is retried with capped exponential
backoff; nothing accumulates in memory (the next attempt re-reads the table),
and signing never waits for a sink. Delivery is at least once: every message
carries the event's ``id`` for de-duplication.

No committed event is skipped. On PostgreSQL ``seq`` is drawn before commit, so
a number can be missing while later ones are visible: its transaction is still
running, or rolled back. Later events wait for it, in order, up to
``gap_seconds``; after that they go out and the number is stored with the
cursor (``audit_sink_gaps``) and looked for at every poll: if its event
commits, it is sent late. A number is dropped only when it is final, which
transaction ids tell exactly (:class:`_Gap`), never after a timeout.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import socket
import ssl
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import httpx
from sqlalchemy import (
    CursorResult,
    Result,
    Select,
    String,
    and_,
    delete,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session
from sqlalchemy.sql import ColumnElement

from signery import __version__
from signery.errors import ConfigurationError, SigneryError
from signery.server.audit.models import AuditEventRow, AuditSinkCursorRow, AuditSinkGapRow
from signery.server.audit.wire import event_to_wire
from signery.server.persistence.db import Database, table
from signery.server.runtime.clock import Clock

log = logging.getLogger("signery.audit.sinks")

# RFC 5424 §6.2.1: facility 13 is "log audit".
DEFAULT_SYSLOG_FACILITY = 13
SYSLOG_APP_NAME = "signery"
SYSLOG_MSGID = "audit"
# RFC 5424 §7.2.2: an SD-ID that is not IANA-registered is NAME@<private enterprise
# number>. 32473 is the PEN reserved for documentation (RFC 5612); Signery has no
# PEN of its own yet, and a made-up number would squat on an organization's arc.
SYSLOG_SD_ID = "signery@32473"
# RFC 5424 §6.2.5: PRIVAL severities.
_SEVERITY = {"succeeded": 6, "denied": 5, "invalid": 5, "error": 3}
_MAX_HOSTNAME = 255  # RFC 5424 §6.2.4
# A lease owner is the node id plus a per-forwarder suffix (column is 128 chars).
_OWNER_NODE_MAX = 110


class SinkFailed(Exception):
    """A sink did not acknowledge a batch (it stays queued; the cursor does not move)."""


# ------------------------------------------------------------------ encoding


def event_json(event: dict[str, Any]) -> str:
    """One event as one line of JSON. ``ensure_ascii`` escapes every control and
    non-ASCII character (``\\n``, ``\\u2028``...), so a client-supplied string can
    never start a new log line or forge a syslog header."""
    return json.dumps(event, ensure_ascii=True, separators=(",", ":"), sort_keys=True)


def _printable_ascii(value: str, limit: int) -> str:
    """RFC 5424 §6: header fields are PRINTUSASCII (33-126) or the NILVALUE '-'."""
    clean = "".join(c if 33 <= ord(c) <= 126 else "_" for c in value)[:limit]
    return clean or "-"


def _sd_value(value: str) -> str:
    """RFC 5424 §6.3.3: '"', '\\' and ']' are escaped in PARAM-VALUE."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def syslog_message(event: dict[str, Any], facility: int) -> bytes:
    """An RFC 5424 message: fixed ASCII header, the ids in STRUCTURED-DATA, the
    event as a JSON line in MSG (MSG-ANY: pure ASCII, so no BOM)."""
    pri = facility * 8 + _SEVERITY.get(str(event.get("outcome")), 5)
    time_ = str(event["time"]).replace("+00:00", "Z")
    hostname = _printable_ascii(str(event.get("node_id") or ""), _MAX_HOSTNAME)
    sd = (
        f'[{SYSLOG_SD_ID} event_id="{_sd_value(str(event["id"]))}" '
        f'seq="{int(event["seq"])}" kind="{_sd_value(_printable_ascii(str(event["kind"]), 64))}"]'
    )
    header = f"<{pri}>1 {time_} {hostname} {SYSLOG_APP_NAME} - {SYSLOG_MSGID} {sd} "
    return (header + event_json(event)).encode("ascii")


# ------------------------------------------------------------------ sinks


class Sink(ABC):
    """Where events go. ``send`` returns once the sink acknowledged the batch,
    or raises SinkFailed; it is called by one forwarder thread at a time."""

    name: str

    @abstractmethod
    def send(self, events: Sequence[dict[str, Any]]) -> None: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


@dataclass(frozen=True, slots=True)
class SyslogTarget:
    transport: str  # "tcp" | "udp"
    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> SyslogTarget:
        parts = urlsplit(url)
        if parts.scheme not in ("tcp", "udp") or not parts.hostname or parts.path not in ("", "/"):
            raise ValueError("audit_syslog_url must look like tcp://host:514 or udp://host:514")
        try:
            port = parts.port or 514
        except ValueError as e:
            raise ValueError("audit_syslog_url has an invalid port") from e
        return cls(parts.scheme, parts.hostname, port)


class SyslogSink(Sink):
    """RFC 5424 over TCP (octet-counting framing, RFC 6587 §3.4.1) or UDP (RFC 5426).

    TCP: acknowledged = the write completed. Syslog has no application-level
    acknowledgement, so a receiver that dies with data in its socket buffer can
    lose that data; a connection the receiver closed is detected before each
    batch and reopened. UDP has no acknowledgement at all (best effort)."""

    name = "syslog"

    def __init__(self, *, target: SyslogTarget, facility: int, timeout: float) -> None:
        self._target = target
        self._facility = facility
        self._timeout = timeout
        self._sock: socket.socket | None = None

    def send(self, events: Sequence[dict[str, Any]]) -> None:
        messages = [syslog_message(e, self._facility) for e in events]
        try:
            sock = self._connected()
            if self._target.transport == "tcp":
                sock.sendall(b"".join(b"%d %s" % (len(m), m) for m in messages))
            else:
                for m in messages:
                    sock.send(m)
        except OSError as e:
            self.close()
            raise SinkFailed(f"syslog {self._target.transport}: {type(e).__name__}") from e

    def _connected(self) -> socket.socket:
        if self._sock is not None and self._target.transport == "tcp" and self._peer_closed():
            self.close()
        if self._sock is None:
            kind = socket.SOCK_STREAM if self._target.transport == "tcp" else socket.SOCK_DGRAM
            info = socket.getaddrinfo(self._target.host, self._target.port, type=kind)[0]
            sock = socket.socket(info[0], kind)
            sock.settimeout(self._timeout)
            try:
                sock.connect(info[4])
            except OSError:
                sock.close()
                raise
            self._sock = sock
        return self._sock

    def _peer_closed(self) -> bool:
        assert self._sock is not None
        try:
            self._sock.setblocking(False)
            try:
                return self._sock.recv(1, socket.MSG_PEEK) == b""
            finally:
                self._sock.settimeout(self._timeout)
        except BlockingIOError:
            return False
        except OSError:
            return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class WebhookSink(Sink):
    """POST ``{"events": [...]}`` as JSON; a 2xx answer acknowledges the batch.

    TLS certificates are always verified (an extra CA file may be trusted, never
    none). ``Idempotency-Key`` is derived from the batch's event ids; receivers
    de-duplicate by each event's ``id`` (a batch may be cut differently after a
    takeover)."""

    name = "webhook"

    def __init__(
        self, *, url: str, token: str | None, timeout: float, ca_file: Path | None = None
    ) -> None:
        verify: ssl.SSLContext | bool = True
        if ca_file is not None:
            try:
                verify = ssl.create_default_context(cafile=str(ca_file))
            except (OSError, ssl.SSLError) as e:
                raise ConfigurationError(
                    f"audit_webhook_ca_file {ca_file} cannot be read as PEM certificates"
                ) from e
        self._url = url
        headers = {"User-Agent": f"signery/{__version__}", "Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        # verify: certificate and host name checked; there is no way to turn it off.
        self._http = httpx.Client(headers=headers, timeout=timeout, verify=verify)

    def send(self, events: Sequence[dict[str, Any]]) -> None:
        body = '{"events":[' + ",".join(event_json(e) for e in events) + "]}"
        key = hashlib.sha256(",".join(str(e["id"]) for e in events).encode()).hexdigest()
        try:
            response = self._http.post(
                self._url, content=body.encode("ascii"), headers={"Idempotency-Key": key}
            )
        except httpx.HTTPError as e:
            # By type only: the message of an httpx error can quote the request.
            raise SinkFailed(f"webhook: {type(e).__name__}") from e
        if 200 <= response.status_code < 300:
            return
        if 400 <= response.status_code < 500 and response.status_code not in (408, 429):
            # A configuration problem (URL, token): loud, and retried, never skipped.
            log.error(
                "audit webhook refuses the events; check audit_webhook_url and its token",
                extra={"status": response.status_code},
            )
        raise SinkFailed(f"webhook answered {response.status_code}")

    def close(self) -> None:
        self._http.close()


# ------------------------------------------------------------------ forwarding


@dataclass(frozen=True, slots=True)
class ForwarderConfig:
    poll_seconds: float = 1.0
    batch_max: int = 100
    retry_max_seconds: float = 60.0
    lease_seconds: float = 30.0
    # How long later events wait, in seq order, for a missing number whose
    # transaction may still commit (PostgreSQL draws seq before commit). Then they
    # go out, and the number is watched for until it commits (and is sent, late)
    # or can no longer commit (see _Gap). A rolled-back number does not wait for
    # this: it is known final as soon as the transactions that could hold it ended.
    gap_seconds: float = 30.0


@dataclass(frozen=True, slots=True)
class SinkStatus:
    sink: str
    holds_lease: bool
    last_seq: int | None
    delivered: int
    failures: int
    last_error: str | None
    # The first missing number later events wait for, in order, if any.
    waiting_for: int | None = None
    # Ranges of numbers past the cursor still watched for a late commit.
    late: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True, slots=True)
class _Gap:
    """Missing numbers ``first..last``, seen with ``horizon``: the xmax (``xid8``)
    of a PostgreSQL snapshot taken after the numbers were seen missing below a
    visible later one.

    The numbers are final (no transaction can still commit them) once the
    oldest running transaction id, the xmin of a later snapshot, is at or above
    the horizon. A number is drawn by a transaction that already holds its id
    (the recorder takes it first), before the later number was drawn, so before
    the later event committed and the read that saw it: that id is below the
    horizon. Once every id below the horizon has ended, the transaction either
    committed, and a read after that point sees its event, or rolled back, and
    the number is a hole for good. The sequence must hand out numbers in the
    order they are asked for: uncached (CACHE 1, PostgreSQL's default)."""

    first: int
    last: int
    horizon: int
    seen_at: datetime

    def covers(self, first: int, last: int) -> bool:
        return self.first <= first and last <= self.last

    def without(self, found: set[int]) -> list[_Gap]:
        """What is left of the range once the events ``found`` were sent."""
        left: list[_Gap] = []
        start = self.first
        for seq in sorted(s for s in found if self.first <= s <= self.last):
            if seq > start:
                left.append(replace(self, first=start, last=seq - 1))
            start = seq + 1
        if start <= self.last:
            left.append(replace(self, first=start))
        return left


@dataclass(frozen=True, slots=True)
class _Step:
    """What one poll sends (events committed late, then the events after the
    cursor), and where the cursor and the watched gaps are after it."""

    late_events: list[dict[str, Any]]
    events: list[dict[str, Any]]
    last_seq: int
    late: list[_Gap]


_CURSORS = table(AuditSinkCursorRow)
_GAPS = table(AuditSinkGapRow)
# pg_snapshot_* (PostgreSQL 13+): the oldest transaction id still running, and
# the next one to be assigned. xid8 has no cast to bigint; text has.
_OLDEST_RUNNING_XID = select(func.pg_snapshot_xmin(func.pg_current_snapshot()).cast(String))
_NEXT_XID = select(func.pg_snapshot_xmax(func.pg_current_snapshot()).cast(String))


def _changed(result: Result[Any]) -> int:
    """Rows matched by an UPDATE (the compare-and-set outcome)."""
    return int(cast("CursorResult[Any]", result).rowcount)


class Forwarder:
    """Forwards the audit trail to one sink, from the replica holding its lease."""

    def __init__(
        self, *, db: Database, sink: Sink, node_id: str, clock: Clock, config: ForwarderConfig
    ) -> None:
        self._db = db
        self._sink = sink
        self._clock = clock
        self._config = config
        self.owner = f"{node_id[:_OWNER_NODE_MAX]}/{uuid.uuid4().hex[:12]}"
        # PostgreSQL draws seq before commit: an event can become visible after
        # later ones. SQLite has one writer at a time, so numbers become visible
        # in order and a missing one was deleted (it will never come).
        self._late_commits = db.dialect == "postgresql"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._holds_lease = False
        self._lease_until: datetime | None = None
        self._last_seq: int | None = None
        self._waiting: list[_Gap] = []  # gaps after the cursor, held back for in order
        self._late: list[_Gap] = []  # gaps behind the cursor, as in audit_sink_gaps
        self._failures_in_row = 0
        self.delivered = 0
        self.failures = 0
        self._last_error: str | None = None

    @property
    def sink(self) -> str:
        return self._sink.name

    def status(self) -> SinkStatus:
        return SinkStatus(
            self._sink.name,
            self._holds_lease,
            self._last_seq,
            self.delivered,
            self.failures,
            self._last_error,
            min((g.first for g in self._waiting), default=None),
            tuple((g.first, g.last) for g in self._late),
        )

    def health(self) -> str:
        """For /readyz: "ok" (sending, or standing by for another replica's
        lease), or "retrying: <last error>" while the sink does not acknowledge."""
        if self._failures_in_row and self._last_error is not None:
            return f"retrying: {self._last_error}"
        return "ok"

    # ------------------------------------------------------------ thread

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._loop, name=f"signery-sink-{self._sink.name}", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(10)
        try:
            self._release()
        except (SQLAlchemyError, SigneryError):
            log.warning("audit sink lease not released", extra={"sink": self._sink.name})
        self._sink.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                worked = self.run_once()
            except (SQLAlchemyError, SigneryError) as e:
                # The database is down: the cursor is where it was; try again later.
                self._failed(f"database: {type(e).__name__}")
                worked = False
            except Exception as e:
                # Anything else is a bug; the thread must not die silently with the
                # events waiting: logged with its traceback, retried with backoff.
                log.exception("audit sink forwarding failed", extra={"sink": self._sink.name})
                self._failed(type(e).__name__)
                worked = False
            if not worked:
                self._stop.wait(self._delay())

    def _delay(self) -> float:
        if self._failures_in_row == 0:
            return self._config.poll_seconds
        base = self._config.poll_seconds * 2.0 ** min(self._failures_in_row, 30)
        # Jitter, so replicas and sinks recovering together do not retry in step.
        return min(self._config.retry_max_seconds, base) * random.uniform(0.8, 1.0)  # noqa: S311

    def _failed(self, error: str) -> None:
        self.failures += 1
        self._failures_in_row += 1
        self._last_error = error
        log.warning(
            "audit sink unavailable; events stay queued in the audit table",
            extra={"sink": self._sink.name, "error": error, "attempt": self._failures_in_row},
        )

    # ------------------------------------------------------------ one step

    def run_once(self) -> bool:
        """Take or renew the lease, send one batch (late commits first, then the
        events after the cursor), advance the cursor and the watched gaps.
        True when a batch was delivered (more may be waiting)."""
        if not self._hold_lease():
            return False
        step = self._next_step()
        events = [*step.late_events, *step.events]
        if not events and step.late == self._late:
            self._failures_in_row = 0  # the database answers and nothing is waiting
            return False
        if events:
            try:
                self._sink.send(events)
            except SinkFailed as e:
                self._failed(str(e))
                return False
        self._failures_in_row = 0
        self._last_error = None
        if not self._advance(step.last_seq, step.late):
            return False
        if step.late_events:
            log.info(
                "audit events committed late were sent after later ones",
                extra={"sink": self._sink.name, "seqs": [e["seq"] for e in step.late_events]},
            )
        self.delivered += len(events)
        return bool(events)

    def _hold_lease(self) -> bool:
        now = self._clock.now()
        if (
            self._holds_lease
            and self._lease_until is not None
            and now < self._lease_until - timedelta(seconds=self._config.lease_seconds / 2)
        ):
            return True
        until = now + timedelta(seconds=self._config.lease_seconds)
        self._ensure_cursor(now)
        c = _CURSORS.c
        with self._db.write() as s:
            taken = _changed(
                s.execute(
                    update(_CURSORS)
                    .where(
                        c.sink == self._sink.name,
                        or_(
                            c.lease_owner.is_(None),
                            c.lease_owner == self.owner,
                            c.lease_until < now,
                        ),
                    )
                    .values(lease_owner=self.owner, lease_until=until, updated_at=now)
                )
            )
            last = s.execute(select(c.last_seq).where(c.sink == self._sink.name)).scalar_one()
            # Taken over (or first taken): the gaps the previous holder watched.
            late = None if self._holds_lease else self._stored_gaps(s)
        if taken != 1:
            if self._holds_lease:
                log.info("audit sink lease taken over", extra={"sink": self._sink.name})
            self._holds_lease = False
            return False
        self._holds_lease = True
        self._lease_until = until
        self._last_seq = int(last)
        if late is not None:
            self._late = late
        return True

    def _stored_gaps(self, s: Session) -> list[_Gap]:
        g = _GAPS.c
        rows = s.execute(
            select(g.first_seq, g.last_seq, g.horizon, g.seen_at)
            .where(g.sink == self._sink.name)
            .order_by(g.first_seq)
        ).all()
        return [_Gap(int(r[0]), int(r[1]), int(r[2]), r[3]) for r in rows]

    def _ensure_cursor(self, now: datetime) -> None:
        if self._last_seq is not None:
            return
        with self._db.read() as s:
            if s.execute(select(_CURSORS.c.sink).where(_CURSORS.c.sink == self._sink.name)).first():
                return
        try:
            with self._db.write() as s:
                s.execute(
                    insert(_CURSORS).values(
                        sink=self._sink.name,
                        last_seq=0,
                        lease_owner=None,
                        lease_until=None,
                        updated_at=now,
                    )
                )
        except SigneryError as e:
            if not isinstance(e.__cause__, IntegrityError):
                raise  # another replica made it first: fine; anything else is not

    def _next_step(self) -> _Step:
        assert self._last_seq is not None
        batch_max = self._config.batch_max
        with self._db.read() as s:
            # Before the reads: every transaction below this id had ended before
            # them, so whatever such a transaction committed, they see.
            settled = self._xid(s, _OLDEST_RUNNING_XID) if self._late_commits else None
            late_rows = (
                self._events(
                    s,
                    or_(*(AuditEventRow.seq.between(g.first, g.last) for g in self._late)),
                    batch_max,
                )
                if self._late
                else []
            )
            rows = self._events(s, AuditEventRow.seq > self._last_seq, batch_max - len(late_rows))
            batch: list[dict[str, Any]] = []
            passed: list[_Gap] = []
            expected = self._last_seq + 1
            for event in rows:
                seq = int(event["seq"])
                if seq != expected:
                    go, watch = self._pass_gap(s, expected, seq - 1, settled)
                    if not go:
                        break
                    if watch is not None:
                        passed.append(watch)
                batch.append(event)
                expected = seq + 1
        found = {int(e["seq"]) for e in late_rows}
        # A range is dropped only if this read saw all of it (not cut at batch_max).
        complete = len(late_rows) < batch_max
        late = [
            part
            for g in self._late
            for part in g.without(found)
            if not (complete and settled is not None and part.horizon <= settled)
        ]
        last_seq = int(batch[-1]["seq"]) if batch else self._last_seq
        return _Step(late_rows, batch, last_seq, late + passed)

    @staticmethod
    def _events(s: Session, where: ColumnElement[bool], limit: int) -> list[dict[str, Any]]:
        if limit <= 0:
            return []
        rows = (
            s.execute(select(AuditEventRow).where(where).order_by(AuditEventRow.seq).limit(limit))
            .scalars()
            .all()
        )
        return [event_to_wire(r).model_dump(mode="json") for r in rows]

    def _pass_gap(
        self, s: Session, first: int, last: int, settled: int | None
    ) -> tuple[bool, _Gap | None]:
        """Whether the events after the missing numbers first..last go out now,
        and the range to keep watching for behind the cursor if they do."""
        if settled is None:
            return True, None  # SQLite: deleted, it will not come (see _late_commits)
        gap = next((g for g in self._waiting if g.covers(first, last)), None)
        if gap is None:
            # The horizon is read after the read that saw the numbers missing.
            gap = _Gap(first, last, self._xid(s, _NEXT_XID), self._clock.now())
            self._waiting.append(gap)
        if gap.horizon <= settled:
            return True, None  # rolled back: nothing can commit these numbers any more
        if (self._clock.now() - gap.seen_at).total_seconds() < self._config.gap_seconds:
            return False, None
        log.warning(
            "audit events not committed yet; later events go out, these follow when committed",
            extra={"sink": self._sink.name, "from_seq": first, "to_seq": last},
        )
        return True, replace(gap, first=first, last=last)

    @staticmethod
    def _xid(s: Session, query: Select[str]) -> int:
        return int(s.execute(query).scalar_one())

    def _advance(self, last_seq: int, late: list[_Gap]) -> bool:
        """Move the cursor and store the watched gaps, only if this forwarder
        still holds the lease and nobody moved the cursor meanwhile (compare-and-set)."""
        assert self._last_seq is not None
        now = self._clock.now()
        until = now + timedelta(seconds=self._config.lease_seconds)
        c = _CURSORS.c
        with self._db.write() as s:
            moved = _changed(
                s.execute(
                    update(_CURSORS)
                    .where(
                        and_(
                            c.sink == self._sink.name,
                            c.lease_owner == self.owner,
                            c.last_seq == self._last_seq,
                        )
                    )
                    .values(last_seq=last_seq, lease_until=until, updated_at=now)
                )
            )
            if moved == 1 and late != self._late:
                s.execute(delete(_GAPS).where(_GAPS.c.sink == self._sink.name))
                if late:
                    s.execute(
                        insert(_GAPS),
                        [
                            {
                                "sink": self._sink.name,
                                "first_seq": g.first,
                                "last_seq": g.last,
                                "horizon": g.horizon,
                                "seen_at": g.seen_at,
                            }
                            for g in late
                        ],
                    )
        if moved != 1:
            self._holds_lease = False
            return False
        self._last_seq = last_seq
        self._lease_until = until
        self._late = late
        self._waiting = [g for g in self._waiting if g.last > last_seq]
        return True

    def _release(self) -> None:
        if not self._holds_lease:
            return
        c = _CURSORS.c
        with self._db.write() as s:
            s.execute(
                update(_CURSORS)
                .where(c.sink == self._sink.name, c.lease_owner == self.owner)
                .values(lease_owner=None, lease_until=None, updated_at=self._clock.now())
            )
        self._holds_lease = False
