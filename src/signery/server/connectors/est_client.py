"""RFC 7030 Enrollment over Secure Transport: the wire format, and the client that
an ``est`` CA connector uses.

Messages (RFC 7030 §4, with the RFC 8951 clarifications):

* ``GET  <base>/cacerts``: ``application/pkcs7-mime`` certs-only, base64;
* ``POST <base>/simpleenroll`` and ``/simplereenroll``: an ``application/pkcs10``
  body (the DER CSR, base64), answered with ``application/pkcs7-mime;
  smime-type=certs-only`` (base64), or 202 + Retry-After when the CA holds the
  request for approval (§4.2.3).

The base is ``https://host/.well-known/est`` or ``.../.well-known/est/<label>``
(§3.2.2). EST runs only over HTTPS (§3.3), and the server's certificate is
verified: against the connector's own CA bundle when it has one, else the
system's trust store. There is no switch to turn verification off.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import ssl
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7

from signery import __version__
from signery.errors import ConnectorFailed

WELL_KNOWN = "/.well-known/est"
PKCS10 = "application/pkcs10"
PKCS7_MIME = "application/pkcs7-mime"
CERTS_ONLY = "application/pkcs7-mime; smime-type=certs-only"
# RFC 2045 §6.8: base64 lines of at most 76 characters.
BASE64_LINE = 76
MAX_RESPONSE_BYTES = 1024 * 1024
USER_AGENT = f"signery-est/{__version__}"


def encode_base64(der: bytes) -> bytes:
    text = base64.b64encode(der)
    return b"\r\n".join(text[i : i + BASE64_LINE] for i in range(0, len(text), BASE64_LINE))


def decode_base64(body: bytes) -> bytes:
    """The base64 body of an EST message (line breaks and spaces allowed, nothing else)."""
    try:
        return base64.b64decode(b"".join(body.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError("the body is not base64") from e


def certs_only(certs: Sequence[x509.Certificate]) -> bytes:
    """A base64 PKCS#7 certs-only message (degenerate SignedData, RFC 5272 §4.1)."""
    return encode_base64(pkcs7.serialize_certificates(list(certs), serialization.Encoding.DER))


def read_certs_only(body: bytes) -> list[x509.Certificate]:
    return pkcs7.load_der_pkcs7_certificates(decode_base64(body))


def media_type(header: str | None) -> str:
    return (header or "").split(";", 1)[0].strip().lower()


@dataclass(frozen=True, slots=True)
class EstEndpoint:
    """Everything needed to talk to one EST server, secrets included (never logged)."""

    url: str
    username: str | None
    password: str | None
    tls_ca_pem: str | None
    client_certificate_pem: str | None
    client_key_pem: str | None
    timeout_seconds: float

    def __repr__(self) -> str:
        return f"EstEndpoint({self.url!r})"


@dataclass(frozen=True, slots=True)
class Enrollment:
    """What an enrollment returned: certificates, or a time to come back (202)."""

    certificates: tuple[x509.Certificate, ...] = ()
    retry_after: int | None = None


@contextlib.contextmanager
def _client_cert_files(cert_pem: str, key_pem: str) -> Iterator[tuple[str, str]]:
    # ssl.SSLContext.load_cert_chain reads only files: the key is written to a
    # private directory (0700, file 0600) for the instant of loading, then removed.
    with tempfile.TemporaryDirectory(prefix="signery-est-") as tmp:
        cert_path, key_path = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
        cert_path.write_text(cert_pem, "ascii")
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(key_pem)
        yield str(cert_path), str(key_path)


def ssl_context(endpoint: EstEndpoint) -> ssl.SSLContext:
    """TLS for the EST server: verified always; the connector's bundle if it has one."""
    if endpoint.tls_ca_pem:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=endpoint.tls_ca_pem)
    else:
        ctx = httpx.create_ssl_context(verify=True)
    # Spelled out although they are the defaults: the point of this module.
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = True
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if endpoint.client_certificate_pem and endpoint.client_key_pem:
        with _client_cert_files(endpoint.client_certificate_pem, endpoint.client_key_pem) as (
            cert,
            key,
        ):
            ctx.load_cert_chain(cert, key)
    return ctx


