"""`signery init` (signery.server.installation.bootstrap.initialize) on SQLite and PostgreSQL:
what a first run creates, that a second run changes and reveals nothing, and that
a database is never paired with the wrong master key (by init or by the server)."""

from __future__ import annotations

import base64
import contextlib
import re
import secrets
import stat
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from argon2 import PasswordHasher
from argon2.exceptions import VerifyMismatchError
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from fastapi.testclient import TestClient
from sqlalchemy import Engine, inspect, text
from sqlalchemy.engine import make_url

from signery.crypto import algorithm_of_public_key
from signery.errors import ConfigurationError
from signery.keystores import MasterKey
from signery.server.app import create_app
from signery.server.config import Settings, load_settings
from signery.server.installation.bootstrap import InitResult, initialize
from signery.server.persistence import migrate
from signery.server.persistence.db import make_engine
from tests.support import PG_ADMIN_DSN, database_url_for, postgres_database, require_tool

BACKENDS = ["sqlite", "postgresql"]
TOKEN_SHAPE = re.compile(r"sgy_pat_(?P<id>[0-9a-f]{16})_(?P<secret>[A-Za-z0-9_-]+)")
INIT_EVENTS = {
    "server.initialized",
    "ca.created",
    "user.created",
    "role.bound",
    "user.api_token.created",
}


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@contextlib.contextmanager
def inspection_engine_for(url: str) -> Iterator[Engine]:
    engine = make_engine(url, pool_size=1)
    try:
        yield engine
    finally:
        engine.dispose()


def inspection_engine(settings: Settings) -> contextlib.AbstractContextManager[Engine]:
    return inspection_engine_for(settings.resolved_database_url)


def snapshot(settings: Settings) -> dict[str, list[str]]:
    """Every row of every table (alembic_version included), order-independent."""
    with inspection_engine(settings) as engine, engine.connect() as conn:
        return {
            name: sorted(repr(tuple(row)) for row in conn.execute(text(f'SELECT * FROM "{name}"')))  # noqa: S608
            for name in inspect(conn).get_table_names()
        }


def stored_values(settings: Settings) -> list[bytes]:
    """Every non-null value of every table, as bytes."""
    values: list[bytes] = []
    with inspection_engine(settings) as engine, engine.connect() as conn:
        for name in inspect(conn).get_table_names():
            # Table names come from the database's own catalog.
            for row in conn.execute(text(f'SELECT * FROM "{name}"')):  # noqa: S608
                for value in row:
                    if isinstance(value, bytes | bytearray | memoryview):
                        values.append(bytes(value))
                    elif value is not None:
                        values.append(str(value).encode())
    return values


def sqlite_files(data_dir: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(data_dir.glob("signery.db*")))


def query(settings: Settings, sql: str, **params: Any) -> list[Any]:
    with inspection_engine(settings) as engine, engine.connect() as conn:
        return list(conn.execute(text(sql), params))


def meta_value(settings: Settings, key: str) -> str:
    rows = query(settings, "SELECT value FROM server_meta WHERE key = :k", k=key)
    assert len(rows) == 1
    return str(rows[0].value)


# ------------------------------------------------------------------ fixtures


@dataclass
class Installed:
    backend: str
    data_dir: Path
    settings: Settings
    result: InitResult


@pytest.fixture(scope="module", params=BACKENDS)
def installed(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Installed]:
    # A data directory that does not exist yet, so that init creates it.
    data_dir = tmp_path_factory.mktemp(f"init-{request.param}") / "data"
    with database_url_for(request.param, data_dir) as url:
        settings = load_settings(data_dir=data_dir, database_url=url, access_log=False)
        yield Installed(request.param, data_dir, settings, initialize(settings))


@dataclass
class Blank:
    """A database and a data directory that nothing has touched yet."""

    backend: str
    data_dir: Path
    database_url: str | None

    def settings(self, **overrides: Any) -> Settings:
        return load_settings(
            data_dir=self.data_dir, database_url=self.database_url, access_log=False, **overrides
        )


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    with postgres_database() as url:
        yield url


