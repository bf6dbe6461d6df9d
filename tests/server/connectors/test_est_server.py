"""The built-in CA's EST endpoints (RFC 7030), driven by independent clients.

A real `signery serve` process with TLS; `openssl req` makes the requests and
keys, `curl` speaks HTTPS and basic auth, `openssl base64 | openssl pkcs7`
decodes the answers and `openssl verify` checks what was issued against the
published chain. The in-process server covers the refusals (HTTP instead of
HTTPS, roles, labels, media types, bad requests).
"""

from __future__ import annotations

import base64
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from fastapi.testclient import TestClient

from tests.server.ca.pki import TLS_SERVER_EXT, TestCa, make_ca, openssl_ok, tls_pair
from tests.server.users.test_users import Person, basic
from tests.support import (
    SIGNERY,
    Api,
    Installation,
    ServerProcess,
    refused_once,
    require_tool,
    running_server,
    server_env,
)

TIMEOUT = 60
EST = "/.well-known/est"


def run_bytes(*argv: str | Path, input: bytes | None = None) -> bytes:
    result = subprocess.run(
        [*map(str, argv)], input=input, capture_output=True, timeout=TIMEOUT, check=False
    )
    assert result.returncode == 0, f"{argv}: {result.stderr.decode(errors='replace')}"
    return result.stdout


def decode_certs_only(body: bytes) -> str:
    """What an EST client does with an answer: base64 -> DER PKCS#7 -> PEM certificates."""
    openssl = require_tool("openssl")
    der = run_bytes(openssl, "base64", "-d", input=body)
    return run_bytes(openssl, "pkcs7", "-inform", "DER", "-print_certs", input=der).decode()


@dataclass
class Tls:
    ca: TestCa
    cert: Path
    key: Path

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca.cert))


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    base = tmp_path_factory.mktemp("tls")
    ca = make_ca(base / "tls-ca", "Signery Test TLS CA")
    cert, key = tls_pair(ca, base, "server", TLS_SERVER_EXT)
    return Tls(ca, cert, key)


def tls_env(tls: Tls) -> dict[str, str]:
    return {"SIGNERY_TLS_CERT_FILE": str(tls.cert), "SIGNERY_TLS_KEY_FILE": str(tls.key)}


@pytest.fixture(scope="module")
def est_server(installation: Installation, tls: Tls) -> Iterator[ServerProcess]:
    with running_server(installation, node="est", verify=tls.context(), **tls_env(tls)) as proc:
        yield proc


@dataclass
class Curl:
    """curl as the EST client: HTTPS verified against the test TLS CA."""

    server: ServerProcess
    tls: Tls
    work: Path

    def __call__(
        self,
        path: str,
        *,
        data: Path | None = None,
        user: str | None = None,
        content_type: str = "application/pkcs10",
        extra: tuple[str, ...] = (),
    ) -> tuple[int, dict[str, str], bytes]:
        headers, body = self.work / "headers.txt", self.work / "body.bin"
        argv: list[str | Path] = [
            require_tool("curl"),
            "-sS",
            "--cacert",
            self.tls.ca.cert,
            "-D",
            headers,
            "-o",
            body,
            "-w",
            "%{http_code}",
            *extra,
        ]
        if user is not None:
            argv += ["--user", user]
        if data is not None:
            argv += ["-H", f"Content-Type: {content_type}", "--data-binary", f"@{data}"]
        status = int(run_bytes(*argv, f"{self.server.url}{path}").decode())
        parsed: dict[str, str] = {}
        for line in headers.read_text().splitlines()[1:]:
            name, sep, value = line.partition(":")
            if sep:
                parsed[name.strip().lower()] = value.strip()
        return status, parsed, body.read_bytes()


@pytest.fixture
def curl(est_server: ServerProcess, tls: Tls, tmp_path: Path) -> Curl:
    assert est_server.url.startswith("https://")
    return Curl(est_server, tls, tmp_path)


def csr_b64(work: Path, subject: str, name: str = "client") -> tuple[Path, Path]:
    """`openssl req` makes a key and a DER CSR; `openssl base64` encodes it."""
    key, der, b64 = work / f"{name}.key", work / f"{name}.der", work / f"{name}.b64"
    openssl_ok(
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        key,
        "-subj",
        subject,
        "-outform",
        "DER",
        "-out",
        der,
    )
    openssl_ok("base64", "-in", der, "-out", b64)
    return b64, key


def admin_user(installation: Installation) -> str:
    assert installation.init.admin_password
    return f"{installation.init.admin_username}:{installation.init.admin_password}"


# ------------------------------------------------------------------ real clients


def test_cacerts_is_public_and_matches_the_published_chain(
    curl: Curl, installation: Installation, est_server: ServerProcess, tls: Tls
) -> None:
    status, headers, body = curl(f"{EST}/cacerts")
    assert status == 200, body
    assert headers["content-type"].startswith("application/pkcs7-mime")
    assert headers["content-transfer-encoding"] == "base64"
    pem = decode_certs_only(body)
    certs = x509.load_pem_x509_certificates(pem.encode())
    published = httpx.get(f"{est_server.url}/api/v1/ca/chain", verify=tls.context()).text
    assert sorted(c.fingerprint(hashes.SHA256()) for c in certs) == sorted(
        c.fingerprint(hashes.SHA256()) for c in x509.load_pem_x509_certificates(published.encode())
    )


