"""Revocation at the built-in CA by serial (POST /api/v1/ca/certificates/{serial}/revoke).

Certificates enrolled over EST belong to no signing key; here they are revoked by
serial and `openssl verify -crl_check` with the published CRL refuses them. The
same door revokes a key's certificate with the key's own effect (signing refused).
Refusals change nothing: not the certificate, not the CRL. Runs on SQLite and
PostgreSQL.
"""

from __future__ import annotations

import base64
import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7
from fastapi.testclient import TestClient

from signery.server.ca.revocation import parse_serial
from tests.server.connectors.test_est_server import EST, cn, make_csr, post
from tests.server.keys.test_certificate_lifecycle import crl, crl_count, openssl_verify
from tests.server.users.test_users import Person, basic
from tests.support import Api, Installation, inserts_fail, refused_once

DIGEST = hashlib.sha256(b"artifact signed before and after the revocation").digest()


@pytest.fixture(scope="module")
def https(app_client: TestClient) -> TestClient:
    """The in-process server as seen over HTTPS (the scheme EST requires)."""
    return TestClient(app_client.app, base_url="https://signery.test")


def admin_basic(installation: Installation) -> dict[str, str]:
    return basic(installation.init.admin_username or "", installation.init.admin_password or "")


def enroll(https: TestClient, installation: Installation, name: str) -> x509.Certificate:
    """A certificate issued over EST to the bootstrap superuser."""
    response = post(https, f"{EST}/simpleenroll", make_csr(cn(name)), admin_basic(installation))
    assert response.status_code == 200, response.text
    (cert,) = pkcs7.load_der_pkcs7_certificates(
        base64.b64decode(b"".join(response.content.split()))
    )
    return cert