class EstClient:
    """One EST server, over HTTPS. Every failure is a ConnectorFailed whose detail
    says what happened (never a credential)."""

    def __init__(
        self, endpoint: EstEndpoint, *, transport: httpx.BaseTransport | None = None
    ) -> None:
        self._endpoint = endpoint
        self._base = endpoint.url.rstrip("/")
        try:
            verify = ssl_context(endpoint)
        except (ssl.SSLError, ValueError, OSError) as e:
            raise ConnectorFailed(f"the connector's TLS settings cannot be loaded: {e}") from None
        auth = (
            httpx.BasicAuth(endpoint.username, endpoint.password or "")
            if endpoint.username
            else None
        )
        self._http = httpx.Client(
            verify=verify,
            auth=auth,
            timeout=endpoint.timeout_seconds,
            follow_redirects=False,  # credentials go to the configured server only
            headers={"User-Agent": USER_AGENT},
            transport=transport,
        )

    def __enter__(self) -> EstClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.close()

    def cacerts(self) -> list[x509.Certificate]:
        """The CA certificates the EST server publishes (§4.1). Not trust anchors:
        they only help build the path to the connector's configured roots."""
        response = self._send("GET", "/cacerts", None)
        if response.status_code != 200:
            raise self._refused(response, "cacerts")
        return self._certificates(response, "cacerts")

    def enroll(self, csr: x509.CertificateSigningRequest, *, reenroll: bool) -> Enrollment:
        operation = "simplereenroll" if reenroll else "simpleenroll"
        body = encode_base64(csr.public_bytes(serialization.Encoding.DER))
        response = self._send("POST", f"/{operation}", body)
        if response.status_code == 202:
            # §4.2.3: accepted for manual approval; repeat the same request later.
            return Enrollment(retry_after=_retry_after(response.headers.get("retry-after")))
        if response.status_code != 200:
            raise self._refused(response, operation)
        certs = self._certificates(response, operation)
        if not certs:
            raise ConnectorFailed(f"the EST server's {operation} answer holds no certificate")
        return Enrollment(certificates=tuple(certs))

    # ------------------------------------------------------------ plumbing

    def _send(self, method: str, path: str, body: bytes | None) -> httpx.Response:
        headers = (
            {"Content-Type": PKCS10, "Content-Transfer-Encoding": "base64"}
            if body is not None
            else {}
        )
        try:
            response = self._http.request(
                method, f"{self._base}{path}", content=body, headers=headers
            )
        except httpx.TimeoutException:
            raise ConnectorFailed(
                f"the EST server {self._base} did not answer within "
                f"{self._endpoint.timeout_seconds:g} s"
            ) from None
        except httpx.TransportError as e:
            raise ConnectorFailed(
                f"cannot reach the EST server {self._base}: {type(e).__name__}: {str(e)[:300]}"
            ) from None
        if len(response.content) > MAX_RESPONSE_BYTES:
            raise ConnectorFailed("the EST server's answer is too large")
        return response

    def _refused(self, response: httpx.Response, operation: str) -> ConnectorFailed:
        text = response.text.strip().replace("\n", " ")[:300] if response.content else ""
        return ConnectorFailed(
            f"the EST server refused {operation}: HTTP {response.status_code}"
            + (f": {text}" if text else ""),
            est_status=response.status_code,
        )

    @staticmethod
    def _certificates(response: httpx.Response, operation: str) -> list[x509.Certificate]:
        if media_type(response.headers.get("content-type")) != PKCS7_MIME:
            raise ConnectorFailed(
                f"the EST server answered {operation} with "
                f"{response.headers.get('content-type')!r}, not {PKCS7_MIME}"
            )
        try:
            return read_certs_only(response.content)
        except ValueError as e:
            raise ConnectorFailed(
                f"the EST server's {operation} answer is not a base64 PKCS#7 certs-only "
                f"message: {e}"
            ) from None


def _retry_after(value: str | None) -> int:
    try:
        return max(1, int(value or ""))
    except ValueError:
        return 60  # an HTTP-date or nothing: come back in a minute
