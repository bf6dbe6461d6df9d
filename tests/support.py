"""Test support: databases, installations, server processes and an API helper.

Everything here is real: SQLite files, PostgreSQL databases created on the
local server for each installation, `signery serve` subprocesses on loopback.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from cryptography.hazmat.primitives import serialization
from sqlalchemy.orm import Session

from signery import endpoints
from signery import protocol as p
from signery.client import AccountCredentials, Client
from signery.protocol import JWT_BEARER_GRANT, SubjectPolicyRules
from signery.server.ca.models import SubjectPolicyRow
from signery.server.config import Settings, load_settings
from signery.server.installation.bootstrap import InitResult, initialize
from signery.server.persistence.db import make_engine

PG_ADMIN_DSN = os.environ.get(
    "SIGNERY_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REQUIRE_ALL = os.environ.get("SIGNERY_TEST_REQUIRE_ALL") == "1"
SIGNERY = str(Path(sys.executable).with_name("signery"))


def missing(what: str) -> None:
    """Skip when a real dependency is absent on a developer machine; in CI
    (SIGNERY_TEST_REQUIRE_ALL=1) a missing dependency is a failure, never a skip."""
    if REQUIRE_ALL:
        pytest.fail(f"{what} is required in CI but missing")
    pytest.skip(f"{what} not available")


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        missing(name)
    assert path is not None
    return path


# ------------------------------------------------------------------ clock


class FakeClock:
    """Real time plus an adjustable offset."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += timedelta(seconds=seconds)


# ------------------------------------------------------------------ databases