def hex_serial(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def revoke(
    api: Api, serial: str, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None
) -> httpx.Response:
    return api.http.post(
        f"/api/v1/ca/certificates/{serial}/revoke",
        json=body,
        headers=api.admin if headers is None else headers,
    )


def crl_number(current: x509.CertificateRevocationList) -> int:
    return current.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def listed(api: Api, cert: x509.Certificate) -> bool:
    return crl(api).get_revoked_certificate_by_serial_number(cert.serial_number) is not None


# ------------------------------------------------------------------ EST certificates


def test_an_est_certificate_revoked_by_serial_is_refused_by_openssl(
    api: Api, installation: Installation, https: TestClient, tmp_path: Path
) -> None:
    cert = enroll(https, installation, f"EST Revoked {tmp_path.name}")
    bystander = enroll(https, installation, f"EST Bystander {tmp_path.name}")
    before = openssl_verify(api, tmp_path, pem(cert))
    assert before.returncode == 0, before.stdout + before.stderr
    number_before = crl_number(crl(api))
    seq = api.last_seq()

    record = api.ok(revoke(api, hex_serial(cert), {"reason": "keyCompromise"}))
    assert record["serial"] == hex_serial(cert)
    assert record["subject"] == cert.subject.rfc4514_string()
    assert record["status"] == "revoked"
    assert record["revocation_reason"] == "keyCompromise"
    assert record["key_id"] is None
    assert record["key_version"] is None

    # The CRL served right after the answer lists it, with its reason.
    after_crl = crl(api)
    assert crl_number(after_crl) == number_before + 1
    entry = after_crl.get_revoked_certificate_by_serial_number(cert.serial_number)
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason is (
        x509.ReasonFlags.key_compromise
    )
    after = openssl_verify(api, tmp_path, pem(cert))
    assert after.returncode != 0
    assert "certificate revoked" in after.stdout + after.stderr
    # Nobody else is touched, and the chain alone still verifies: the CRL says no.
    other = openssl_verify(api, tmp_path, pem(bystander))
    assert other.returncode == 0, other.stdout + other.stderr
    assert openssl_verify(api, tmp_path, pem(cert), with_crl=False).returncode == 0

    (event,) = api.events_after(seq)
    assert event["kind"] == "ca.certificate.revoked"
    assert event["outcome"] == "succeeded"
    assert event["tsg_id"] == installation.init.root_tsg_id
    assert event["key_id"] is None
    assert event["principal"]["name"] == installation.init.admin_username
    assert event["details"]["certificate_serial"] == hex_serial(cert)
    assert event["details"]["reason"] == "keyCompromise"
    assert event["details"]["crl_number"] == crl_number(after_crl)

    # RFC 7030 §4.2.2 re-enrollment renews a valid certificate: not a revoked one.
    renewal = post(
        https, f"{EST}/simplereenroll", make_csr(cert.subject), admin_basic(installation)
    )
    assert renewal.status_code == 400, renewal.text
    assert renewal.json()["code"] == "csr_invalid"


def test_the_reason_defaults_to_unspecified(
    api: Api, installation: Installation, https: TestClient
) -> None:
    cert = enroll(https, installation, "EST Default Reason")
    response = api.http.post(
        f"/api/v1/ca/certificates/{hex_serial(cert)}/revoke", headers=api.admin
    )
    record = api.ok(response)
    assert record["revocation_reason"] == "unspecified"
    entry = crl(api).get_revoked_certificate_by_serial_number(cert.serial_number)
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason is (
        x509.ReasonFlags.unspecified
    )


# ------------------------------------------------------------------ key certificates


def test_a_key_certificate_revoked_at_the_ca_stops_signing(api: Api) -> None:
    tsg = api.create_tsg()
    key = api.create_key(tsg["id"], "EC_P256")
    account = api.create_account(tsg["id"])
    token = api.access_token(account)
    assert api.sign(token, key["name"], DIGEST).status_code == 200
    cert = x509.load_pem_x509_certificate(key["certificate_chain"][0].encode())
    # As `openssl x509 -text` prints it: upper case, colon-separated octets.
    printed = ":".join(f"{b:02X}" for b in cert.serial_number.to_bytes(16, "big"))
    seq = api.last_seq()

    record = api.ok(revoke(api, printed, {"reason": "superseded"}))
    assert record["serial"] == hex_serial(cert)
    assert (record["key_id"], record["key_version"]) == (key["id"], 1)
    assert listed(api, cert)

    # The effect of the key's own revoke-certificate: the key no longer signs.
    refused = api.sign(token, key["name"], DIGEST)
    assert refused.status_code == 409, refused.text
    assert refused.json()["code"] == "certificate_revoked"
    history = api.ok(api.http.get(f"/api/v1/keys/{key['id']}/certificates", headers=api.admin))
    assert [(c["status"], c["revocation_reason"]) for c in history] == [("revoked", "superseded")]
    again = api.http.post(
        f"/api/v1/keys/{key['id']}/revoke-certificate", json={}, headers=api.admin
    )
    assert again.status_code == 409
    assert "already revoked" in again.json()["detail"]

    revoked = [e for e in api.events_after(seq) if e["kind"] == "ca.certificate.revoked"]
    assert len(revoked) == 1
    # Recorded in the key's TSG, so the key's own auditors see it.
    assert revoked[0]["tsg_id"] == tsg["id"]
    assert revoked[0]["key_id"] == key["id"]
    assert revoked[0]["key_version"] == 1


# ------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    ("serial", "body", "status", "code"),
    [
        (lambda c: "7" * 32, {}, 404, "certificate_not_found"),
        (lambda c: "not-hex", {}, 400, "invalid_request"),
        (lambda c: "1" * 41, {}, 400, "invalid_request"),
        (lambda c: "1a:2", {}, 400, "invalid_request"),
        (hex_serial, {"reason": "because"}, 400, "invalid_request"),
        (hex_serial, {"reason": "removeFromCRL"}, 400, "invalid_request"),
        (hex_serial, {"reason": "superseded", "serial": "00"}, 400, "validation_failed"),
    ],
    ids=[
        "unknown",
        "not-hex",
        "too-long",
        "bad-octets",
        "bad-reason",
        "remove-from-crl",
        "extra-field",
    ],
)
def test_bad_revocations_change_nothing(
    api: Api,
    installation: Installation,
    https: TestClient,
    serial: Any,
    body: dict[str, Any],
    status: int,
    code: str,
) -> None:
    cert = enroll(https, installation, f"EST Refusal {code}")
    crls = crl_count(installation)
    with refused_once(api, reason=code):
        response = revoke(api, serial(cert), body)
        assert response.status_code == status, response.text
        assert response.json()["code"] == code
    assert crl_count(installation) == crls
    assert not listed(api, cert)


