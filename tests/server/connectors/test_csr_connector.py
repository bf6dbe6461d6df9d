"""The ``csr`` CA connector end to end, with an openssl-run CA as the external CA.

A key bound to the connector is created ``pending`` with a CSR signed through its
key store; signing is refused until the chain comes back. openssl checks the CSR,
issues the certificate, and verifies the signatures made once the key is active.
Each wrong chain (another key, no codeSigning EKU, an unknown root) and a
builtin-store key against a public connector are refused with their own code,
one audit event, and not one row changed.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from sqlalchemy import func, select

from signery.keystores._builtin import BuiltinKeyMaterialRow
from signery.server.ca.models import CertificateRow
from signery.server.keys.models import (
    CertificateRequestRow,
    KeyVersionRow,
    SigningKeyRow,
)
from signery.server.persistence.db import make_engine
from tests.server.ca.pki import (
    NO_EKU_EXT,
    TestCa,
    make_ca,
    new_csr,
    openssl,
    openssl_ok,
)
from tests.support import Api, Installation, refused_once

DATA = b"an artifact signed with a certificate from an external CA\n" * 50
SUBJECT = {"common_name": "Example Release Signing", "organization": "Example", "country": "DE"}


@pytest.fixture(scope="module")
def tsg(api: Api) -> dict[str, Any]:
    return api.create_tsg()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TestCa]:
    base = tmp_path_factory.mktemp("pki")
    root = make_ca(base / "root", "Example Code Signing Root")
    return {
        "root": root,
        "intermediate": root.intermediate("Example Code Signing CA 1"),
        # Plain `openssl req -x509`: no keyUsage on the root (a trust anchor is its
        # name and key, RFC 5280 §6.1.1).
        "bare": make_ca(base / "bare", "Bare OpenSSL Root", key_usage=False),
        "stranger": make_ca(base / "stranger", "Some Other Root"),
    }


def create_connector(api: Api, tsg_id: str, roots: str, **body: Any) -> dict[str, Any]:
    payload = {"name": api.unique("ext-ca"), "tsg_id": tsg_id, "kind": "csr", "roots_pem": roots}
    payload.update(body)
    return api.ok(api.http.post("/api/v1/ca-connectors", json=payload, headers=api.admin), 201)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def connector(api: Api, tsg: dict[str, Any], pki: dict[str, TestCa]) -> dict[str, Any]:
    return create_connector(api, tsg["id"], pki["root"].pem + pki["bare"].pem)


def connector_key(api: Api, tsg_id: str, connector: dict[str, Any], **body: Any) -> dict[str, Any]:
    body.setdefault("subject", SUBJECT)
    return api.create_key(
        tsg_id,
        body.pop("algorithm", "EC_P256"),
        ca="connector",
        ca_connector=connector["name"],
        **body,
    )


def download_csr(api: Api, key: dict[str, Any], path: Path) -> Path:
    response = api.http.get(f"/api/v1/keys/{key['id']}/csr", headers=api.admin)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/x-pem-file")
    path.write_text(response.text)
    return path


def upload(api: Api, key: dict[str, Any], chain: str, *, as_pem: bool = False) -> Any:
    if as_pem:
        return api.http.post(
            f"/api/v1/keys/{key['id']}/certificate",
            content=chain.encode(),
            headers={**api.admin, "Content-Type": "application/x-pem-file"},
        )
    return api.http.post(
        f"/api/v1/keys/{key['id']}/certificate", json={"chain_pem": chain}, headers=api.admin
    )


def snapshot(installation: Installation, key_id: str) -> dict[str, Any]:
    """Everything a certificate upload could change, read straight from the database."""
    engine = make_engine(installation.settings.resolved_database_url, pool_size=1)
    try:
        with engine.connect() as conn:
            key = conn.execute(
                select(SigningKeyRow.status, SigningKeyRow.subject_json).where(
                    SigningKeyRow.id == key_id
                )
            ).one()
            versions = conn.execute(
                select(KeyVersionRow.version, KeyVersionRow.status, KeyVersionRow.certificate_id)
                .where(KeyVersionRow.key_id == key_id)
                .order_by(KeyVersionRow.version)
            ).all()
            requests = conn.execute(
                select(
                    CertificateRequestRow.id,
                    CertificateRequestRow.status,
                    CertificateRequestRow.error,
                    CertificateRequestRow.certificate_id,
                    CertificateRequestRow.updated_at,
                )
                .join(KeyVersionRow, KeyVersionRow.id == CertificateRequestRow.key_version_id)
                .where(KeyVersionRow.key_id == key_id)
                .order_by(CertificateRequestRow.id)
            ).all()
            certificates = conn.execute(select(func.count()).select_from(CertificateRow)).scalar()
        return {
            "key": tuple(key),
            "versions": [tuple(v) for v in versions],
            "requests": [tuple(r) for r in requests],
            "certificates": certificates,
        }
    finally:
        engine.dispose()


def sign_and_verify(api: Api, tsg_id: str, key: dict[str, Any], tmp_path: Path) -> None:
    """Sign through the signing API; openssl verifies with the leaf certificate's key."""
    token = api.access_token(api.create_account(tsg_id))
    response = api.ok(api.sign(token, key["name"], hashlib.sha256(DATA).digest()))
    assert response["certificate_chain"] == key["certificate_chain"]
    leaf = tmp_path / "leaf.pem"
    leaf.write_text(response["certificate_chain"][0])
    public = tmp_path / "leaf.pub"
    public.write_text(openssl_ok("x509", "-in", leaf, "-pubkey", "-noout"))
    (tmp_path / "data.bin").write_bytes(DATA)
    (tmp_path / "data.sig").write_bytes(base64.b64decode(response["signature"]))
    verified = openssl(
        "dgst",
        "-sha256",
        "-verify",
        public,
        "-signature",
        tmp_path / "data.sig",
        tmp_path / "data.bin",
    )
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.strip() == "Verified OK"