def test_simpleenroll_with_openssl_and_curl(
    curl: Curl, installation: Installation, tmp_path: Path
) -> None:
    b64, key = csr_b64(tmp_path, "/CN=EST Enrolled Signer/O=Example Corp/C=US")
    status, headers, body = curl(f"{EST}/simpleenroll", data=b64, user=admin_user(installation))
    assert status == 200, body
    assert headers["content-type"] == "application/pkcs7-mime; smime-type=certs-only"
    assert headers["content-transfer-encoding"] == "base64"
    leaf_pem = decode_certs_only(body)
    certs = x509.load_pem_x509_certificates(leaf_pem.encode())
    assert len(certs) == 1, "RFC 7030 §4.2.3: only the issued certificate"
    leaf = certs[0]
    assert leaf.subject.rfc4514_string() == "C=US,O=Example Corp,CN=EST Enrolled Signer"
    assert leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == (
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING])
    )
    assert leaf.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert lifetime <= timedelta(days=365, minutes=10)
    # The certificate is for the key openssl made.
    (tmp_path / "leaf.pem").write_text(leaf_pem)
    assert openssl_ok("x509", "-in", tmp_path / "leaf.pem", "-noout", "-pubkey") == openssl_ok(
        "pkey", "-in", key, "-pubout"
    )
    # openssl verifies it against the chain from cacerts.
    _, _, ca_body = curl(f"{EST}/cacerts")
    ca_certs = x509.load_pem_x509_certificates(decode_certs_only(ca_body).encode())
    root = next(c for c in ca_certs if c.subject == c.issuer)
    issuing = next(c for c in ca_certs if c.subject != c.issuer)
    (tmp_path / "root.pem").write_bytes(root.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "issuing.pem").write_bytes(issuing.public_bytes(serialization.Encoding.PEM))
    verified = openssl_ok(
        "verify",
        "-CAfile",
        tmp_path / "root.pem",
        "-untrusted",
        tmp_path / "issuing.pem",
        "-purpose",
        "any",
        tmp_path / "leaf.pem",
    )
    assert "OK" in verified
    text = openssl_ok("x509", "-in", tmp_path / "leaf.pem", "-noout", "-text")
    assert "Code Signing" in text


def test_simplereenroll_renews_an_est_certificate_only(
    curl: Curl, installation: Installation, tmp_path: Path
) -> None:
    subject = f"/CN=EST Renewal {tmp_path.name}/O=Example Corp"
    unknown, _ = csr_b64(tmp_path, subject, "first")
    status, _, body = curl(f"{EST}/simplereenroll", data=unknown, user=admin_user(installation))
    assert status == 400, body
    assert b"csr_invalid" in body
    assert b"simpleenroll" in body
    status, _, _ = curl(f"{EST}/simpleenroll", data=unknown, user=admin_user(installation))
    assert status == 200
    rekey, _ = csr_b64(tmp_path, subject, "second")
    status, _, body = curl(f"{EST}/simplereenroll", data=rekey, user=admin_user(installation))
    assert status == 200, body
    assert "EST Renewal" in decode_certs_only(body)


def test_curl_refusals(curl: Curl, installation: Installation, tmp_path: Path) -> None:
    b64, _ = csr_b64(tmp_path, "/CN=Refused")
    status, headers, _ = curl(f"{EST}/simpleenroll", data=b64)
    assert status == 401
    assert headers["www-authenticate"] == 'Basic realm="Signery EST"'
    status, headers, _ = curl(
        f"{EST}/simpleenroll", data=b64, user=f"{installation.init.admin_username}:wrong"
    )
    assert status == 401
    assert headers["www-authenticate"] == 'Basic realm="Signery EST"'
    status, _, body = curl(
        f"{EST}/simpleenroll", data=b64, user=admin_user(installation), content_type="text/plain"
    )
    assert status == 415, body
    garbage = tmp_path / "garbage.b64"
    garbage.write_bytes(base64.b64encode(b"this is not a certificate request"))
    status, _, body = curl(f"{EST}/simpleenroll", data=garbage, user=admin_user(installation))
    assert status == 400
    assert b"csr_invalid" in body


def test_serve_refuses_unreadable_tls_files(installation: Installation, tmp_path: Path) -> None:
    result = subprocess.run(
        [SIGNERY, "serve", "--host", "127.0.0.1", "--port", "0", "--json"],
        env=server_env(
            installation,
            SIGNERY_TLS_CERT_FILE=str(tmp_path / "missing.pem"),
            SIGNERY_TLS_KEY_FILE=str(tmp_path / "missing.key"),
        ),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert "tls_cert_file" in result.stderr


# ------------------------------------------------------------------ in process: refusals


@pytest.fixture(scope="module")
def https(app_client: TestClient) -> TestClient:
    """The in-process server as seen over HTTPS (the scheme EST requires)."""
    return TestClient(app_client.app, base_url="https://signery.test")


def make_csr(subject: x509.Name, *, email: str | None = None) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    if email:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.RFC822Name(email)]), critical=False
        )
    der = builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)
    return base64.encodebytes(der)