def test_revoking_twice_is_a_conflict(
    api: Api, installation: Installation, https: TestClient
) -> None:
    cert = enroll(https, installation, "EST Twice")
    api.ok(revoke(api, hex_serial(cert), {"reason": "superseded"}))
    crls = crl_count(installation)
    with refused_once(api, reason="conflict"):
        again = revoke(api, hex_serial(cert), {"reason": "keyCompromise"})
        assert again.status_code == 409, again.text
        assert "already revoked" in again.json()["detail"]
    assert crl_count(installation) == crls
    entry = crl(api).get_revoked_certificate_by_serial_number(cert.serial_number)
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason is (
        x509.ReasonFlags.superseded
    )


def test_only_superusers_at_the_root_tsg_revoke(
    api: Api, installation: Installation, https: TestClient
) -> None:
    cert = enroll(https, installation, "EST Guarded")
    team = api.create_tsg()
    key_admin = Person(api, installation.init.root_tsg_id, "key_admin")
    with refused_once(api, reason="permission_denied"):
        denied = revoke(api, hex_serial(cert), headers=key_admin.headers)
        assert denied.status_code == 403, denied.text
    # A superuser of a subtree does not administer the CA: to them, an existing
    # serial and a made-up one look the same.
    local = Person(api, team["id"], "superuser")
    for serial in (hex_serial(cert), "7" * 32):
        with refused_once(api, reason="certificate_not_found"):
            hidden = revoke(api, serial, headers=local.headers)
            assert hidden.status_code == 404, hidden.text
    assert not listed(api, cert)


def test_a_failed_audit_write_revokes_nothing(
    api: Api, installation: Installation, https: TestClient
) -> None:
    cert = enroll(https, installation, "EST Audit Down")
    crls = crl_count(installation)
    number = crl_number(crl(api))
    with inserts_fail(installation, "audit_events"):
        response = revoke(api, hex_serial(cert), {"reason": "keyCompromise"})
    assert response.status_code == 503, response.text
    assert response.json()["code"] == "audit_unavailable"
    assert crl_count(installation) == crls
    assert crl_number(crl(api)) == number
    assert not listed(api, cert)
    # The certificate was not marked either: the revocation goes through once the
    # audit trail can be written again.
    record = api.ok(revoke(api, hex_serial(cert), {"reason": "keyCompromise"}))
    assert record["status"] == "revoked"
    assert listed(api, cert)


# ------------------------------------------------------------------ serial syntax


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1a2b", "1a2b"),
        ("0x1A2B", "1a2b"),
        ("001A2B", "1a2b"),
        ("00:1a:2b", "1a2b"),
        (" 1a2b\n", "1a2b"),
        ("0" * 60 + "f" * 40, "f" * 40),
    ],
)
def test_serials_are_read_in_the_forms_openssl_prints(text: str, expected: str) -> None:
    assert parse_serial(text) == expected


# ------------------------------------------------------------------ concurrency


def test_concurrent_revocations_each_publish_a_crl(server_api: Api, server: Any) -> None:
    """Revocations racing on a real server (PostgreSQL: truly concurrent transactions)
    all succeed; each publishes its own CRL number and the last CRL lists them all."""
    api = server_api
    tsg = api.create_tsg()["id"]
    keys = [api.create_key(tsg) for _ in range(6)]
    before = crl_number(crl(api))
    barrier = threading.Barrier(len(keys))

    def revoke_key(key: dict[str, Any]) -> httpx.Response:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            barrier.wait()
            return http.post(
                f"/api/v1/keys/{key['id']}/revoke-certificate",
                json={"reason": "keyCompromise"},
                headers=api.admin,
            )

    with ThreadPoolExecutor(max_workers=len(keys)) as pool:
        answers = list(pool.map(revoke_key, keys))
    assert [a.status_code for a in answers] == [200] * len(keys), [a.text for a in answers]
    current = crl(api)
    assert crl_number(current) == before + len(keys)
    for key in keys:
        leaf = x509.load_pem_x509_certificate(key["certificate_chain"][0].encode())
        assert current.get_revoked_certificate_by_serial_number(leaf.serial_number) is not None