def empty_postgres(url: str) -> None:
    # Cheaper than a new database per test (DROP DATABASE forces a checkpoint).
    with inspection_engine_for(url) as engine, engine.begin() as conn:
        conn.exec_driver_sql("DROP SCHEMA public CASCADE")
        conn.exec_driver_sql("CREATE SCHEMA public")


@pytest.fixture(params=BACKENDS)
def blank(request: pytest.FixtureRequest, tmp_path: Path) -> Blank:
    data_dir = tmp_path / "data"
    if request.param == "sqlite":
        return Blank("sqlite", data_dir, None)
    url: str = request.getfixturevalue("pg_url")
    empty_postgres(url)
    return Blank("postgresql", data_dir, url)


def assert_refused(start: Callable[[], object], match: str) -> None:
    """``start`` (a create_app call) must refuse with ConfigurationError (and, as
    test_a_refused_start_leaves_no_connection_open shows, close what it opened)."""
    with pytest.raises(ConfigurationError, match=match):
        start()


def b64_key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


# ------------------------------------------------------------------ first run


def test_first_run_creates_the_installation(installed: Installed) -> None:
    result, settings = installed.result, installed.settings

    assert result.created
    assert re.fullmatch(r"[0-9]{10}", result.root_tsg_id)
    assert result.admin_username == "admin"
    assert result.admin_token is not None
    assert TOKEN_SHAPE.fullmatch(result.admin_token)
    assert result.admin_password
    assert len(result.admin_password) >= 20
    assert result.issuer == f"urn:signery:{result.installation_id}"

    assert mode_of(installed.data_dir) == 0o700
    key_file = installed.data_dir / "master.key"
    assert result.master_key_file == str(key_file)
    assert mode_of(key_file) == 0o600
    assert MasterKey.load(key_file).key_id == result.master_key_id
    assert meta_value(settings, "master_key_id") == result.master_key_id
    assert meta_value(settings, "root_tsg_id") == result.root_tsg_id
    assert meta_value(settings, "issuer") == result.issuer
    assert meta_value(settings, "installation_id") == result.installation_id

    roots = query(settings, "SELECT id, parent_id FROM tsgs")
    assert [(r.id, r.parent_id) for r in roots] == [(result.root_tsg_id, None)]
    with inspection_engine(settings) as engine:
        assert migrate.current_revision(engine) == migrate.head_revision()


