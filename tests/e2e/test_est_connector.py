"""The ``est`` CA connector against a second Signery server acting as the external CA.

Server B is a real `signery serve` with TLS (a certificate from an openssl-made
TLS CA) whose built-in CA answers EST. Server A, another real process with its
own database, has an est connector pointing at B: a key created on A is
enrolled at B over HTTPS with basic auth (or a TLS client certificate, against
a B that requires one), becomes active with B's chain, and signs; openssl
verifies. Failures (wrong password, unverifiable TLS, a chain outside the
connector's roots) leave the key pending with the error recorded, and a retry
after the fix activates it. The public-connector rule is checked with a key in
SoftHSM2 (pkcs11) beside a refused builtin one. The CLI drives both connector
kinds once.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.e2e.test_pkcs11_e2e import pkcs11_env
from tests.keystores.softhsm import SoftHsmToken, claim_token
from tests.server.ca.pki import (
    TLS_CLIENT_EXT,
    TLS_SERVER_EXT,
    TestCa,
    make_ca,
    openssl,
    openssl_ok,
    tls_pair,
)
from tests.support import (
    SIGNERY,
    Api,
    Installation,
    ServerProcess,
    new_installation,
    running_server,
)

pytestmark = [pytest.mark.e2e, pytest.mark.interop]

DATA = b"signed on server A with a certificate from server B\n" * 40
SUBJECT = {"common_name": "A Release Signer", "organization": "Server A Org", "country": "FR"}


@dataclass
class Tls:
    ca: TestCa
    cert: Path
    key: Path
    client_cert: Path
    client_key: Path

    def context(self, *, client: bool = False) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca.cert))
        if client:
            ctx.load_cert_chain(str(self.client_cert), str(self.client_key))
        return ctx


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    base = tmp_path_factory.mktemp("est-tls")
    ca = make_ca(base / "tls-ca", "EST Test TLS CA")
    cert, key = tls_pair(ca, base, "est-server", TLS_SERVER_EXT)
    client_cert, client_key = tls_pair(ca, base, "est-client", TLS_CLIENT_EXT)
    return Tls(ca, cert, key, client_cert, client_key)


@pytest.fixture(scope="module")
def installation_b(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installation]:
    with new_installation("sqlite", tmp_path_factory.mktemp("server-b")) as inst:
        yield inst


@pytest.fixture(scope="module")
def server_b(installation_b: Installation, tls: Tls) -> Iterator[ServerProcess]:
    with running_server(
        installation_b,
        node="ca-b",
        verify=tls.context(),
        SIGNERY_TLS_CERT_FILE=str(tls.cert),
        SIGNERY_TLS_KEY_FILE=str(tls.key),
    ) as proc:
        yield proc


@pytest.fixture(scope="module")
def server_b_mtls(installation_b: Installation, tls: Tls) -> Iterator[ServerProcess]:
    """B again (same database), refusing TLS clients without a certificate."""
    with running_server(
        installation_b,
        node="ca-b-mtls",
        verify=tls.context(client=True),
        SIGNERY_TLS_CERT_FILE=str(tls.cert),
        SIGNERY_TLS_KEY_FILE=str(tls.key),
        SIGNERY_TLS_CLIENT_CA_FILE=str(tls.ca.cert),
    ) as proc:
        yield proc


@pytest.fixture(scope="module")
def b(installation_b: Installation, server_b: ServerProcess, tls: Tls) -> Iterator[Api]:
    with httpx.Client(base_url=server_b.url, timeout=60, verify=tls.context()) as http:
        init = installation_b.init
        yield Api(http, installation_b.admin_token, init.issuer, init.root_tsg_id)


@pytest.fixture(scope="module")
def b_root(b: Api) -> str:
    chain = b.http.get("/api/v1/ca/chain").text
    root = x509.load_pem_x509_certificates(chain.encode())[-1]
    assert root.subject == root.issuer
    return root.public_bytes(serialization.Encoding.PEM).decode()


@pytest.fixture(scope="module")
def installation_a(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installation]:
    with new_installation("sqlite", tmp_path_factory.mktemp("server-a")) as inst:
        yield inst


@pytest.fixture(scope="module")
def a(installation_a: Installation) -> Iterator[Api]:
    with (
        running_server(installation_a, node="server-a") as server,
        httpx.Client(base_url=server.url, timeout=120) as http,
    ):
        init = installation_a.init
        yield Api(http, installation_a.admin_token, init.issuer, init.root_tsg_id)


@pytest.fixture(scope="module")
def tsg(a: Api) -> dict[str, Any]:
    return a.create_tsg()


def est_connector(
    a: Api,
    tsg_id: str,
    server: ServerProcess,
    roots: str,
    *,
    user: tuple[str, str] | None,
    tls: Tls | None,
    client_cert: Tls | None = None,
    public: bool = False,
) -> dict[str, Any]:
    est: dict[str, Any] = {"url": f"{server.url}/.well-known/est", "timeout_seconds": 20}
    if user is not None:
        est.update(username=user[0], password=user[1])
    if tls is not None:
        est["tls_ca_pem"] = tls.ca.pem
    if client_cert is not None:
        est["client_certificate_pem"] = client_cert.client_cert.read_text()
        est["client_key_pem"] = client_cert.client_key.read_text()
    body = {
        "name": a.unique("est-b"),
        "tsg_id": tsg_id,
        "kind": "est",
        "public": public,
        "roots_pem": roots,
        "est": est,
    }
    return a.ok(a.http.post("/api/v1/ca-connectors", json=body, headers=a.admin), 201)  # type: ignore[no-any-return]


def b_user(installation_b: Installation) -> tuple[str, str]:
    assert installation_b.init.admin_username
    assert installation_b.init.admin_password
    return installation_b.init.admin_username, installation_b.init.admin_password


def new_key(a: Api, tsg_id: str, connector: dict[str, Any], **body: Any) -> dict[str, Any]:
    body.setdefault("subject", SUBJECT)
    return a.create_key(
        tsg_id,
        body.pop("algorithm", "EC_P256"),
        ca="connector",
        ca_connector=connector["id"],
        **body,
    )


def verify_with_openssl(a: Api, tsg_id: str, key: dict[str, Any], b_root: str, tmp: Path) -> None:
    """openssl: the chain reaches B's root, and a signature made on A verifies."""
    chain = key["certificate_chain"]
    (tmp / "root.pem").write_text(b_root)
    (tmp / "untrusted.pem").write_text("".join(chain[1:]))
    (tmp / "leaf.pem").write_text(chain[0])
    verified = openssl(
        "verify",
        "-CAfile",
        tmp / "root.pem",
        "-untrusted",
        tmp / "untrusted.pem",
        "-purpose",
        "any",
        tmp / "leaf.pem",
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    token = a.access_token(a.create_account(tsg_id))
    signed = a.ok(a.sign(token, key["id"], hashlib.sha256(DATA).digest()))
    (tmp / "data.bin").write_bytes(DATA)
    (tmp / "data.sig").write_bytes(base64.b64decode(signed["signature"]))
    (tmp / "leaf.pub").write_text(openssl_ok("x509", "-in", tmp / "leaf.pem", "-pubkey", "-noout"))
    out = openssl_ok(
        "dgst",
        "-sha256",
        "-verify",
        tmp / "leaf.pub",
        "-signature",
        tmp / "data.sig",
        tmp / "data.bin",
    )
    assert out.strip() == "Verified OK"


# ------------------------------------------------------------------ enrollment


def test_a_key_on_a_is_enrolled_at_b(
    a: Api,
    b: Api,
    tsg: dict[str, Any],
    server_b: ServerProcess,
    installation_b: Installation,
    tls: Tls,
    b_root: str,
    tmp_path: Path,
) -> None:
    connector = est_connector(a, tsg["id"], server_b, b_root, user=b_user(installation_b), tls=tls)
    key = new_key(a, tsg["id"], connector, algorithm="EC_P384")
    assert key["status"] == "active", key["certificate_request"]
    assert key["certificate_request"]["status"] == "issued"
    chain = [x509.load_pem_x509_certificate(c.encode()) for c in key["certificate_chain"]]
    b_chain = x509.load_pem_x509_certificates(b.http.get("/api/v1/ca/chain").text.encode())
    assert chain[1:] == b_chain, "B's issuing CA then B's root"
    assert chain[0].subject.rfc4514_string() == "C=FR,O=Server A Org,CN=A Release Signer"
    spki = (serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert chain[0].public_key().public_bytes(*spki).decode() == key["public_key_pem"]
    verify_with_openssl(a, tsg["id"], key, b_root, tmp_path)

    # B recorded the issuance for this very key, enrolled by B's admin over EST.
    issued = b.ok(
        b.http.get(
            "/api/v1/audit/events",
            params={"kind": "ca.certificate.issued", "order": "desc", "limit": 1},
            headers=b.admin,
        )
    )["events"][0]
    assert issued["details"]["operation"] == "simpleenroll"
    assert issued["details"]["certificate_serial"] == format(chain[0].serial_number, "x")
    spki_der = (
        chain[0]
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    assert issued["details"]["public_key_sha256"] == hashlib.sha256(spki_der).hexdigest()

    # Renewal: simplereenroll at B; the new certificate replaces the old one.
    renewed = a.ok(a.http.post(f"/api/v1/keys/{key['id']}/renew", json={}, headers=a.admin))
    assert renewed["status"] == "active"
    assert renewed["certificate_request"]["purpose"] == "renew"
    assert renewed["certificate_request"]["status"] == "issued"
    new_leaf = x509.load_pem_x509_certificate(renewed["certificate_chain"][0].encode())
    assert new_leaf.serial_number != chain[0].serial_number
    records = a.ok(a.http.get(f"/api/v1/keys/{key['id']}/certificates", headers=a.admin))
    assert [r["status"] for r in records] == ["current", "superseded"]
    again = b.ok(
        b.http.get(
            "/api/v1/audit/events",
            params={"kind": "ca.certificate.issued", "order": "desc", "limit": 1},
            headers=b.admin,
        )
    )["events"][0]
    assert again["details"]["operation"] == "simplereenroll"
    verify_with_openssl(a, tsg["id"], renewed, b_root, tmp_path)


def test_a_failed_enrollment_stays_pending_and_is_retried(
    a: Api,
    tsg: dict[str, Any],
    server_b: ServerProcess,
    installation_b: Installation,
    tls: Tls,
    b_root: str,
    tmp_path: Path,
) -> None:
    username, password = b_user(installation_b)
    connector = est_connector(a, tsg["id"], server_b, b_root, user=(username, "wrong"), tls=tls)
    key = new_key(a, tsg["id"], connector)
    assert key["status"] == "pending"
    request = key["certificate_request"]
    assert request["status"] == "pending"
    assert "ca_connector_failed" in request["error"]
    assert "HTTP 401" in request["error"]
    assert "wrong" not in request["error"]
    failed = a.ok(
        a.http.get(
            "/api/v1/audit/events",
            params={"key_id": key["id"], "kind": "key.certificate.enrollment_failed"},
            headers=a.admin,
        )
    )["events"]
    assert [e["reason"] for e in failed] == ["ca_connector_failed"]

    retry = a.http.post(f"/api/v1/keys/{key['id']}/enroll", headers=a.admin)
    assert retry.status_code == 503
    assert retry.json()["code"] == "ca_connector_failed"

    a.ok(
        a.http.patch(
            f"/api/v1/ca-connectors/{connector['id']}",
            json={"est": {"url": connector["est"]["url"], "password": password}},
            headers=a.admin,
        )
    )
    active = a.ok(a.http.post(f"/api/v1/keys/{key['id']}/enroll", headers=a.admin))
    assert active["status"] == "active"
    assert active["certificate_request"]["error"] is None
    verify_with_openssl(a, tsg["id"], active, b_root, tmp_path)


def test_tls_is_verified_and_roots_are_enforced(
    a: Api,
    tsg: dict[str, Any],
    server_b: ServerProcess,
    installation_b: Installation,
    tls: Tls,
    b_root: str,
    tmp_path: Path,
) -> None:
    user = b_user(installation_b)
    # No CA bundle: the system trust store does not know B's test TLS CA.
    system_trust = est_connector(a, tsg["id"], server_b, b_root, user=user, tls=None)
    key = new_key(a, tsg["id"], system_trust)
    assert key["status"] == "pending"
    assert "CERTIFICATE_VERIFY_FAILED" in key["certificate_request"]["error"]

    # B issues, but its chain does not reach the roots this connector trusts.
    elsewhere = make_ca(tmp_path / "elsewhere", "Not B's Root")
    wrong_roots = est_connector(a, tsg["id"], server_b, elsewhere.pem, user=user, tls=tls)
    key = new_key(a, tsg["id"], wrong_roots)
    assert key["status"] == "pending"
    assert key["certificate_chain"] == []
    assert key["certificate_request"]["error"].startswith("certificate_chain_untrusted")


def test_a_tls_client_certificate_is_presented(
    a: Api,
    tsg: dict[str, Any],
    server_b_mtls: ServerProcess,
    installation_b: Installation,
    tls: Tls,
    b_root: str,
    tmp_path: Path,
) -> None:
    user = b_user(installation_b)
    without = est_connector(a, tsg["id"], server_b_mtls, b_root, user=user, tls=tls)
    key = new_key(a, tsg["id"], without)
    assert key["status"] == "pending"
    assert "cannot reach the EST server" in key["certificate_request"]["error"]

    with_cert = est_connector(
        a, tsg["id"], server_b_mtls, b_root, user=user, tls=tls, client_cert=tls
    )
    assert with_cert["est"]["has_client_key"] is True
    key = new_key(a, tsg["id"], with_cert)
    assert key["status"] == "active", key["certificate_request"]
    verify_with_openssl(a, tsg["id"], key, b_root, tmp_path)


# ------------------------------------------------------------------ public connectors


@pytest.fixture(scope="module")
def token() -> SoftHsmToken:
    return claim_token()


@pytest.fixture(scope="module")
def hsm_a(tmp_path_factory: pytest.TempPathFactory, token: SoftHsmToken) -> Iterator[Api]:
    """Another server A whose keys may live on a PKCS#11 token (SoftHSM2)."""
    data = tmp_path_factory.mktemp("server-a-hsm")
    with (
        new_installation("sqlite", data, pkcs11=token.settings()) as inst,
        running_server(inst, node="server-a-hsm", **pkcs11_env(token)) as server,
        httpx.Client(base_url=server.url, timeout=120) as http,
    ):
        yield Api(http, inst.admin_token, inst.init.issuer, inst.init.root_tsg_id)


def test_a_public_connector_takes_hardware_keys_only(
    hsm_a: Api,
    server_b: ServerProcess,
    installation_b: Installation,
    tls: Tls,
    b_root: str,
    tmp_path: Path,
) -> None:
    tsg = hsm_a.create_tsg()
    public = est_connector(
        hsm_a, tsg["id"], server_b, b_root, user=b_user(installation_b), tls=tls, public=True
    )
    assert public["public"] is True
    refused = hsm_a.http.post(
        "/api/v1/keys",
        json={
            "name": hsm_a.unique("soft"),
            "tsg_id": tsg["id"],
            "algorithm": "EC_P256",
            "storage": "builtin",
            "certificate_authority": "connector",
            "ca_connector": public["name"],
        },
        headers=hsm_a.admin,
    )
    assert refused.status_code == 409, refused.text
    assert refused.json()["code"] == "connector_requires_hardware_key"
    keys = hsm_a.ok(
        hsm_a.http.get("/api/v1/keys", params={"tsg_id": tsg["id"]}, headers=hsm_a.admin)
    )
    assert keys == []

    hardware = new_key(hsm_a, tsg["id"], public, storage="pkcs11")
    assert hardware["storage"] == "pkcs11"
    assert hardware["status"] == "active", hardware["certificate_request"]
    verify_with_openssl(hsm_a, tsg["id"], hardware, b_root, tmp_path)


# ------------------------------------------------------------------ the CLI


def test_the_cli_drives_both_connector_kinds(
    a: Api,
    tsg: dict[str, Any],
    server_b: ServerProcess,
    installation_b: Installation,
    tls: Tls,
    b_root: str,
    tmp_path: Path,
) -> None:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "SIGNERY_HOME": str(tmp_path / "home"),
        "SIGNERY_SERVER": str(a.http.base_url).rstrip("/"),
        "SIGNERY_API_TOKEN": a.admin_token,
    }

    def cli(*args: str | Path) -> Any:
        result = subprocess.run(
            [SIGNERY, *map(str, args), "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return json.loads(result.stdout)

    (tmp_path / "b-root.pem").write_text(b_root)
    (tmp_path / "tls-ca.pem").write_text(tls.ca.pem)
    username, password = b_user(installation_b)
    (tmp_path / "password").write_text(password + "\n")
    est = cli(
        "ca-connector", "create", "cli-est", "--kind", "est", "--tsg", tsg["id"],
        "--roots", tmp_path / "b-root.pem", "--est-url", f"{server_b.url}/.well-known/est",
        "--est-username", username, "--est-password-file", tmp_path / "password",
        "--tls-ca", tmp_path / "tls-ca.pem",
    )  # fmt: skip
    assert est["est"]["has_password"] is True
    key = cli(
        "key", "create", "cli-est-key", "--algorithm", "EC_P256", "--tsg", tsg["id"],
        "--connector", "cli-est", "--cn", "CLI EST Signer",
    )  # fmt: skip
    assert key["status"] == "active"
    # Nothing to enroll once active: a clean refusal, no traceback.
    refused = subprocess.run(
        [SIGNERY, "key", "enroll", key["id"]],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert refused.returncode == 1
    assert "no pending certificate request" in refused.stderr
    assert "Traceback" not in refused.stderr

    # The csr connector: the CLI fetches the CSR, openssl's CA issues, the CLI uploads.
    own = make_ca(tmp_path / "own-ca", "CLI Test Root")
    csr_connector = cli(
        "ca-connector", "create", "cli-csr", "--kind", "csr", "--tsg", tsg["id"],
        "--roots", own.cert,
    )  # fmt: skip
    pending = cli(
        "key", "create", "cli-csr-key", "--algorithm", "RSA_2048", "--tsg", tsg["id"],
        "--connector", "cli-csr",
    )  # fmt: skip
    assert pending["status"] == "pending"
    cli("key", "csr", "cli-csr-key", "--tsg", tsg["id"], "-o", tmp_path / "key.csr")
    assert openssl("req", "-verify", "-in", tmp_path / "key.csr", "-noout").returncode == 0
    own.issue(tmp_path / "key.csr", tmp_path / "chain.pem")
    active = cli(
        "key", "upload-certificate", "cli-csr-key", tmp_path / "chain.pem", "--tsg", tsg["id"]
    )
    assert active["status"] == "active"
    listed = cli("ca-connector", "list", "--tsg", tsg["id"])
    assert {"cli-est", "cli-csr"} <= {c["name"] for c in listed}
    spare = cli(
        "ca-connector", "create", "cli-spare", "--kind", "csr", "--tsg", tsg["id"],
        "--roots", own.cert,
    )  # fmt: skip
    assert cli("ca-connector", "delete", spare["id"]) == {"deleted": spare["id"]}
    assert csr_connector["kind"] == "csr"
