"""Certificate lifecycle of keys certified by the built-in CA: CRL distribution
point and AIA, revocation onto the CRL (checked by `openssl verify -crl_check`),
renew and reissue with the same key pair, the expiring filter, and signing refused
with an expired or revoked certificate. Runs on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import AuthorityInformationAccessOID, NameOID
from sqlalchemy import func, select

from signery.server.ca.models import CertificateRow, CrlRow
from signery.server.persistence.db import make_engine
from tests.support import Api, FakeClock, Installation, inserts_fail, new_installation, require_tool

PUBLIC_URL = "https://signery.example.test"
DIGEST = hashlib.sha256(b"release artifact").digest()
DAY = 86400


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def installation(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Installation]:
    # public_url set: leaf certificates then name Signery's CRL and issuer endpoints.
    data_dir = tmp_path_factory.mktemp(f"signery-lifecycle-{request.param}")
    with new_installation(request.param, data_dir, public_url=PUBLIC_URL) as inst:
        yield inst


@pytest.fixture(scope="module")
def tsg(api: Api) -> dict[str, Any]:
    return api.create_tsg()


def leaf(chain: list[str]) -> x509.Certificate:
    return x509.load_pem_x509_certificate(chain[0].encode())


def spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def certificates(api: Api, key: dict[str, Any]) -> list[dict[str, Any]]:
    return api.ok(api.http.get(f"/api/v1/keys/{key['id']}/certificates", headers=api.admin))  # type: ignore[no-any-return]


def usable(api: Api, token: str, name: str) -> dict[str, Any]:
    """The key as a signing client sees it in its key listing."""
    keys = api.ok(
        api.http.get("/api/v1/signing/keys", headers={"Authorization": f"Bearer {token}"})
    )
    return next(k for k in keys if k["name"] == name)  # type: ignore[no-any-return]


def crl(api: Api) -> x509.CertificateRevocationList:
    response = api.http.get("/api/v1/ca/crl")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/pkix-crl"
    return x509.load_der_x509_crl(response.content)


def crl_count(installation: Installation) -> int:
    engine = make_engine(installation.settings.resolved_database_url, pool_size=1)
    try:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(CrlRow)).scalar_one())
    finally:
        engine.dispose()


def openssl_verify(
    api: Api, tmp_path: Path, leaf_pem: str, with_crl: bool = True
) -> subprocess.CompletedProcess[str]:
    """`openssl verify` with the published chain and (by default) the published CRL."""
    openssl = require_tool("openssl")
    chain = api.http.get("/api/v1/ca/chain").text
    issuing, root = [
        c + "-----END CERTIFICATE-----\n" for c in chain.split("-----END CERTIFICATE-----")[:2]
    ]
    (tmp_path / "root.pem").write_text(root.strip() + "\n")
    (tmp_path / "issuing.pem").write_text(issuing.strip() + "\n")
    (tmp_path / "leaf.pem").write_text(leaf_pem)
    args = [openssl, "verify", "-CAfile", "root.pem", "-untrusted", "issuing.pem"]
    if with_crl:
        (tmp_path / "crl.pem").write_bytes(crl(api).public_bytes(serialization.Encoding.PEM))
        args += ["-crl_check", "-CRLfile", "crl.pem"]
    return subprocess.run(
        [*args, "leaf.pem"], cwd=tmp_path, capture_output=True, text=True, timeout=30
    )


# ------------------------------------------------------------------ profile pointers


def test_leaf_names_the_crl_and_issuer_endpoints(api: Api, tsg: dict[str, Any]) -> None:
    key = api.create_key(tsg["id"], "EC_P256")
    cert = leaf(key["certificate_chain"])
    cdp = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert [n.value for dp in cdp for n in dp.full_name or []] == [f"{PUBLIC_URL}/api/v1/ca/crl"]
    aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    assert [(d.access_method, d.access_location.value) for d in aia] == [
        (AuthorityInformationAccessOID.CA_ISSUERS, f"{PUBLIC_URL}/api/v1/ca/issuing.der")
    ]
    # What the AIA points at is the certificate that issued the leaf.
    issuing = x509.load_der_x509_certificate(api.http.get("/api/v1/ca/issuing.der").content)
    assert issuing.subject == cert.issuer
    cert.verify_directly_issued_by(issuing)


def test_crl_is_signed_by_the_issuing_ca_and_current(api: Api) -> None:
    issuing = x509.load_der_x509_certificate(api.http.get("/api/v1/ca/issuing.der").content)
    current = crl(api)
    assert current.issuer == issuing.subject
    assert current.is_signature_valid(issuing.public_key())  # type: ignore[arg-type]
    assert current.next_update_utc is not None
    assert current.next_update_utc > current.last_update_utc
    aki = current.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = issuing.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert current.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number >= 1


# ------------------------------------------------------------------ revocation


def test_revocation_puts_the_certificate_on_the_crl_and_openssl_agrees(
    api: Api, installation: Installation, tsg: dict[str, Any], tmp_path: Path
) -> None:
    key = api.create_key(tsg["id"], "EC_P256")
    bystander = api.create_key(tsg["id"], "RSA_2048")
    leaf_pem = key["certificate_chain"][0]
    before = openssl_verify(api, tmp_path, leaf_pem)
    assert before.returncode == 0, before.stdout + before.stderr
    number_before = crl(api).extensions.get_extension_for_class(x509.CRLNumber).value.crl_number

    record = api.ok(
        api.http.post(
            f"/api/v1/keys/{key['id']}/revoke-certificate",
            json={"reason": "keyCompromise"},
            headers=api.admin,
        )
    )
    assert record["status"] == "revoked"
    assert record["revocation_reason"] == "keyCompromise"
    serial = leaf(key["certificate_chain"]).serial_number
    assert record["serial"] == format(serial, "x")

    # Published at once, in the same transaction as the revocation.
    after_crl = crl(api)
    assert (
        after_crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        > number_before
    )
    entry = after_crl.get_revoked_certificate_by_serial_number(serial)
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason is (
        x509.ReasonFlags.key_compromise
    )
    after = openssl_verify(api, tmp_path, leaf_pem)
    assert after.returncode != 0
    assert "certificate revoked" in (after.stdout + after.stderr)
    # The revocation touches nobody else.
    other = openssl_verify(api, tmp_path, bystander["certificate_chain"][0])
    assert other.returncode == 0, other.stdout + other.stderr
    assert (
        after_crl.get_revoked_certificate_by_serial_number(
            leaf(bystander["certificate_chain"]).serial_number
        )
        is None
    )
    # Without -crl_check the chain itself is still fine: the CRL is what says no.
    assert openssl_verify(api, tmp_path, leaf_pem, with_crl=False).returncode == 0

    events = api.events_after(0)
    revoked = [e for e in events if e["kind"] == "key.certificate.revoked"]
    assert revoked[-1]["key_id"] == key["id"]
    assert revoked[-1]["details"]["reason"] == "keyCompromise"


def test_signing_with_a_revoked_certificate_is_refused_until_renewed(
    api: Api, tsg: dict[str, Any]
) -> None:
    key = api.create_key(tsg["id"], "EC_P256")
    account = api.create_account(tsg["id"])
    token = api.access_token(account)
    assert api.sign(token, key["name"], DIGEST).status_code == 200
    api.ok(
        api.http.post(f"/api/v1/keys/{key['id']}/revoke-certificate", json={}, headers=api.admin)
    )
    seq = api.last_seq()
    refused = api.sign(token, key["name"], DIGEST)
    assert refused.status_code == 409, refused.text
    assert refused.json()["code"] == "certificate_revoked"
    assert "signature" not in refused.json()
    events = api.events_after(seq)
    assert [(e["kind"], e["reason"]) for e in events] == [
        ("signing.sign.denied", "certificate_revoked")
    ]

    renewed = api.ok(api.http.post(f"/api/v1/keys/{key['id']}/renew", json={}, headers=api.admin))
    assert api.sign(token, key["name"], DIGEST).status_code == 200
    statuses = [c["status"] for c in certificates(api, renewed)]
    assert statuses == ["current", "revoked"]


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"reason": "because"}, 400, "invalid_request"),
        ({"reason": "removeFromCRL"}, 400, "invalid_request"),
        ({"serial": "abcdef"}, 404, "certificate_not_found"),
        ({"reason": "superseded", "extra": 1}, 400, "validation_failed"),
    ],
)
def test_bad_revocations_change_nothing(
    api: Api,
    installation: Installation,
    tsg: dict[str, Any],
    body: dict[str, Any],
    status: int,
    code: str,
) -> None:
    key = api.create_key(tsg["id"], "EC_P256")
    crls = crl_count(installation)
    response = api.http.post(
        f"/api/v1/keys/{key['id']}/revoke-certificate", json=body, headers=api.admin
    )
    assert response.status_code == status, response.text
    assert response.json()["code"] == code
    assert [c["status"] for c in certificates(api, key)] == ["current"]
    assert crl_count(installation) == crls


def test_revoking_twice_is_a_conflict(api: Api, tsg: dict[str, Any]) -> None:
    key = api.create_key(tsg["id"], "EC_P256")
    url = f"/api/v1/keys/{key['id']}/revoke-certificate"
    api.ok(api.http.post(url, json={"reason": "superseded"}, headers=api.admin))
    again = api.http.post(url, json={"reason": "keyCompromise"}, headers=api.admin)
    assert again.status_code == 409
    assert again.json()["code"] == "conflict"
    assert certificates(api, key)[0]["revocation_reason"] == "superseded"


def test_a_failed_audit_write_revokes_nothing(
    api: Api, installation: Installation, tsg: dict[str, Any]
) -> None:
    key = api.create_key(tsg["id"], "EC_P256")
    crls = crl_count(installation)
    with inserts_fail(installation, "audit_events"):
        response = api.http.post(
            f"/api/v1/keys/{key['id']}/revoke-certificate", json={}, headers=api.admin
        )
    assert response.status_code == 503, response.text
    assert [c["status"] for c in certificates(api, key)] == ["current"]
    assert crl_count(installation) == crls
    assert (
        crl(api).get_revoked_certificate_by_serial_number(
            leaf(key["certificate_chain"]).serial_number
        )
        is None
    )


def test_crl_is_published_anew_before_next_update(
    api: Api, installation: Installation, clock: FakeClock
) -> None:
    first = crl(api)
    assert first.next_update_utc is not None
    assert crl(api).public_bytes(serialization.Encoding.DER) == first.public_bytes(
        serialization.Encoding.DER
    )  # served from the database while fresh
    hours = installation.settings.crl_validity_hours
    clock.advance(hours * 3600 - 6 * 3600)  # inside the refresh margin
    second = crl(api)
    number = second.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert number == first.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number + 1
    assert second.next_update_utc is not None
    assert second.next_update_utc > first.next_update_utc
    # The revoked entries carry over.
    assert {r.serial_number for r in second} == {r.serial_number for r in first}


# ------------------------------------------------------------------ renew and reissue


def test_renew_certifies_the_same_key_pair_again(api: Api, tsg: dict[str, Any]) -> None:
    key = api.create_key(
        tsg["id"],
        "EC_P384",
        subject={"common_name": "Example Release", "organization": "Example Inc"},
        validity_days=30,
    )
    account = api.create_account(tsg["id"])
    token = api.access_token(account)
    seen_before = usable(api, token, key["name"])
    old = leaf(key["certificate_chain"])
    seq = api.last_seq()

    renewed = api.ok(
        api.http.post(
            f"/api/v1/keys/{key['id']}/renew", json={"validity_days": 90}, headers=api.admin
        )
    )
    new = leaf(renewed["certificate_chain"])
    assert renewed["current_version"] == key["current_version"]
    assert renewed["public_key_pem"] == key["public_key_pem"]
    assert spki(new) == spki(old)
    assert new.serial_number != old.serial_number
    assert new.subject == old.subject
    assert new.not_valid_after_utc - new.not_valid_before_utc > old.not_valid_after_utc - (
        old.not_valid_before_utc
    )

    # Clients see the new chain at their next listing, with nothing to change.
    seen_after = usable(api, token, key["name"])
    assert seen_after["certificate_chain"] != seen_before["certificate_chain"]
    assert leaf(seen_after["certificate_chain"]).serial_number == new.serial_number
    signed = api.ok(api.sign(token, key["name"], hashlib.sha384(b"x").digest(), "sha384"))
    assert signed["key_version"] == key["current_version"]

    records = certificates(api, key)
    assert [(r["status"], r["serial"]) for r in records] == [
        ("current", format(new.serial_number, "x")),
        ("superseded", format(old.serial_number, "x")),
    ]
    assert leaf(records[1]["chain"]).serial_number == old.serial_number
    events = [e for e in api.events_after(seq) if e["kind"] == "key.certificate.renewed"]
    assert len(events) == 1
    assert events[0]["details"]["certificate_serial"] == format(new.serial_number, "x")


def test_reissue_changes_the_subject_not_the_key_pair(api: Api, tsg: dict[str, Any]) -> None:
    key = api.create_key(tsg["id"], "RSA_3072", subject={"common_name": "Old Name"})
    reissued = api.ok(
        api.http.post(
            f"/api/v1/keys/{key['id']}/reissue",
            json={
                "subject": {
                    "common_name": "New Name",
                    "organization": "Example GmbH",
                    "country": "DE",
                    "email": "release@example.com",
                }
            },
            headers=api.admin,
        )
    )
    new = leaf(reissued["certificate_chain"])
    assert new.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "New Name"
    assert new.subject.get_attributes_for_oid(NameOID.COUNTRY_NAME)[0].value == "DE"
    san = new.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.RFC822Name) == ["release@example.com"]
    assert spki(new) == spki(leaf(key["certificate_chain"]))
    # A later renewal keeps the reissued subject.
    renewed = api.ok(api.http.post(f"/api/v1/keys/{key['id']}/renew", json={}, headers=api.admin))
    assert leaf(renewed["certificate_chain"]).subject == new.subject
    assert [c["status"] for c in certificates(api, key)] == ["current", "superseded", "superseded"]


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        ("renew", {"validity_days": 461}, 400, "invalid_request"),
        ("renew", {"validity_days": 0}, 400, "validation_failed"),
        ("reissue", {"subject": {"country": "de"}}, 400, "invalid_request"),
        ("reissue", {"subject": {"common_name": "x" * 65}}, 400, "validation_failed"),
        ("reissue", {}, 400, "validation_failed"),
    ],
)
def test_bad_renewals_change_nothing(
    api: Api, tsg: dict[str, Any], path: str, body: dict[str, Any], status: int, code: str
) -> None:
    key = api.create_key(tsg["id"], "EC_P256")
    response = api.http.post(f"/api/v1/keys/{key['id']}/{path}", json=body, headers=api.admin)
    assert response.status_code == status, response.text
    assert response.json()["code"] == code
    assert api.ok(api.http.get(f"/api/v1/keys/{key['id']}", headers=api.admin)) == key
    assert len(certificates(api, key)) == 1


def test_a_key_without_a_ca_has_nothing_to_renew(api: Api, tsg: dict[str, Any]) -> None:
    key = api.create_key(tsg["id"], "EC_P256", ca="none")
    response = api.http.post(f"/api/v1/keys/{key['id']}/renew", json={}, headers=api.admin)
    assert response.status_code == 400
    assert "no certificate authority" in response.json()["detail"]
    assert certificates(api, key) == []


def test_a_failed_audit_write_renews_nothing(
    api: Api, installation: Installation, tsg: dict[str, Any]
) -> None:
    key = api.create_key(tsg["id"], "EC_P256")
    with inserts_fail(installation, "audit_events"):
        response = api.http.post(f"/api/v1/keys/{key['id']}/renew", json={}, headers=api.admin)
    assert response.status_code == 503, response.text
    assert api.ok(api.http.get(f"/api/v1/keys/{key['id']}", headers=api.admin)) == key
    engine = make_engine(installation.settings.resolved_database_url, pool_size=1)
    try:
        with engine.connect() as conn:
            serials = conn.execute(select(CertificateRow.serial)).scalars().all()
    finally:
        engine.dispose()
    assert format(leaf(key["certificate_chain"]).serial_number, "x") in serials
    assert len(certificates(api, key)) == 1


# ------------------------------------------------------------------ expiry


def test_expiring_within_lists_only_keys_whose_certificate_ends_soon(
    api: Api, tsg: dict[str, Any]
) -> None:
    own = api.create_tsg(parent=tsg["id"])
    soon = api.create_key(own["id"], "EC_P256", validity_days=10)
    later = api.create_key(own["id"], "EC_P256", validity_days=200)
    api.create_key(own["id"], "EC_P256", ca="none")

    def names(days: int) -> set[str]:
        keys = api.ok(
            api.http.get(
                "/api/v1/keys",
                params={"tsg_id": own["id"], "expiring_within_days": days},
                headers=api.admin,
            )
        )
        return {k["name"] for k in keys}

    assert names(30) == {soon["name"]}
    assert names(365) == {soon["name"], later["name"]}
    assert names(1) == set()
    bad = api.http.get("/api/v1/keys", params={"expiring_within_days": -1}, headers=api.admin)
    assert bad.status_code == 400
    # Renewal takes a key off the list.
    api.ok(
        api.http.post(
            f"/api/v1/keys/{soon['id']}/renew", json={"validity_days": 100}, headers=api.admin
        )
    )
    assert names(30) == set()


def test_signing_with_an_expired_certificate_is_refused(
    api: Api, tsg: dict[str, Any], clock: FakeClock
) -> None:
    key = api.create_key(tsg["id"], "EC_P256", validity_days=2)
    bare = api.create_key(tsg["id"], "EC_P256", ca="none")
    account = api.create_account(tsg["id"])
    clock.advance(3 * DAY)
    token = api.access_token(account, now=time.time() + 3 * DAY)

    seq = api.last_seq()
    refused = api.sign(token, key["name"], DIGEST)
    assert refused.status_code == 409, refused.text
    assert refused.json()["code"] == "certificate_expired"
    assert [(e["kind"], e["reason"]) for e in api.events_after(seq)] == [
        ("signing.sign.denied", "certificate_expired")
    ]
    # A key with no certificate has nothing to expire.
    signed = api.ok(api.sign(token, bare["name"], DIGEST))
    assert signed["signature"]
    assert [c["status"] for c in certificates(api, key)] == ["expired"]
    # Renewing gives it a valid certificate again.
    api.ok(api.http.post(f"/api/v1/keys/{key['id']}/renew", json={}, headers=api.admin))
    assert api.sign(token, key["name"], DIGEST).status_code == 200