def test_a_second_run_changes_nothing_and_reveals_no_secret(
    installed: Installed, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    first = installed.result
    key_file = installed.data_dir / "master.key"
    key_before = (key_file.read_bytes(), key_file.stat().st_mtime_ns, mode_of(key_file))
    rows_before = snapshot(installed.settings)
    capsys.readouterr()

    with caplog.at_level("DEBUG"):
        again = initialize(installed.settings)

    assert not again.created
    assert (again.root_tsg_id, again.issuer, again.installation_id, again.master_key_id) == (
        first.root_tsg_id,
        first.issuer,
        first.installation_id,
        first.master_key_id,
    )
    assert again.admin_username is None
    assert again.admin_password is None
    assert again.admin_token is None
    assert again.ca_root_subject is None
    assert snapshot(installed.settings) == rows_before
    assert (key_file.read_bytes(), key_file.stat().st_mtime_ns, mode_of(key_file)) == key_before

    assert first.admin_password is not None
    assert first.admin_token is not None
    out, err = capsys.readouterr()
    for shown in (out, err, caplog.text, repr(again), str(again)):
        assert first.admin_password not in shown
        assert first.admin_token not in shown


# ------------------------------------------------------------------ the master key


def test_a_master_key_from_the_settings_writes_no_key_file(blank: Blank, tmp_path: Path) -> None:
    key = b64_key()
    settings = blank.settings(master_key=key)

    result = initialize(settings)

    assert result.created
    assert result.master_key_file is None
    assert result.master_key_id == MasterKey.from_base64(key).key_id
    assert meta_value(settings, "master_key_id") == result.master_key_id
    assert not settings.resolved_master_key_file.exists()
    assert list(tmp_path.rglob("*.key")) == []
    assert not initialize(settings).created
    assert list(tmp_path.rglob("*.key")) == []
    with pytest.raises(ConfigurationError, match="another master key"):
        initialize(blank.settings(master_key=b64_key()))


def test_an_initialized_database_whose_key_file_is_gone_is_refused(blank: Blank) -> None:
    settings = blank.settings()
    initialize(settings)
    key_file = settings.resolved_master_key_file
    key_file.unlink()
    rows_before = snapshot(settings)

    with pytest.raises(ConfigurationError, match="missing"):
        initialize(settings)

    # No new key was made: one would orphan every key already in the database.
    assert not key_file.exists()
    assert list(blank.data_dir.glob("*.key")) == []
    assert snapshot(settings) == rows_before
    assert_refused(lambda: create_app(settings), "does not exist")


def test_a_different_master_key_is_refused_by_init_and_by_the_server(blank: Blank) -> None:
    settings = blank.settings()
    first = initialize(settings)
    with TestClient(create_app(settings)) as client:  # the right key is accepted
        assert client.get("/readyz").status_code == 200
    key_file = settings.resolved_master_key_file
    key_file.unlink()
    MasterKey.generate().write_new(key_file)
    other_file = key_file.read_bytes()

    with pytest.raises(ConfigurationError, match="another master key"):
        initialize(settings)
    with pytest.raises(ConfigurationError, match="another master key"):
        initialize(blank.settings(master_key=b64_key()))
    assert_refused(lambda: create_app(settings), "master key does not match")
    assert_refused(
        lambda: create_app(blank.settings(master_key=b64_key())), "master key does not match"
    )
    assert_refused(
        lambda: create_app(settings, master_key=MasterKey.generate()), "master key does not match"
    )

    assert key_file.read_bytes() == other_file
    assert meta_value(settings, "master_key_id") == first.master_key_id


# ------------------------------------------------------------------ the server refuses too


def test_the_server_refuses_an_uninitialized_database(blank: Blank) -> None:
    blank.data_dir.mkdir(mode=0o700)
    settings = blank.settings(master_key=b64_key())

    assert_refused(lambda: create_app(settings), "empty; run `signery init`")
    with inspection_engine(settings) as engine:
        migrate.upgrade(engine)
    assert_refused(lambda: create_app(settings), "not initialized; run `signery init`")

    # The same settings are served once the database is initialized.
    initialize(settings)
    with TestClient(create_app(settings)) as client:
        assert client.get("/readyz").status_code == 200


def open_connections(database_url: str) -> int:
    with psycopg.connect(PG_ADMIN_DSN) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s",
            (make_url(database_url).database,),
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_a_refused_start_leaves_no_connection_open(pg_url: str, tmp_path: Path) -> None:
    """A server that refuses to start must not keep database connections open
    (create_app is also called in-process: tests, embedding, `uvicorn --factory`)."""
    empty_postgres(pg_url)
    settings = load_settings(
        data_dir=tmp_path / "data", database_url=pg_url, master_key=b64_key(), access_log=False
    )
    assert open_connections(pg_url) == 0

    with pytest.raises(ConfigurationError, match="empty"):
        create_app(settings)
    assert open_connections(pg_url) == 0


# ------------------------------------------------------------------ secrets at rest


def test_the_admin_password_is_an_argon2id_hash(installed: Installed) -> None:
    password = installed.result.admin_password
    assert password is not None
    rows = query(installed.settings, "SELECT password_hash FROM users WHERE username = 'admin'")
    assert len(rows) == 1
    stored = rows[0].password_hash

    assert stored.startswith("$argon2id$")
    hasher = PasswordHasher()
    assert hasher.verify(stored, password)
    with pytest.raises(VerifyMismatchError):
        hasher.verify(stored, password + "x")


def test_no_secret_is_stored_in_clear(installed: Installed) -> None:
    """Scans every value of every table (and for SQLite, every byte of the
    database files) for the admin password, the API token and its secret part,
    and the master key in the encodings it could be stored under."""
    token = installed.result.admin_token
    password = installed.result.admin_password
    assert token is not None
    assert password is not None
    match = TOKEN_SHAPE.fullmatch(token)
    assert match is not None
    token_id, token_secret = match["id"], match["secret"]
    master_text = (installed.data_dir / "master.key").read_text("ascii").strip()
    master_raw = base64.b64decode(master_text)
    needles = {
        "password": password.encode(),
        "token": token.encode(),
        "token secret": token_secret.encode(),
        "master key (base64)": master_text.encode(),
        "master key (raw)": master_raw,
        "master key (hex)": master_raw.hex().encode(),
    }

    assert query(installed.settings, "SELECT id FROM api_tokens WHERE id = :i", i=token_id)
    haystacks = stored_values(installed.settings)
    assert any(token_id.encode() in h for h in haystacks)  # the scan does see the tokens table
    if installed.backend == "sqlite":
        files = sqlite_files(installed.data_dir)
        assert token_id.encode() in files
        haystacks.append(files)
    for haystack in haystacks:
        for name, needle in needles.items():
            assert needle not in haystack, f"the {name} is stored in clear"


# ------------------------------------------------------------------ the built-in CA


def ca_certificates(installed: Installed) -> dict[str, tuple[x509.Certificate, Any]]:
    rows = query(installed.settings, "SELECT * FROM ca_authorities")
    return {r.role: (x509.load_der_x509_certificate(bytes(r.certificate_der)), r) for r in rows}


def test_the_ca_certificates_form_a_valid_chain(installed: Installed) -> None:
    certs = ca_certificates(installed)
    # The time-stamping authority's row (role "tsa") is made by init too:
    # tests/server/tsa/test_service.py checks it.
    assert set(certs) == {"root", "issuing", "tsa"}
    root, issuing = certs["root"][0], certs["issuing"][0]
    now = datetime.now(UTC)

    for cert in (root, issuing):
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        assert constraints.critical
        assert constraints.value.ca
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        assert usage.key_cert_sign
        assert cert.not_valid_before_utc <= now < cert.not_valid_after_utc
        assert algorithm_of_public_key(cert.public_key()) is installed.settings.ca_algorithm
    assert issuing.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0

    assert root.subject == root.issuer
    root.verify_directly_issued_by(root)
    assert issuing.issuer == root.subject
    issuing.verify_directly_issued_by(root)
    root_ski = root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = issuing.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == root_ski.digest
    assert installed.result.ca_root_subject == root.subject.rfc4514_string()


def test_the_ca_keys_live_in_the_key_store(installed: Installed) -> None:
    for cert, row in ca_certificates(installed).values():
        material = query(
            installed.settings,
            "SELECT public_key_der, key_id FROM builtin_key_material WHERE ref = :r",
            r=row.store_ref,
        )
        assert len(material) == 1
        assert row.storage == "builtin"
        assert material[0].key_id == row.id
        assert bytes(material[0].public_key_der) == cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )


