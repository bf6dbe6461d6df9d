"""The built-in CA with its root and issuing keys in a hardware store
(``ca_storage``): a SoftHSM2 token through PKCS#11 and AWS KMS (the corrected moto).

`signery init` generates both CA keys in that store; certificates and CRLs are
signed through the key-store interface. What it issues is checked with
`openssl verify -crl_check`, and the CA keys are looked up where they live
(pkcs11-tool on the token, ListAliases/DescribeKey on KMS)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from fastapi.testclient import TestClient
from sqlalchemy import select

from signery.server.app import create_app
from signery.server.ca.models import CaAuthorityRow
from signery.server.persistence.db import make_engine
from tests.keystores.moto import kms_settings, moto_kms
from tests.keystores.softhsm import claim_token, pkcs11_tool
from tests.support import Api, Installation, new_installation, require_tool

pytestmark = pytest.mark.interop


def _pkcs11(tmp: Path) -> Iterator[tuple[Installation, dict[str, Any]]]:
    token = claim_token()
    with new_installation("sqlite", tmp, pkcs11=token.settings(), ca_storage="pkcs11") as inst:
        yield inst, {"token": token}


def _aws_kms(tmp: Path) -> Iterator[tuple[Installation, dict[str, Any]]]:
    server = moto_kms()
    settings = kms_settings(server.url, alias_prefix="alias/signery-ca-test")
    with new_installation("sqlite", tmp, aws_kms=settings, ca_storage="aws-kms") as inst:
        yield inst, {"kms": server.client()}


@pytest.fixture(scope="module", params=["pkcs11", "aws-kms"])
def hardware_ca(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Installation, dict[str, Any], Api]]:
    make = _pkcs11 if request.param == "pkcs11" else _aws_kms
    for installation, where in make(tmp_path_factory.mktemp(f"ca-{request.param}")):
        app = create_app(installation.settings)
        with TestClient(app, base_url="http://signery.test") as client:
            init = installation.init
            yield (
                request.param,
                installation,
                where,
                Api(client, installation.admin_token, init.issuer, init.root_tsg_id),
            )


def authorities(installation: Installation) -> list[CaAuthorityRow]:
    engine = make_engine(installation.settings.resolved_database_url, pool_size=1)
    try:
        with engine.connect() as conn:
            return list(conn.execute(select(CaAuthorityRow)).all())  # type: ignore[arg-type]
    finally:
        engine.dispose()


def test_init_generates_the_ca_keys_in_the_configured_store(
    hardware_ca: tuple[str, Installation, dict[str, Any], Api],
) -> None:
    store, installation, where, _ = hardware_ca
    rows = authorities(installation)
    assert {r.role for r in rows} >= {"root", "issuing"}
    ca_rows = [r for r in rows if r.role in ("root", "issuing")]
    assert {r.storage for r in ca_rows} == {store}
    refs = {r.store_ref for r in ca_rows}
    on_store = [r for r in rows if r.storage == store]
    if store == "pkcs11":
        listed = pkcs11_tool(where["token"], "--list-objects", "--type", "privkey")
        assert listed.returncode == 0, listed.stderr
        # One private key on the token per authority, and nothing else.
        assert listed.stdout.count("Private Key Object") == len(on_store), listed.stdout
    else:
        kms = where["kms"]
        for ref in refs:
            described = kms.describe_key(KeyId=ref)
            assert described["KeyMetadata"]["KeyUsage"] == "SIGN_VERIFY"


def test_certificates_and_crl_from_a_hardware_ca_verify_with_openssl(
    hardware_ca: tuple[str, Installation, dict[str, Any], Api], tmp_path: Path
) -> None:
    openssl = require_tool("openssl")
    _, _, _, api = hardware_ca
    tsg = api.create_tsg()
    key = api.create_key(tsg["id"], "EC_P256")
    leaf, issuing, root = key["certificate_chain"]
    for name, pem in (("leaf", leaf), ("issuing", issuing), ("root", root)):
        (tmp_path / f"{name}.pem").write_text(pem)

    def verify() -> subprocess.CompletedProcess[str]:
        crl = x509.load_der_x509_crl(api.http.get("/api/v1/ca/crl").content)
        (tmp_path / "crl.pem").write_bytes(crl.public_bytes(serialization.Encoding.PEM))
        return subprocess.run(
            [openssl, "verify", "-crl_check", "-CAfile", "root.pem", "-untrusted", "issuing.pem",
             "-CRLfile", "crl.pem", "leaf.pem"],
            cwd=tmp_path, capture_output=True, text=True, timeout=30,
        )  # fmt: skip

    ok = verify()
    assert ok.returncode == 0, ok.stdout + ok.stderr
    api.ok(
        api.http.post(
            f"/api/v1/keys/{key['id']}/revoke-certificate",
            json={"reason": "keyCompromise"},
            headers=api.admin,
        )
    )
    refused = verify()
    assert refused.returncode != 0
    assert "certificate revoked" in refused.stdout + refused.stderr


def test_a_failed_init_leaves_no_ca_key_on_the_token(tmp_path: Path) -> None:
    """No half-created CA: when init's transaction fails, the keys it generated in
    the hardware store are destroyed there (not looked for in the built-in store)."""
    from signery.errors import SigneryError
    from signery.server.config import load_settings
    from signery.server.installation.bootstrap import initialize
    from signery.server.persistence import migrate

    token = claim_token()
    settings = load_settings(
        data_dir=tmp_path, pkcs11=token.settings(), ca_storage="pkcs11", access_log=False
    )
    tmp_path.mkdir(exist_ok=True)
    engine = make_engine(settings.resolved_database_url, pool_size=1)
    try:
        migrate.upgrade(engine)
        with engine.begin() as conn:  # the database refuses init's audit events
            conn.exec_driver_sql(
                "CREATE TRIGGER audit_down BEFORE INSERT ON audit_events "
                "BEGIN SELECT RAISE(ABORT, 'storage full'); END"
            )
    finally:
        engine.dispose()
    with pytest.raises(SigneryError):
        initialize(settings)
    listed = pkcs11_tool(token, "--list-objects", "--type", "privkey")
    assert listed.returncode == 0, listed.stderr
    assert "Private Key Object" not in listed.stdout, listed.stdout
