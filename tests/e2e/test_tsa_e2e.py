"""The RFC 3161 TSA of a real `signery serve` process, over real HTTP: queries
made by `openssl ts -query`, posted as a plain HTTP client does (httpx, the way
`curl --data-binary @req.tsq` would), and the replies verified by
`openssl ts -verify`. Runs on SQLite and PostgreSQL."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from asn1crypto import cms, core, tsp
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import text

from signery.server.persistence.db import make_engine
from tests.support import (
    Installation,
    ServerProcess,
    new_installation,
    require_tool,
    running_server,
)

pytestmark = [pytest.mark.e2e, pytest.mark.interop]

QUERY = {"Content-Type": "application/timestamp-query"}


class Reply(core.Sequence):  # type: ignore[misc]
    """TimeStampResp, token OPTIONAL (RFC 3161 §2.4.2)."""

    _fields = [
        ("status", tsp.PKIStatusInfo),
        ("time_stamp_token", cms.ContentInfo, {"optional": True}),
    ]


def openssl(*args: str) -> str:
    done = subprocess.run(
        [require_tool("openssl"), *args], capture_output=True, text=True, check=False
    )
    return done.stdout + done.stderr


def make_query(tmp_path: Path, name: str, digest: str = "sha256", *extra: str) -> Path:
    data = tmp_path / f"{name}.bin"
    data.write_bytes(f"artifact {name}\n".encode())
    query = tmp_path / f"{name}.tsq"
    openssl("ts", "-query", "-data", str(data), f"-{digest}", "-cert", *extra, "-out", str(query))
    assert query.stat().st_size > 0
    return query


def cas_file(http: httpx.Client, tmp_path: Path) -> tuple[Path, list[x509.Certificate]]:
    response = http.get("/api/v1/tsa/certificate")
    assert response.status_code == 200, response.text
    certs = x509.load_pem_x509_certificates(response.content)
    assert len(certs) == 3
    cas = tmp_path / "cas.pem"
    cas.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs[1:]))
    return cas, certs


def verify(reply: bytes, query: Path, cas: Path, tmp_path: Path) -> str:
    out = tmp_path / f"{query.stem}.tsr"
    out.write_bytes(reply)
    return openssl("ts", "-verify", "-in", str(out), "-queryfile", str(query), "-CAfile", str(cas))


@pytest.fixture
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def test_a_served_timestamp_verifies_with_openssl(http: httpx.Client, tmp_path: Path) -> None:
    cas, _ = cas_file(http, tmp_path)
    for digest in ("sha256", "sha384", "sha512"):
        query = make_query(tmp_path, digest, digest)
        response = http.post("/api/v1/tsa", content=query.read_bytes(), headers=QUERY)
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/timestamp-reply"
        assert "Verification: OK" in verify(response.content, query, cas, tmp_path)


def test_a_served_rejection_names_its_failure(http: httpx.Client, tmp_path: Path) -> None:
    for body, failure in (
        (b"not a query", "bad_data_format"),
        (make_query(tmp_path, "sha1", "sha1").read_bytes(), "bad_alg"),
    ):
        response = http.post("/api/v1/tsa", content=body, headers=QUERY)
        assert response.status_code == 200
        status = Reply.load(response.content)["status"]
        assert status["status"].native == "rejection"
        assert status["fail_info"].native == {failure}


def test_concurrent_clients_get_distinct_verifiable_timestamps(
    http: httpx.Client, server: ServerProcess, tmp_path: Path
) -> None:
    cas, _ = cas_file(http, tmp_path)
    queries = [make_query(tmp_path, f"parallel-{i}") for i in range(8)]

    def stamp(query: Path) -> bytes:
        with httpx.Client(base_url=server.url, timeout=30) as own:
            return own.post("/api/v1/tsa", content=query.read_bytes(), headers=QUERY).content

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(stamp, queries))

    serials = set()
    for query, reply in zip(queries, replies, strict=True):
        assert "Verification: OK" in verify(reply, query, cas, tmp_path)
        token = Reply.load(reply)["time_stamp_token"]["content"]
        serials.add(token["encap_content_info"]["content"].parsed["serial_number"].native)
    assert len(serials) == len(queries)


@pytest.fixture(scope="module")
def sqlite_installation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installation]:
    with new_installation("sqlite", tmp_path_factory.mktemp("tsa-e2e")) as inst:
        yield inst


def test_the_rate_limit_setting_reaches_the_server(
    sqlite_installation: Installation, tmp_path: Path
) -> None:
    query = make_query(tmp_path, "limited").read_bytes()
    limited = {"SIGNERY_TSA_RATE_LIMIT_PER_MINUTE": "3"}
    with (
        running_server(sqlite_installation, node="tsa-limited", **limited) as srv,
        httpx.Client(base_url=srv.url, timeout=30) as http,
    ):
        statuses = [http.post("/api/v1/tsa", content=query, headers=QUERY) for _ in range(4)]
    assert [r.status_code for r in statuses] == [200, 200, 200, 429]
    refused = statuses[-1]
    assert refused.headers["retry-after"] == "20"  # 3 per minute: a token every 20 s
    assert refused.json()["code"] == "rate_limited"


def tsa_state(installation: Installation) -> tuple[list[bytes], int]:
    """(the TSA rows' certificates, how many tsa.created events)."""
    engine = make_engine(installation.settings.resolved_database_url, pool_size=1)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT certificate_der FROM ca_authorities WHERE role = 'tsa'")
            ).all()
            created = conn.execute(
                text("SELECT count(*) FROM audit_events WHERE kind = 'tsa.created'")
            ).scalar_one()
    finally:
        engine.dispose()
    return [bytes(r.certificate_der) for r in rows], int(created)


def test_two_worker_processes_provision_one_tsa_on_first_use(
    sqlite_installation: Installation, tmp_path: Path
) -> None:
    # As an installation initialized before the TSA existed: no TSA row.
    engine = make_engine(sqlite_installation.settings.resolved_database_url, pool_size=1)
    try:
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM ca_authorities WHERE role = 'tsa'"))
    finally:
        engine.dispose()
    _, created_before = tsa_state(sqlite_installation)
    queries = [make_query(tmp_path, f"first-{i}") for i in range(6)]
    with running_server(sqlite_installation, node="tsa-workers", SIGNERY_WORKERS="2") as srv:

        def stamp(query: Path) -> bytes:
            with httpx.Client(base_url=srv.url, timeout=30) as own:
                response = own.post("/api/v1/tsa", content=query.read_bytes(), headers=QUERY)
                assert response.status_code == 200, response.text
                return response.content

        with ThreadPoolExecutor(6) as pool:
            replies = list(pool.map(stamp, queries))
        with httpx.Client(base_url=srv.url, timeout=30) as http:
            cas, certs = cas_file(http, tmp_path)

    for query, reply in zip(queries, replies, strict=True):
        assert "Verification: OK" in verify(reply, query, cas, tmp_path)
    rows, created = tsa_state(sqlite_installation)
    assert len(rows) == 1
    assert created == created_before + 1
    assert x509.load_der_x509_certificate(rows[0]) == certs[0]