@pytest.mark.interop
def test_openssl_verifies_the_issuing_ca_against_the_root(
    installed: Installed, tmp_path: Path
) -> None:
    openssl = require_tool("openssl")
    certs = ca_certificates(installed)
    root_pem, issuing_pem = tmp_path / "root.pem", tmp_path / "issuing.pem"
    root_pem.write_bytes(certs["root"][0].public_bytes(serialization.Encoding.PEM))
    issuing_pem.write_bytes(certs["issuing"][0].public_bytes(serialization.Encoding.PEM))

    for target in (issuing_pem, root_pem):
        done = subprocess.run(
            [openssl, "verify", "-x509_strict", "-CAfile", str(root_pem), str(target)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.strip() == f"{target}: OK"

    # The check can fail: the issuing certificate does not verify as its own root.
    done = subprocess.run(
        [openssl, "verify", "-CAfile", str(issuing_pem), str(issuing_pem)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode != 0


# ------------------------------------------------------------------ audit


def test_initialization_is_audited(installed: Installed) -> None:
    rows = query(
        installed.settings,
        "SELECT kind, outcome, tsg_id FROM audit_events WHERE kind IN "
        "('server.initialized', 'ca.created', 'user.created', 'role.bound', "
        "'user.api_token.created')",
    )
    kinds = [r.kind for r in rows]

    assert sorted(kinds) == sorted(INIT_EVENTS)  # each exactly once
    for row in rows:
        assert row.outcome == "succeeded"
        assert row.tsg_id == installed.result.root_tsg_id
