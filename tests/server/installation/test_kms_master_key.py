"""A master key wrapped by an AWS KMS symmetric key (moto server as KMS): the file
holds only ciphertext; the server unwraps it at start, and refuses to start,
saying why, when it cannot."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from signery.errors import ConfigurationError
from signery.server.app import create_app
from signery.server.config import load_settings
from signery.server.installation.masterkey import rotate_master_key
from tests.keystores.moto import AWS_TEST_ENV, kms_settings, moto_kms
from tests.support import Api, new_installation


@pytest.fixture
def kms_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in AWS_TEST_ENV.items():
        monkeypatch.setenv(name, value)


def symmetric_key() -> str:
    return str(moto_kms().client().create_key(KeyUsage="ENCRYPT_DECRYPT")["KeyMetadata"]["KeyId"])


@pytest.mark.usefixtures("kms_env")
def test_the_master_key_file_holds_only_kms_ciphertext(tmp_path: Path) -> None:
    kms = moto_kms()
    key_id = symmetric_key()
    with new_installation(
        "sqlite", tmp_path / "data", aws_kms=kms_settings(kms.url), master_key_kms_key_id=key_id
    ) as inst:
        doc = json.loads(inst.settings.resolved_master_key_file.read_text())
        [entry] = doc["keys"]
        assert entry["kms_key_id"] == key_id
        assert "key" not in entry
        assert entry["id"] == inst.init.master_key_id
        # KMS, and only KMS, opens it: the plaintext is not the ciphertext's content.
        plain = kms.client().decrypt(
            CiphertextBlob=base64.b64decode(entry["ciphertext"]),
            EncryptionContext={"signery:purpose": "master-key"},
        )["Plaintext"]
        assert (
            base64.b64encode(plain).decode()
            not in inst.settings.resolved_master_key_file.read_text()
        )
        with TestClient(create_app(inst.settings)) as client:
            api = Api(client, inst.admin_token, inst.init.issuer, inst.init.root_tsg_id)
            tsg = api.create_tsg()
            key = api.create_key(tsg["id"], "EC_P256")
            token = api.access_token(api.create_account(tsg["id"]))
            assert api.sign(token, key["name"], hashlib.sha256(b"k").digest()).status_code == 200
        # Rotation keeps new keys wrapped by KMS too.
        report = rotate_master_key(inst.settings)
        [entry] = json.loads(inst.settings.resolved_master_key_file.read_text())["keys"]
        assert entry["id"] == report.new_key_id
        assert entry["kms_key_id"] == key_id
        with TestClient(create_app(inst.settings)) as client:
            api = Api(client, inst.admin_token, inst.init.issuer, inst.init.root_tsg_id)
            token = api.access_token(api.create_account(tsg["id"]))
            assert api.sign(token, key["name"], hashlib.sha256(b"k").digest()).status_code == 200


@pytest.mark.usefixtures("kms_env")
def test_a_server_that_cannot_unwrap_refuses_to_start_saying_why(tmp_path: Path) -> None:
    kms = moto_kms()
    key_id = symmetric_key()
    with new_installation(
        "sqlite", tmp_path / "data", aws_kms=kms_settings(kms.url), master_key_kms_key_id=key_id
    ) as inst:
        kms.client().disable_key(KeyId=key_id)
        try:
            with pytest.raises(
                ConfigurationError, match=f"cannot unwrap the master key with AWS KMS key {key_id}"
            ):
                create_app(inst.settings)
        finally:
            kms.client().enable_key(KeyId=key_id)
        # Without [aws_kms] the server cannot even try, and says so.
        plain = load_settings(data_dir=inst.settings.data_dir, access_log=False)
        with pytest.raises(ConfigurationError, match=r"wrapped by AWS KMS: configure \[aws_kms\]"):
            create_app(plain)


def test_kms_wrapping_needs_the_kms_settings(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="master_key_kms_key_id needs"):
        load_settings(data_dir=tmp_path, master_key_kms_key_id="alias/x")