def pg_available() -> bool:
    try:
        with psycopg.connect(PG_ADMIN_DSN, connect_timeout=3):
            return True
    except psycopg.Error:
        return False


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh, empty PostgreSQL database; dropped afterwards."""
    if not pg_available():
        missing("PostgreSQL on 127.0.0.1:5432")
    name = f"signery_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def database_url_for(backend: str, data_dir: Path) -> Iterator[str | None]:
    """None means the SQLite default inside data_dir."""
    if backend == "sqlite":
        yield None
    else:
        with postgres_database() as url:
            yield url


@dataclass
class Installation:
    settings: Settings
    init: InitResult
    backend: str

    @property
    def admin_token(self) -> str:
        assert self.init.admin_token
        return self.init.admin_token


# The subject policy an operator sets on the root TSG to let every TSG's keys get
# any subject from the built-in CA (what every installation allowed before subject
# policies existed).
ANY_SUBJECT = SubjectPolicyRules(
    common_name=["*"], organization=["*"], organizational_unit=["*"], country=["*"], email=["*"]
)


def allow_any_subject(installation: Installation) -> None:
    """Set ANY_SUBJECT on the root TSG, straight in the database (no server runs yet)."""
    engine = make_engine(installation.settings.resolved_database_url, pool_size=1)
    try:
        with Session(engine) as s, s.begin():
            s.add(
                SubjectPolicyRow(
                    tsg_id=installation.init.root_tsg_id,
                    rules_json=ANY_SUBJECT.model_dump_json(),
                    updated_at=datetime.now(UTC),
                    updated_by=None,
                )
            )
    finally:
        engine.dispose()


@contextlib.contextmanager
def new_installation(
    backend: str, data_dir: Path, *, any_subject: bool = True, **overrides: Any
) -> Iterator[Installation]:
    """An initialized installation. With ``any_subject`` (the default), its root TSG
    has the ANY_SUBJECT policy, so that tests about other things create keys with
    built-in CA certificates in any TSG; the subject policy tests start without it."""
    with database_url_for(backend, data_dir) as url:
        settings = load_settings(data_dir=data_dir, database_url=url, access_log=False, **overrides)
        installation = Installation(settings, initialize(settings), backend)
        if any_subject and installation.init.created:
            allow_any_subject(installation)
        yield installation


@contextlib.contextmanager
def inserts_fail(installation: Installation, table: str) -> Iterator[None]:
    """Make every INSERT into ``table`` fail inside the database, as a full or
    broken disk would: a real trigger, on SQLite and PostgreSQL alike."""
    name = f"{table}_down"
    engine = make_engine(installation.settings.resolved_database_url, pool_size=1)
    try:
        with engine.begin() as conn:
            if engine.dialect.name == "sqlite":
                conn.exec_driver_sql(
                    f"CREATE TRIGGER {name} BEFORE INSERT ON {table} "
                    "BEGIN SELECT RAISE(ABORT, 'storage full'); END"
                )
            else:
                conn.exec_driver_sql(
                    f"CREATE FUNCTION {name}() RETURNS trigger AS $$ "
                    "BEGIN RAISE EXCEPTION 'storage full'; END $$ LANGUAGE plpgsql"
                )
                conn.exec_driver_sql(
                    f"CREATE TRIGGER {name} BEFORE INSERT ON {table} "
                    f"FOR EACH ROW EXECUTE FUNCTION {name}()"
                )
        yield
    finally:
        with engine.begin() as conn:
            if engine.dialect.name == "sqlite":
                conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {name}")
            else:
                conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {name} ON {table}")
                conn.exec_driver_sql(f"DROP FUNCTION IF EXISTS {name}()")
        engine.dispose()


# ------------------------------------------------------------------ server processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self.process.stdout is not None:
            self.process.stdout.close()

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def server_env(installation: Installation, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIGNERY_")}
    env["SIGNERY_DATA_DIR"] = str(installation.settings.data_dir)
    if installation.settings.database_url:
        env["SIGNERY_DATABASE_URL"] = installation.settings.database_url
    env["SIGNERY_LOG_LEVEL"] = "warning"
    env.update(extra)
    return env


# Bounds on how long a server may take to start: they only decide when a test
# gives up, so they are generous enough for a machine running two suites at once.
SERVER_START_TIMEOUT = float(os.environ.get("SIGNERY_TEST_START_TIMEOUT", "180"))


def _announced_url(
    process: subprocess.Popen[bytes], log: Path, timeout: float = SERVER_START_TIMEOUT
) -> str:
    assert process.stdout is not None
    lines: list[bytes] = []
    reader = threading.Thread(target=lambda: lines.append(process.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(timeout)
    if not lines or not lines[0]:
        # Leave nothing behind: a process or pipe left open would be reported as a
        # ResourceWarning by whichever test happens to run next.
        process.kill()
        process.wait(30)
        reader.join(30)
        process.stdout.close()
        raise RuntimeError(
            f"server did not announce its URL:\n{log.read_text(errors='replace')[-3000:]}"
        )
    return str(json.loads(lines[0])["url"])


def wait_until_ready(
    process: subprocess.Popen[bytes],
    url: str,
    log_tail: Callable[[], str] = lambda: "",
    *,
    verify: ssl.SSLContext | bool = True,
) -> None:
    """Poll ``/readyz`` until the server answers 200 (the URL is announced before
    its socket listens), or fail when the process exits or the time is up."""
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log_tail()}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1, verify=verify).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"server did not become ready:\n{log_tail()}")
        time.sleep(0.1)


@contextlib.contextmanager
def running_server(
    installation: Installation,
    *,
    node: str = "node-a",
    verify: ssl.SSLContext | bool = True,
    **env: str,
) -> Iterator[ServerProcess]:
    """A real `signery serve` process on a loopback port it picks itself (port 0;
    the URL is read from its `--json` announcement, so no port race). ``verify``
    checks the TLS certificate of a server started with SIGNERY_TLS_*."""
    log = installation.settings.data_dir / f"server-{node}-{uuid.uuid4().hex[:8]}.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [SIGNERY, "serve", "--host", "127.0.0.1", "--port", "0", "--json"],
            env=server_env(installation, SIGNERY_NODE_ID=node, **env),
            stdout=subprocess.PIPE,
            stderr=log_file,
        )
    server = ServerProcess(_announced_url(process, log), process, log)
    try:
        wait_until_ready(process, server.url, server.log_tail, verify=verify)
        yield server
    finally:
        server.stop()


# ------------------------------------------------------------------ JWT crafting (for attacks)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def raw_jwt(
    header: dict[str, Any],
    claims: dict[str, Any],
    signature: bytes = b"",
    *,
    hmac_key: bytes | None = None,
) -> str:
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    if hmac_key is not None:
        signature = hmac.new(hmac_key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def assertion_claims(
    client_id: str, audience: Any, *, lifetime: int = 60, iat_offset: int = 0, **extra: Any
) -> dict[str, Any]:
    iat = int(time.time()) + iat_offset
    claims: dict[str, Any] = {
        "iss": client_id,
        "sub": client_id,
        "aud": audience,
        "iat": iat,
        "exp": iat + lifetime,
        "jti": str(uuid.uuid4()),
    }
    claims.update(extra)
    return claims


# ------------------------------------------------------------------ API helper


@dataclass
class Account:
    id: str
    client_id: str
    tsg_id: str
    private_key_pem: str
    name: str

    def credentials(self) -> AccountCredentials:
        key = serialization.load_pem_private_key(self.private_key_pem.encode(), None)
        return AccountCredentials(self.client_id, key)  # type: ignore[arg-type]


@dataclass
class Api:
    """Calls a Signery server (a TestClient or an httpx.Client on a real process).

    Management calls go through the typed sub-clients of ``signery.client`` (as the
    administrator, over the same transport); the signing plane is spoken raw, so
    that tests can send what a client never would."""

    http: httpx.Client
    admin_token: str
    issuer: str
    root_tsg_id: str
    _names: int = field(default=0)
    _admin_client: Client | None = field(default=None, repr=False)

    @property
    def admin_client(self) -> Client:
        """A signery Client with the administrator's API token, on ``http``'s transport."""
        if self._admin_client is None:
            self._admin_client = Client(
                str(self.http.base_url),
                api_token=self.admin_token,
                transport=self.http._transport,  # the TestClient's app or the real server
            )
        return self._admin_client

    def unique(self, prefix: str) -> str:
        self._names += 1
        return f"{prefix}-{self._names}-{uuid.uuid4().hex[:6]}"

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}

    def ok(self, response: httpx.Response, status: int = 200) -> Any:
        assert response.status_code == status, f"{response.status_code}: {response.text}"
        return response.json()

    # management
    def create_tsg(self, name: str | None = None, parent: str | None = None) -> dict[str, Any]:
        request = p.TsgCreate(name=name or self.unique("tsg"), parent_id=parent or self.root_tsg_id)
        return self.admin_client.tsgs.create(request).model_dump(mode="json")

    def create_account(self, tsg_id: str, **body: Any) -> Account:
        body.setdefault("name", self.unique("acct"))
        created = self.admin_client.accounts.create(p.AccountCreate(tsg_id=tsg_id, **body))
        return Account(
            created.id,
            created.client_id,
            created.tsg_id,
            created.private_key_pem or "",
            created.name,
        )

    def create_key(
        self, tsg_id: str, algorithm: str = "EC_P256", ca: str = "builtin", **body: Any
    ) -> dict[str, Any]:
        payload = {
            "name": self.unique("key"),
            "tsg_id": tsg_id,
            "algorithm": algorithm,
            "certificate_authority": ca,
        }
        payload.update(body)
        created = self.admin_client.signing_keys.create(p.KeyCreate.model_validate(payload))
        return created.model_dump(mode="json")

    def token_response(self, assertion: str) -> httpx.Response:
        return self.http.post(
            endpoints.TOKEN.path(), data={"grant_type": JWT_BEARER_GRANT, "assertion": assertion}
        )

    def access_token(self, account: Account, now: float | None = None) -> str:
        data = self.ok(self.token_response(account.credentials().assertion(self.issuer, now=now)))
        return str(data["access_token"])

    def sign(
        self,
        token: str,
        key: str,
        digest: bytes,
        digest_algorithm: str = "sha256",
        scheme: str = "ecdsa",
    ) -> httpx.Response:
        # The key goes in as given (not encoded): tests send paths a client never would.
        return self.http.post(
            endpoints.SIGN.template.format(key=key),
            json={
                "digest": base64.b64encode(digest).decode(),
                "digest_algorithm": digest_algorithm,
                "scheme": scheme,
            },
            headers={"Authorization": f"Bearer {token}"},
        )

    # audit and usage
    def last_seq(self) -> int:
        page = self.admin_client.audit.events(newest_first=True, limit=1)
        return page.events[0].seq if page.events else 0

    def events_after(self, seq: int) -> list[dict[str, Any]]:
        page = self.admin_client.audit.events(cursor=str(seq), limit=1000)
        return [e.model_dump(mode="json") for e in page.events]

    def usage(self) -> dict[tuple[str, str], dict[str, Any]]:
        report = self.admin_client.audit.usage()
        return {(c.subject_type, c.subject_id): c.model_dump(mode="json") for c in report.counters}

    def counter(
        self, usage: dict[tuple[str, str], dict[str, Any]], kind: str, subject: str
    ) -> tuple[int, int]:
        c = usage.get((kind, subject))
        return (c["successes"], c["failures"]) if c else (0, 0)


@contextlib.contextmanager
def refused_once(
    api: Api,
    *,
    reason: str,
    kind: str | None = None,
    account_id: str | None = None,
    key_id: str | None = None,
    failures_counted: bool = False,
) -> Iterator[None]:
    """The contract of every refusal: exactly one new audit event with the expected
    reason code, no success counted anywhere, failures counted only where
    attributable, and the server still ready afterwards."""
    seq = api.last_seq()
    usage = api.usage()
    yield
    events = api.events_after(seq)
    assert len(events) == 1, (
        f"expected exactly one audit event, got {[(e['kind'], e['reason']) for e in events]}"
    )
    assert events[0]["reason"] == reason, events[0]
    assert events[0]["outcome"] != "succeeded"
    if kind is not None:
        assert events[0]["kind"] == kind, events[0]
    after = api.usage()
    # A refusal by a decision is counted as denied, an invalid request or an error
    # as a failure: the other column never moves.
    column = "denied" if events[0]["outcome"] == "denied" else "failures"
    for (scope, subject), counter in after.items():
        before = usage.get((scope, subject), {"successes": 0, "failures": 0, "denied": 0})
        assert counter["successes"] == before["successes"], (
            f"a success was counted for {scope} {subject}"
        )
        for name in ("failures", "denied"):
            expected = before[name]
            # The key's version in use is counted with the key.
            attributable = subject in (account_id, key_id) or (
                scope == "key_version" and key_id is not None and counter["key_id"] == key_id
            )
            if failures_counted and name == column and attributable:
                expected += 1
            assert counter[name] == expected, f"{name} for {scope} {subject}"
    if failures_counted:
        for scope, subject in (("account", account_id), ("key", key_id)):
            if subject is not None:
                was = usage.get((scope, subject), {column: 0})[column]
                assert after[(scope, subject)][column] == was + 1, f"{column} for {subject}"
    assert api.http.get(endpoints.READYZ.path()).status_code == 200
