"""The ``est`` connector: RFC 7030 enrollment over HTTPS (signery.server.connectors.est_client).

A request is enrolled at once; a renewal (same subject) is a re-enrollment, a
reissue (new subject) a new enrollment (RFC 7030 §4.2.2). A CA that holds the
request for approval answers 202 + Retry-After (§4.2.3): the request stays
pending with that noted, and is sent again when an administrator asks
(``POST /api/v1/keys/{key}/enroll``). The EST password and the TLS client key
are secrets: stored encrypted, never returned.
"""

from __future__ import annotations

from typing import Any

import httpx
from cryptography.hazmat.primitives import serialization

from signery import protocol as p
from signery.errors import ConnectorFailed, InvalidRequest
from signery.server.ca.chains import parse_certificates
from signery.server.connectors.base import (
    RENEW,
    Answer,
    CertificateOrder,
    Connector,
    ConnectorRecord,
    Issued,
    Pending,
    StoredSettings,
)
from signery.server.connectors.est_client import EstClient, EstEndpoint

DEFAULT_TIMEOUT_SECONDS = 30


class EstConnector(Connector):
    kind = p.ConnectorKind.EST.value
    answers_online = True

    def __init__(self, record: ConnectorRecord, settings: StoredSettings) -> None:
        super().__init__(record, settings)
        config, secrets = settings.config, settings.secrets
        self.endpoint = EstEndpoint(
            url=str(config["url"]),
            username=config.get("username"),
            password=secrets.get("password"),
            tls_ca_pem=config.get("tls_ca_pem"),
            client_certificate_pem=config.get("client_certificate_pem"),
            client_key_pem=secrets.get("client_key_pem"),
            timeout_seconds=float(config.get("timeout_seconds", DEFAULT_TIMEOUT_SECONDS)),
        )

    def submit(self, order: CertificateOrder) -> Answer:
        with EstClient(self.endpoint) as est:
            # RFC 7030 §4.2.2: a renewal (same subject) is a re-enrollment; a
            # reissue changes the subject, so it is a new enrollment.
            answer = est.enroll(order.csr, reenroll=order.purpose == RENEW)
            if answer.retry_after is not None:
                return Pending(
                    f"accepted by the CA for approval; retry after {answer.retry_after} s"
                )
            try:
                # Intermediates the answer may leave out; never trust anchors.
                extra = est.cacerts()
            except ConnectorFailed:
                extra = []
        return Issued((*answer.certificates, *extra))

    @classmethod
    def configure(cls, given: p.EstSettings | None, kept: StoredSettings) -> StoredSettings:
        """(non-secret config, secrets) from the request. A field the request leaves
        out keeps its ``kept`` value (an update); null or "" removes it."""
        if given is None:
            raise InvalidRequest("an est connector needs its est settings (at least the url)")
        named = given.model_fields_set
        config: dict[str, Any] = {k: v for k, v in kept.config.items() if v}
        secrets = {k: v for k, v in kept.secrets.items() if v}
        config["url"] = _check_https_url(given.url)
        for name in ("username", "tls_ca_pem", "client_certificate_pem", "timeout_seconds"):
            if name in named:
                config[name] = getattr(given, name)
        for name in ("password", "client_key_pem"):
            if name in named:
                secrets[name] = getattr(given, name) or ""
        config = {k: v for k, v in config.items() if v not in (None, "")}
        secrets = {k: v for k, v in secrets.items() if v}
        config.setdefault("timeout_seconds", given.timeout_seconds)
        if secrets.get("password") and not config.get("username"):
            raise InvalidRequest("est.password needs est.username (HTTP basic auth)")
        if "tls_ca_pem" in config:
            try:
                tls_roots = parse_certificates(config["tls_ca_pem"], "est.tls_ca_pem")
            except InvalidRequest as e:
                raise InvalidRequest(e.detail) from None
            config["tls_ca_pem"] = "".join(
                c.public_bytes(serialization.Encoding.PEM).decode() for c in tls_roots
            )
        cert_pem, key_pem = config.get("client_certificate_pem"), secrets.get("client_key_pem")
        if bool(cert_pem) != bool(key_pem):
            raise InvalidRequest("est.client_certificate_pem and est.client_key_pem go together")
        if cert_pem and key_pem:
            _check_client_certificate(cert_pem, key_pem)
        return StoredSettings(config, secrets)

    @classmethod
    def describe(cls, settings: StoredSettings) -> p.EstSettingsInfo:
        config, secrets = settings.config, settings.secrets
        return p.EstSettingsInfo(
            url=config["url"],
            username=config.get("username"),
            has_password=bool(secrets.get("password")),
            tls_ca_pem=config.get("tls_ca_pem"),
            client_certificate_pem=config.get("client_certificate_pem"),
            has_client_key=bool(secrets.get("client_key_pem")),
            timeout_seconds=float(config.get("timeout_seconds", DEFAULT_TIMEOUT_SECONDS)),
        )


def _check_https_url(url: str) -> str:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError) as e:
        raise InvalidRequest(f"est.url is not a URL: {e}") from None
    # RFC 7030 §3.3: EST runs over HTTPS only.
    if parsed.scheme != "https" or not parsed.host:
        raise InvalidRequest("est.url must be an https:// URL (RFC 7030 §3.3)")
    if parsed.userinfo or parsed.query or parsed.fragment:
        raise InvalidRequest("est.url must not carry credentials, a query or a fragment")
    return str(parsed).rstrip("/")


def _check_client_certificate(cert_pem: str, key_pem: str) -> None:
    try:
        certs = parse_certificates(cert_pem, "est.client_certificate_pem")
    except InvalidRequest as e:
        raise InvalidRequest(e.detail) from None
    try:
        key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    except (ValueError, TypeError):
        raise InvalidRequest("est.client_key_pem is not an unencrypted PEM private key") from None
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*spki) != certs[0].public_key().public_bytes(*spki):
        raise InvalidRequest("est.client_key_pem does not belong to est.client_certificate_pem")
