"""The EST client's handling of what a server may answer, through httpx's own
transport interface (an in-memory EST server), for the cases a Signery server
never produces: 202 + Retry-After, wrong media types, redirects, bodies that
are not base64. The interoperable path is in tests/e2e/test_est_connector.py."""

from __future__ import annotations

import base64
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from signery.errors import ConnectorFailed
from signery.server.connectors.est_client import CERTS_ONLY, EstClient, EstEndpoint, certs_only

URL = "https://est.example/.well-known/est"


def endpoint(**change: object) -> EstEndpoint:
    values: dict[str, object] = {
        "url": URL,
        "username": "enroller",
        "password": "s3cret",
        "tls_ca_pem": None,
        "client_certificate_pem": None,
        "client_key_pem": None,
        "timeout_seconds": 5.0,
    }
    values.update(change)
    return EstEndpoint(**values)  # type: ignore[arg-type]


def csr() -> x509.CertificateSigningRequest:
    key = ec.generate_private_key(ec.SECP256R1())
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "EST client test")]))
        .sign(key, hashes.SHA256())
    )


def self_signed() -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "answer")])
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )


def client(handler: Callable[[httpx.Request], httpx.Response]) -> EstClient:
    return EstClient(endpoint(), transport=httpx.MockTransport(handler))


def test_an_enrollment_request_is_rfc_7030_shaped() -> None:
    seen: list[httpx.Request] = []
    cert = self_signed()

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=certs_only([cert]), headers={"Content-Type": CERTS_ONLY})

    request_csr = csr()
    with client(handler) as est:
        answer = est.enroll(request_csr, reenroll=False)
    assert answer.certificates == (cert,)
    (request,) = seen
    assert str(request.url) == f"{URL}/simpleenroll"
    assert request.headers["content-type"] == "application/pkcs10"
    assert request.headers["content-transfer-encoding"] == "base64"
    assert (
        request.headers["authorization"] == "Basic " + base64.b64encode(b"enroller:s3cret").decode()
    )
    body = request.content
    assert max(len(line) for line in body.split(b"\r\n")) <= 76
    assert base64.b64decode(b"".join(body.split())) == request_csr.public_bytes(
        serialization.Encoding.DER
    )


def test_202_means_come_back_later() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path.endswith("/simplereenroll")
        return httpx.Response(202, headers={"Retry-After": "120"})

    with client(handler) as est:
        answer = est.enroll(csr(), reenroll=True)
    assert answer.retry_after == 120
    assert answer.certificates == ()


@pytest.mark.parametrize(
    ("response", "fragment"),
    [
        (httpx.Response(401, text="who are you"), "HTTP 401: who are you"),
        (httpx.Response(302, headers={"Location": "https://evil.example/"}), "HTTP 302"),
        (
            httpx.Response(200, content=b"MIIB", headers={"Content-Type": "text/plain"}),
            "not application/pkcs7-mime",
        ),
        (
            httpx.Response(200, content=b"%%not base64%%", headers={"Content-Type": CERTS_ONLY}),
            "not a base64 PKCS#7",
        ),
    ],
    ids=["refused", "redirect-not-followed", "media-type", "not-base64"],
)
def test_bad_answers_are_connector_failures(response: httpx.Response, fragment: str) -> None:
    with client(lambda _: response) as est, pytest.raises(ConnectorFailed) as caught:
        est.enroll(csr(), reenroll=False)
    assert fragment in caught.value.detail
    assert "s3cret" not in caught.value.detail


def test_an_unreachable_server_and_no_secret_in_repr() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with client(handler) as est, pytest.raises(ConnectorFailed, match="cannot reach"):
        est.cacerts()
    assert "s3cret" not in repr(endpoint())