# ------------------------------------------------------------------ the happy path


def test_csr_flow_end_to_end(
    api: Api,
    tsg: dict[str, Any],
    connector: dict[str, Any],
    pki: dict[str, TestCa],
    tmp_path: Path,
) -> None:
    key = connector_key(api, tsg["id"], connector)
    assert key["status"] == "pending"
    assert key["certificate_authority"] == "connector"
    assert key["ca_connector_id"] == connector["id"]
    assert key["certificate_chain"] == []
    assert key["versions"][0]["status"] == "pending"
    request = key["certificate_request"]
    assert request["status"] == "pending"
    assert request["purpose"] == "enroll"
    assert request["connector_id"] == connector["id"]

    # A pending key does not sign, and is not offered to signers.
    account = api.create_account(tsg["id"])
    token = api.access_token(account)
    with refused_once(
        api,
        reason="key_not_active",
        kind="signing.sign.denied",
        account_id=account.id,
        failures_counted=True,
    ):
        refused = api.sign(token, key["name"], hashlib.sha256(DATA).digest())
        assert refused.status_code == 409
        assert refused.json()["code"] == "key_not_active"
        assert "pending" in refused.json()["detail"]
    listed = api.ok(
        api.http.get("/api/v1/signing/keys", headers={"Authorization": f"Bearer {token}"})
    )
    assert key["id"] not in [k["id"] for k in listed]

    # The CSR: openssl checks its signature (made by the key store) and subject,
    # and that it carries the key's public key and asks for codeSigning.
    csr = download_csr(api, key, tmp_path / "key.csr")
    verified = openssl("req", "-verify", "-in", csr, "-noout")
    assert verified.returncode == 0, verified.stderr
    assert "verify OK" in (verified.stdout + verified.stderr)
    text = openssl_ok("req", "-in", csr, "-noout", "-text")
    assert "CN = Example Release Signing" in text
    assert "Code Signing" in text
    parsed = x509.load_pem_x509_csr(csr.read_bytes())
    spki = (serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert parsed.public_key().public_bytes(*spki).decode() == key["public_key_pem"]

    # The external CA (an intermediate under the configured root) issues it; the
    # upload carries the leaf and the intermediate, not the root.
    intermediate = pki["intermediate"]
    leaf = intermediate.issue(csr, tmp_path / "leaf.pem")
    active = api.ok(upload(api, key, leaf.read_text() + intermediate.pem, as_pem=True))
    assert active["status"] == "active"
    assert active["versions"][0]["status"] == "active"
    assert active["certificate_request"]["status"] == "issued"
    chain = [x509.load_pem_x509_certificate(c.encode()) for c in active["certificate_chain"]]
    assert [c.subject.rfc4514_string() for c in chain] == [
        "C=DE,O=Example,CN=Example Release Signing",
        "O=Signery Tests,CN=Example Code Signing CA 1",
        "O=Signery Tests,CN=Example Code Signing Root",
    ], "leaf first, then the path the verifier built, ending at the configured root"
    assert chain[0].extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == (
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING])
    )
    records = api.ok(api.http.get(f"/api/v1/keys/{key['id']}/certificates", headers=api.admin))
    assert [(r["status"], r["source"]) for r in records] == [("current", connector["id"])]

    # openssl agrees that the chain Signery built verifies for code signing.
    (tmp_path / "chain.pem").write_text("".join(active["certificate_chain"][1:]))
    (tmp_path / "leaf-out.pem").write_text(active["certificate_chain"][0])
    ok = openssl(
        "verify",
        "-CAfile",
        pki["root"].cert,
        "-untrusted",
        tmp_path / "chain.pem",
        # OpenSSL 3.0 has no codesign purpose (ECOSYSTEM-FACTS.md); EKU checked above.
        "-purpose",
        "any",
        tmp_path / "leaf-out.pem",
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    sign_and_verify(api, tsg["id"], active, tmp_path)

    events = api.ok(
        api.http.get(
            "/api/v1/audit/events",
            params={"key_id": key["id"], "kind": "key.certificate"},
            headers=api.admin,
        )
    )["events"]
    received = [e for e in events if e["kind"] == "key.certificate.received"]
    assert len(received) == 1
    assert received[0]["details"]["key_activated"] is True
    assert received[0]["details"]["ca_connector"] == connector["id"]


def test_a_json_upload_and_a_root_without_key_usage(
    api: Api,
    tsg: dict[str, Any],
    connector: dict[str, Any],
    pki: dict[str, TestCa],
    tmp_path: Path,
) -> None:
    key = connector_key(api, tsg["id"], connector, algorithm="RSA_3072")
    csr = download_csr(api, key, tmp_path / "key.csr")
    leaf = pki["bare"].issue(csr, tmp_path / "leaf.pem")
    active = api.ok(upload(api, key, leaf.read_text()))
    assert active["status"] == "active"
    assert len(active["certificate_chain"]) == 2
    sign_and_verify_rsa(api, tsg["id"], active, tmp_path)


def sign_and_verify_rsa(api: Api, tsg_id: str, key: dict[str, Any], tmp_path: Path) -> None:
    token = api.access_token(api.create_account(tsg_id))
    response = api.ok(
        api.sign(token, key["id"], hashlib.sha256(DATA).digest(), scheme="rsa-pkcs1v15")
    )
    leaf = x509.load_pem_x509_certificate(response["certificate_chain"][0].encode())
    public = tmp_path / "rsa.pub"
    public.write_bytes(
        leaf.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    (tmp_path / "data.bin").write_bytes(DATA)
    (tmp_path / "rsa.sig").write_bytes(base64.b64decode(response["signature"]))
    out = openssl_ok(
        "dgst",
        "-sha256",
        "-verify",
        public,
        "-signature",
        tmp_path / "rsa.sig",
        tmp_path / "data.bin",
    )
    assert out.strip() == "Verified OK"


# ------------------------------------------------------------------ refusals


@pytest.fixture
def pending_key(api: Api, tsg: dict[str, Any], connector: dict[str, Any]) -> dict[str, Any]:
    return connector_key(api, tsg["id"], connector)


def test_a_chain_for_another_key_is_refused(
    api: Api,
    installation: Installation,
    pending_key: dict[str, Any],
    pki: dict[str, TestCa],
    tmp_path: Path,
) -> None:
    other = pki["root"].issue(new_csr(tmp_path, "someone-else"), tmp_path / "other.pem")
    _refused(
        api,
        installation,
        pending_key,
        other.read_text() + pki["root"].pem,
        "certificate_key_mismatch",
        "certifies this key's public key",
    )


def test_a_certificate_without_code_signing_eku_is_refused(
    api: Api,
    installation: Installation,
    pending_key: dict[str, Any],
    pki: dict[str, TestCa],
    tmp_path: Path,
) -> None:
    csr = download_csr(api, pending_key, tmp_path / "key.csr")
    leaf = pki["root"].issue(csr, tmp_path / "no-eku.pem", NO_EKU_EXT)
    _refused(
        api, installation, pending_key, leaf.read_text(), "certificate_eku_missing", "codeSigning"
    )


def test_a_chain_that_does_not_reach_the_roots_is_refused(
    api: Api,
    installation: Installation,
    pending_key: dict[str, Any],
    pki: dict[str, TestCa],
    tmp_path: Path,
) -> None:
    csr = download_csr(api, pending_key, tmp_path / "key.csr")
    stranger = pki["stranger"]
    leaf = stranger.issue(csr, tmp_path / "stranger.pem")
    # Even with the stranger's root in the upload: trust comes from the connector only.
    _refused(
        api,
        installation,
        pending_key,
        leaf.read_text() + stranger.pem,
        "certificate_chain_untrusted",
        "trusted roots",
    )


def test_garbage_is_refused(
    api: Api, installation: Installation, pending_key: dict[str, Any]
) -> None:
    _refused(api, installation, pending_key, "not a certificate", "certificate_malformed", "PEM")


def _refused(
    api: Api,
    installation: Installation,
    key: dict[str, Any],
    chain: str,
    code: str,
    detail: str,
) -> None:
    before = snapshot(installation, key["id"])
    with refused_once(api, reason=code, kind="request.refused"):
        response = upload(api, key, chain)
        assert response.status_code == 400, response.text
        assert response.json()["code"] == code
        assert detail in response.json()["detail"]
    assert snapshot(installation, key["id"]) == before, "nothing changed"
    after = api.ok(api.http.get(f"/api/v1/keys/{key['id']}", headers=api.admin))
    assert after["status"] == "pending"
    assert after["certificate_request"]["status"] == "pending"


def test_a_builtin_key_against_a_public_connector_is_refused(
    api: Api, installation: Installation, tsg: dict[str, Any], pki: dict[str, TestCa]
) -> None:
    public = create_connector(api, tsg["id"], pki["root"].pem, public=True)
    assert public["public"] is True
    engine = make_engine(installation.settings.resolved_database_url, pool_size=1)

    def counts() -> tuple[int, int, int]:
        with engine.connect() as conn:
            return (
                conn.execute(select(func.count()).select_from(SigningKeyRow)).scalar_one(),
                conn.execute(select(func.count()).select_from(BuiltinKeyMaterialRow)).scalar_one(),
                conn.execute(select(func.count()).select_from(CertificateRequestRow)).scalar_one(),
            )

    try:
        before = counts()
        with refused_once(api, reason="connector_requires_hardware_key"):
            response = api.http.post(
                "/api/v1/keys",
                json={
                    "name": api.unique("soft"),
                    "tsg_id": tsg["id"],
                    "algorithm": "EC_P256",
                    "storage": "builtin",
                    "certificate_authority": "connector",
                    "ca_connector": public["name"],
                },
                headers=api.admin,
            )
            assert response.status_code == 409, response.text
            assert response.json()["code"] == "connector_requires_hardware_key"
            assert "hardware" in response.json()["detail"]
        assert counts() == before, "no key, no key material, no request"
    finally:
        engine.dispose()


def test_a_connector_with_software_keys_cannot_become_public(
    api: Api, tsg: dict[str, Any], pki: dict[str, TestCa]
) -> None:
    private = create_connector(api, tsg["id"], pki["root"].pem)
    connector_key(api, tsg["id"], private)
    with refused_once(api, reason="connector_requires_hardware_key"):
        response = api.http.patch(
            f"/api/v1/ca-connectors/{private['id']}", json={"public": True}, headers=api.admin
        )
        assert response.status_code == 409, response.text


def test_connectors_are_found_only_on_the_keys_tsg_path(
    api: Api, tsg: dict[str, Any], pki: dict[str, TestCa]
) -> None:
    child = api.create_tsg(parent=tsg["id"])
    sibling = api.create_tsg(parent=tsg["id"])
    on_child = create_connector(api, child["id"], pki["root"].pem)
    # Configured on an ancestor: usable below it.
    grandchild = api.create_tsg(parent=child["id"])
    key = connector_key(api, grandchild["id"], on_child)
    assert key["ca_connector_id"] == on_child["id"]
    # Not on the sibling's path: as if it did not exist.
    with refused_once(api, reason="ca_connector_not_found"):
        response = api.http.post(
            "/api/v1/keys",
            json={
                "name": api.unique("k"),
                "tsg_id": sibling["id"],
                "algorithm": "EC_P256",
                "certificate_authority": "connector",
                "ca_connector": on_child["id"],
            },
            headers=api.admin,
        )
        assert response.status_code == 404, response.text
    bad = api.http.post(
        "/api/v1/keys",
        json={
            "name": api.unique("k"),
            "tsg_id": tsg["id"],
            "algorithm": "EC_P256",
            "certificate_authority": "connector",
        },
        headers=api.admin,
    )
    assert bad.status_code == 400
    assert "ca_connector" in bad.json()["detail"]


def test_no_csr_without_a_pending_request(
    api: Api, tsg: dict[str, Any], connector: dict[str, Any], pki: dict[str, TestCa], tmp_path: Path
) -> None:
    builtin = api.create_key(tsg["id"])
    assert api.http.get(f"/api/v1/keys/{builtin['id']}/csr", headers=api.admin).status_code == 404
    key = connector_key(api, tsg["id"], connector)
    csr = download_csr(api, key, tmp_path / "k.csr")
    leaf = pki["root"].issue(csr, tmp_path / "leaf.pem")
    api.ok(upload(api, key, leaf.read_text()))
    gone = api.http.get(f"/api/v1/keys/{key['id']}/csr", headers=api.admin)
    assert gone.status_code == 404
    assert gone.json()["code"] == "certificate_request_not_found"
    again = upload(api, key, leaf.read_text())
    assert again.status_code == 409
    assert again.json()["code"] == "no_pending_certificate_request"


# ------------------------------------------------------------------ renew and reissue


def test_renew_and_reissue_keep_the_old_certificate_until_the_new_one_arrives(
    api: Api,
    tsg: dict[str, Any],
    connector: dict[str, Any],
    pki: dict[str, TestCa],
    tmp_path: Path,
) -> None:
    key = connector_key(api, tsg["id"], connector)
    first = pki["root"].issue(download_csr(api, key, tmp_path / "1.csr"), tmp_path / "1.pem")
    active = api.ok(upload(api, key, first.read_text()))
    old_chain = active["certificate_chain"]

    renewing = api.ok(api.http.post(f"/api/v1/keys/{key['id']}/renew", json={}, headers=api.admin))
    assert renewing["status"] == "active", "the key keeps signing while the CA works"
    assert renewing["certificate_chain"] == old_chain
    assert renewing["certificate_request"]["purpose"] == "renew"
    assert renewing["certificate_request"]["status"] == "pending"
    sign_and_verify(api, tsg["id"], renewing, tmp_path)

    # A reissue while the renewal is pending supersedes it, with a new subject.
    reissuing = api.ok(
        api.http.post(
            f"/api/v1/keys/{key['id']}/reissue",
            json={"subject": {"common_name": "Example Release Signing 2", "country": "DE"}},
            headers=api.admin,
        )
    )
    assert reissuing["certificate_request"]["purpose"] == "reissue"
    assert reissuing["certificate_request"]["id"] != renewing["certificate_request"]["id"]
    csr = download_csr(api, key, tmp_path / "2.csr")
    assert "CN = Example Release Signing 2" in openssl_ok("req", "-in", csr, "-noout", "-subject")
    assert openssl("req", "-verify", "-in", csr, "-noout").returncode == 0

    second = pki["root"].issue(csr, tmp_path / "2.pem")
    renewed = api.ok(upload(api, key, second.read_text()))
    assert renewed["certificate_chain"] != old_chain
    assert renewed["certificate_chain"][0] == second.read_text()
    records = api.ok(api.http.get(f"/api/v1/keys/{key['id']}/certificates", headers=api.admin))
    assert [r["status"] for r in records] == ["current", "superseded"]
    sign_and_verify(api, tsg["id"], renewed, tmp_path)