def cn(value: str, *more: x509.NameAttribute) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, value), *more])


def post(client: TestClient, path: str, body: bytes, headers: dict[str, str]) -> Any:
    return client.post(
        path, content=body, headers={"Content-Type": "application/pkcs10", **headers}
    )


def test_est_needs_https(api: Api, installation: Installation) -> None:
    with refused_once(api, reason="https_required"):
        response = post(
            api.http,  # type: ignore[arg-type]
            f"{EST}/simpleenroll",
            make_csr(cn("Plain HTTP")),
            basic(installation.init.admin_username or "", installation.init.admin_password or ""),
        )
        assert response.status_code == 403
    assert api.http.get(f"{EST}/cacerts").status_code == 200, "cacerts is public"


def test_only_root_superusers_enroll_and_the_label_names_the_tsg(
    api: Api, installation: Installation, https: TestClient
) -> None:
    team = api.create_tsg()
    key_admin = Person(api, team["id"], "key_admin")
    with refused_once(api, reason="permission_denied"):
        response = post(https, f"{EST}/simpleenroll", make_csr(cn("KA")), key_admin.headers)
        assert response.status_code == 403, response.text
    # A superuser of a subtree does not certify keys with the CA every tenant trusts:
    # neither at its home TSG nor at a label inside its subtree.
    local = Person(api, team["id"], "superuser")
    with refused_once(api, reason="permission_denied"):
        home = post(
            https,
            f"{EST}/simpleenroll",
            make_csr(cn("Local")),
            basic(local.username, local.password),
        )
        assert home.status_code == 403, home.text
    child = api.create_tsg(parent=team["id"])
    with refused_once(api, reason="permission_denied"):
        labelled = post(
            https, f"{EST}/{child['id']}/simpleenroll", make_csr(cn("Child")), local.headers
        )
        assert labelled.status_code == 403, labelled.text
    # A superuser at the root enrolls, for the TSG the label names (whose subject
    # policy applies: here the root's, allowing any subject).
    issued = post(https, f"{EST}/{child['id']}/simpleenroll", make_csr(cn("Child")), api.admin)
    assert issued.status_code == 200, issued.text
    events = api.ok(
        api.http.get(
            "/api/v1/audit/events",
            params={"kind": "ca.certificate.issued", "order": "desc", "limit": 1},
            headers=api.admin,
        )
    )["events"]
    assert events[0]["tsg_id"] == child["id"]
    assert events[0]["principal"]["name"] == installation.init.admin_username
    assert events[0]["details"]["protocol"] == "est"
    # A label that is no TSG, or not a TSG id at all: not found.
    with refused_once(api, reason="tsg_not_found"):
        missing = post(https, f"{EST}/1000000000/simpleenroll", make_csr(cn("X")), api.admin)
        assert missing.status_code == 404
    assert post(https, f"{EST}/nope/simpleenroll", make_csr(cn("X")), api.admin).status_code == 404


@pytest.mark.parametrize(
    ("csr", "fragment"),
    [
        (
            lambda: make_csr(cn("Signer", x509.NameAttribute(NameOID.LOCALITY_NAME, "Berlin"))),
            "2.5.4.7",
        ),
        (lambda: make_csr(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "O")])), "CN"),
        (lambda: _tampered(make_csr(cn("Tampered"))), "proof of possession"),
        (lambda: b"%%%%", "base64"),
    ],
    ids=["locality", "no-cn", "bad-signature", "not-base64"],
)
def test_bad_requests(
    api: Api, installation: Installation, https: TestClient, csr: Any, fragment: str
) -> None:
    with refused_once(api, reason="csr_invalid"):
        response = post(
            https,
            f"{EST}/simpleenroll",
            csr(),
            basic(installation.init.admin_username or "", installation.init.admin_password or ""),
        )
        assert response.status_code == 400, response.text
        assert fragment in response.json()["detail"]


def test_the_email_comes_from_the_subject_alt_name(
    installation: Installation, https: TestClient
) -> None:
    response = post(
        https,
        f"{EST}/simpleenroll",
        make_csr(cn("Mail Signer"), email="signer@example.com"),
        basic(installation.init.admin_username or "", installation.init.admin_password or ""),
    )
    assert response.status_code == 200, response.text
    der = base64.b64decode(b"".join(response.content.split()))
    (cert,) = pkcs7.load_der_pkcs7_certificates(der)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.RFC822Name) == ["signer@example.com"]
    assert cert.not_valid_after_utc > datetime.now(UTC) + timedelta(days=300)


def _tampered(b64: bytes) -> bytes:
    der = bytearray(base64.b64decode(b"".join(b64.split())))
    der[-5] ^= 0x01  # inside the signature
    return base64.encodebytes(bytes(der))
