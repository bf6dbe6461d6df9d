"""Signing keys: creation in the built-in store, code-signing certificates from the
built-in CA, listing, downloads, and no half-created key when something fails."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from sqlalchemy import func, select

from signery.keystores._builtin import BuiltinKeyMaterialRow
from signery.server.keys.models import SigningKeyRow
from signery.server.persistence.db import make_engine
from tests.support import Api, Installation, inserts_fail, require_tool


@pytest.fixture(scope="module")
def tsg(api: Api) -> dict[str, Any]:
    return api.create_tsg()


def leaf_of(key: dict[str, Any]) -> x509.Certificate:
    return x509.load_pem_x509_certificate(key["certificate_chain"][0].encode())


@pytest.mark.parametrize(
    "algorithm", ["EC_P256", "EC_P384", "EC_P521", "RSA_2048", "RSA_3072", "RSA_4096"]
)
def test_every_algorithm_gets_a_code_signing_certificate(
    api: Api, tsg: dict[str, Any], algorithm: str
) -> None:
    key = api.create_key(
        tsg["id"],
        algorithm,
        subject={
            "common_name": "Example Release",
            "organization": "Example Inc",
            "organizational_unit": "Build",
            "country": "DE",
            "email": "release@example.com",
        },
        validity_days=30,
    )
    assert key["status"] == "active"
    assert key["algorithm"] == algorithm
    assert key["current_version"] == 1
    leaf = leaf_of(key)
    assert leaf.public_key().public_bytes(*_spki()) == _pem_spki(key["public_key_pem"])
    assert leaf.extensions.get_extension_for_class(
        x509.ExtendedKeyUsage
    ).value == x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING])
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical
    assert ku.value.digital_signature
    assert not ku.value.key_cert_sign
    bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical
    assert bc.value.ca is False
    assert leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.RFC822Name) == ["release@example.com"]
    subject = {a.oid: a.value for a in leaf.subject}
    assert subject[NameOID.COMMON_NAME] == "Example Release"
    assert subject[NameOID.ORGANIZATION_NAME] == "Example Inc"
    assert subject[NameOID.ORGANIZATIONAL_UNIT_NAME] == "Build"
    assert subject[NameOID.COUNTRY_NAME] == "DE"
    assert 0 < leaf.serial_number < 2**128
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert 30 * 86400 <= lifetime.total_seconds() <= 30 * 86400 + 600
    version = key["versions"][0]
    assert version["certificate"]["serial"] == format(leaf.serial_number, "x")


def test_openssl_verifies_the_chain_for_code_signing(
    api: Api, tsg: dict[str, Any], tmp_path: Path
) -> None:
    openssl = require_tool("openssl")
    key = api.create_key(tsg["id"], "EC_P256")
    chain = api.http.get(f"/api/v1/keys/{key['id']}/chain", headers=api.admin)
    assert chain.status_code == 200
    assert chain.headers["content-type"].startswith("application/x-pem-file")
    parts = [
        p + "-----END CERTIFICATE-----\n"
        for p in chain.text.split("-----END CERTIFICATE-----")
        if p.strip()
    ]
    assert len(parts) == 3
    for name, pem in zip(("leaf", "issuing", "root"), parts, strict=True):
        (tmp_path / f"{name}.pem").write_text(pem.strip() + "\n")
    # OpenSSL 3.0 has no "codesign" purpose (ECOSYSTEM-FACTS.md); the EKU is
    # checked on the parsed certificate in the test above.
    result = subprocess.run(
        [openssl, "verify", "-CAfile", "root.pem", "-untrusted", "issuing.pem", "leaf.pem"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "leaf.pem: OK" in result.stdout
    ca = api.http.get("/api/v1/ca/chain")
    assert ca.status_code == 200
    assert ca.text.strip() == "".join(parts[1:]).strip().replace("\n\n", "\n")


def test_key_without_ca_has_no_chain(api: Api, tsg: dict[str, Any]) -> None:
    key = api.create_key(tsg["id"], "EC_P256", ca="none")
    assert key["certificate_chain"] == []
    r = api.http.get(f"/api/v1/keys/{key['id']}/chain", headers=api.admin)
    assert r.status_code == 404
    assert r.json()["code"] == "certificate_not_found"
    pub = api.http.get(
        f"/api/v1/keys/{key['name']}/public-key", headers=api.admin, params={"tsg_id": tsg["id"]}
    )
    assert pub.text == key["public_key_pem"]


def test_validity_beyond_the_ca_maximum_is_refused(api: Api, tsg: dict[str, Any]) -> None:
    body = {
        "name": api.unique("k"),
        "tsg_id": tsg["id"],
        "algorithm": "EC_P256",
        "certificate_authority": "builtin",
        "validity_days": 461,
    }
    r = api.http.post("/api/v1/keys", json=body, headers=api.admin)
    assert r.status_code == 400
    assert "460" in r.json()["detail"]


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"algorithm": "DSA_1024"}, "validation_failed"),
        ({"name": "bad/name"}, "validation_failed"),
        ({"storage": "aws-kms"}, "unknown_storage"),
        ({"certificate_authority": "digicert"}, "validation_failed"),
        ({"subject": {"country": "de"}}, "invalid_request"),
        ({"extra": 1}, "validation_failed"),
    ],
)
def test_bad_key_requests_are_refused(
    api: Api, tsg: dict[str, Any], change: dict[str, Any], code: str
) -> None:
    body = {
        "name": api.unique("k"),
        "tsg_id": tsg["id"],
        "algorithm": "EC_P256",
        "certificate_authority": "builtin",
    }
    body.update(change)
    r = api.http.post("/api/v1/keys", json=body, headers=api.admin)
    assert r.status_code == 400, r.text
    assert r.json()["code"] == code


def test_names_are_unique_per_tsg(api: Api, tsg: dict[str, Any]) -> None:
    key = api.create_key(tsg["id"], "EC_P256", ca="none")
    r = api.http.post(
        "/api/v1/keys",
        json={"name": key["name"], "tsg_id": tsg["id"], "algorithm": "EC_P256"},
        headers=api.admin,
    )
    assert r.status_code == 409
    other = api.create_tsg()
    assert (
        api.create_key(other["id"], "EC_P256", ca="none", name=key["name"])["name"] == key["name"]
    )


def count(installation: Installation, model: Any) -> int:
    engine = make_engine(installation.settings.resolved_database_url, pool_size=1)
    try:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(model.__table__)).scalar_one())
    finally:
        engine.dispose()


def test_no_half_created_key_when_the_database_write_fails(
    api: Api, installation: Installation, tsg: dict[str, Any]
) -> None:
    """The key pair is generated first; when the rows cannot be written, the
    generated material is destroyed again."""
    material_before = count(installation, BuiltinKeyMaterialRow)
    keys_before = count(installation, SigningKeyRow)
    body = {
        "name": api.unique("k"),
        "tsg_id": tsg["id"],
        "algorithm": "RSA_2048",
        "certificate_authority": "builtin",
    }
    with inserts_fail(installation, "key_versions"):
        r = api.http.post("/api/v1/keys", json=body, headers=api.admin)
        assert r.status_code >= 500
        assert "storage full" not in r.text, "database messages are not passed to clients"
    assert count(installation, BuiltinKeyMaterialRow) == material_before
    assert count(installation, SigningKeyRow) == keys_before
    names = {k["name"] for k in api.ok(api.http.get("/api/v1/keys", headers=api.admin))}
    assert body["name"] not in names
    # And the same request succeeds once the database is healthy again.
    assert api.http.post("/api/v1/keys", json=body, headers=api.admin).status_code == 201


def test_key_creation_is_audited(api: Api, tsg: dict[str, Any]) -> None:
    seq = api.last_seq()
    key = api.create_key(tsg["id"], "EC_P384")
    [event] = api.events_after(seq)
    assert event["kind"] == "key.created"
    assert event["key_id"] == key["id"]
    assert event["details"]["certificate_serial"] == key["versions"][0]["certificate"]["serial"]
    assert event["principal"]["type"] == "user"


def test_listing_filters_by_tsg(api: Api) -> None:
    a, b = api.create_tsg(), api.create_tsg()
    ka = api.create_key(a["id"], "EC_P256", ca="none")
    api.create_key(b["id"], "EC_P256", ca="none")
    listed = api.ok(api.http.get("/api/v1/keys", params={"tsg_id": a["id"]}, headers=api.admin))
    assert [k["id"] for k in listed] == [ka["id"]]


def _spki() -> tuple[Any, Any]:
    from cryptography.hazmat.primitives import serialization

    return serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo


def _pem_spki(pem: str) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return serialization.load_pem_public_key(pem.encode()).public_bytes(*_spki())
