"""The aws-kms store behind a real `signery serve` process, with the corrected moto
as AWS KMS (devtools.moto_kms).

The server reads its KMS settings from SIGNERY_AWS_KMS__REGION and
SIGNERY_AWS_KMS__ENDPOINT_URL and finds its (dummy) credentials through the
standard AWS chain (AWS_* environment variables). Every signature is verified
with cryptography against the key's certificate, never by asking KMS. Runs on
SQLite and PostgreSQL.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from signery.crypto import Hashed, load_public_key_pem, verify_signature
from signery.keystores import AwsKmsSettings
from signery.protocol import DigestAlgorithm, SignatureScheme
from tests.keystores.moto import AWS_TEST_ENV, REGION, MotoKms, moto_kms
from tests.support import Api, new_installation, refused_once, running_server

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def kms_api(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Api, MotoKms]]:
    kms = moto_kms()
    data_dir = tmp_path_factory.mktemp(f"signery-awskms-{request.param}")
    settings = AwsKmsSettings(region=REGION, endpoint_url=kms.url)
    with new_installation(request.param, data_dir, aws_kms=settings) as installation:
        env = {
            "SIGNERY_AWS_KMS__REGION": REGION,
            "SIGNERY_AWS_KMS__ENDPOINT_URL": kms.url,
            **AWS_TEST_ENV,
        }
        with (
            running_server(installation, **env) as server,
            httpx.Client(base_url=server.url, timeout=30) as http,
        ):
            yield (
                Api(
                    http,
                    installation.admin_token,
                    installation.init.issuer,
                    installation.init.root_tsg_id,
                ),
                kms,
            )


def kms_key_of(kms: MotoKms, key_id: str) -> str:
    """The KMS key holding a Signery key's version 1, found by its tags."""
    client = kms.client()
    for listed in client.list_keys(Limit=1000)["Keys"]:
        tags = client.list_resource_tags(KeyId=listed["KeyId"])["Tags"]
        if {"TagKey": "signery:key-id", "TagValue": key_id} in tags:
            return str(listed["KeyId"])
    raise AssertionError(f"no KMS key is tagged with Signery key {key_id}")


def leaf_public_key(key: dict[str, Any]) -> Any:
    return x509.load_pem_x509_certificate(key["certificate_chain"][0].encode()).public_key()


@pytest.mark.parametrize(
    ("algorithm", "scheme", "digest_algorithm"),
    [
        ("EC_P256", SignatureScheme.ECDSA, DigestAlgorithm.SHA256),
        ("EC_P384", SignatureScheme.ECDSA, DigestAlgorithm.SHA384),
        ("RSA_2048", SignatureScheme.RSA_PSS, DigestAlgorithm.SHA512),
        ("RSA_3072", SignatureScheme.RSA_PKCS1V15, DigestAlgorithm.SHA256),
    ],
)
def test_a_kms_key_with_a_builtin_certificate_signs_through_the_api(
    kms_api: tuple[Api, MotoKms],
    algorithm: str,
    scheme: SignatureScheme,
    digest_algorithm: DigestAlgorithm,
) -> None:
    api, kms = kms_api
    tsg = api.create_tsg()
    key = api.create_key(tsg["id"], algorithm, storage="aws-kms")
    assert key["storage"] == "aws-kms"
    assert len(key["certificate_chain"]) >= 2, "leaf and builtin CA"

    # The certified public key is the one inside AWS KMS.
    ref = kms_key_of(kms, key["id"])
    in_kms = serialization.load_der_public_key(kms.client().get_public_key(KeyId=ref)["PublicKey"])
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    assert leaf_public_key(key).public_bytes(der, spki) == in_kms.public_bytes(der, spki)
    assert load_public_key_pem(key["public_key_pem"]).public_bytes(der, spki) == (
        in_kms.public_bytes(der, spki)
    )
    tags = {t["TagKey"]: t["TagValue"] for t in kms.client().list_resource_tags(KeyId=ref)["Tags"]}
    assert tags["signery:key-name"] == key["name"]
    assert tags["signery:tsg"] == tsg["id"]
    assert tags["signery:key-version"] == "1"

    account = api.create_account(tsg["id"])
    token = api.access_token(account)
    digest = hashlib.new(digest_algorithm.value, f"artifact {algorithm}".encode()).digest()
    answer = api.ok(api.sign(token, key["id"], digest, digest_algorithm.value, scheme.value))
    signature = base64.b64decode(answer["signature"])
    assert answer["key_version"] == 1
    assert verify_signature(
        leaf_public_key(key), Hashed(digest_algorithm, digest), scheme, signature
    )


def test_a_key_disabled_in_kms_is_refused_409_and_audited(kms_api: tuple[Api, MotoKms]) -> None:
    api, kms = kms_api
    tsg = api.create_tsg()
    key = api.create_key(tsg["id"], "EC_P256", storage="aws-kms")
    account = api.create_account(tsg["id"])
    token = api.access_token(account)
    digest = hashlib.sha256(b"before").digest()
    api.ok(api.sign(token, key["id"], digest))
    ref = kms_key_of(kms, key["id"])

    kms.client().disable_key(KeyId=ref)
    with refused_once(
        api,
        reason="keystore_key_disabled",
        kind="signing.sign.denied",
        account_id=account.id,
        key_id=key["id"],
        failures_counted=True,
    ):
        response = api.sign(token, key["id"], hashlib.sha256(b"while disabled").digest())
        assert response.status_code == 409, response.text
        body = response.json()
        assert body["code"] == "keystore_key_disabled"
        assert "signature" not in body
        assert ref not in response.text, "the KMS key id is not shown to signing clients"

    kms.client().enable_key(KeyId=ref)
    api.ok(api.sign(token, key["id"], hashlib.sha256(b"after").digest()))


def test_a_p384_kms_key_refuses_sha256(kms_api: tuple[Api, MotoKms]) -> None:
    api, _ = kms_api
    tsg = api.create_tsg()
    key = api.create_key(tsg["id"], "EC_P384", storage="aws-kms")
    account = api.create_account(tsg["id"])
    token = api.access_token(account)
    with refused_once(
        api,
        reason="digest_not_allowed",
        account_id=account.id,
        key_id=key["id"],
        failures_counted=True,
    ):
        response = api.sign(token, key["id"], hashlib.sha256(b"x").digest())
        assert response.status_code == 400, response.text
        assert response.json()["code"] == "digest_not_allowed"


def test_the_server_lists_aws_kms_as_healthy(kms_api: tuple[Api, MotoKms]) -> None:
    api, kms = kms_api
    stores = {s["name"]: s for s in api.ok(api.http.get("/api/v1/keystores", headers=api.admin))}
    assert stores["aws-kms"]["kind"] == "aws-kms"
    assert stores["aws-kms"]["healthy"], stores["aws-kms"]["detail"]
    assert kms.url in stores["aws-kms"]["detail"]
    assert api.http.get("/readyz").json()["checks"]["keystore:aws-kms"] == "ok"


def test_an_unreachable_kms_degrades_the_node_but_does_not_stop_it(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """KMS down: /readyz names it ("degraded", still 200, the built-in keys still
    sign), GET /api/v1/keystores shows it unhealthy, and creating a key there gets
    a clear 503 with nothing half-created."""
    from tests.support import free_port

    closed = f"http://127.0.0.1:{free_port()}"
    data_dir = tmp_path_factory.mktemp("signery-kms-down")
    settings = AwsKmsSettings(
        region=REGION, endpoint_url=closed, connect_timeout=0.5, max_attempts=1
    )
    with new_installation("sqlite", data_dir, aws_kms=settings) as installation:
        env = {
            "SIGNERY_AWS_KMS__REGION": REGION,
            "SIGNERY_AWS_KMS__ENDPOINT_URL": closed,
            **AWS_TEST_ENV,
        }
        env["SIGNERY_AWS_KMS__CONNECT_TIMEOUT"] = "0.5"
        env["SIGNERY_AWS_KMS__MAX_ATTEMPTS"] = "1"
        with (
            running_server(installation, **env) as server,
            httpx.Client(base_url=server.url, timeout=30) as http,
        ):
            api = Api(
                http,
                installation.admin_token,
                installation.init.issuer,
                installation.init.root_tsg_id,
            )
            ready = http.get("/readyz")
            assert ready.status_code == 200
            assert ready.json()["status"] == "degraded"
            assert ready.json()["checks"]["keystore:aws-kms"].startswith("down")
            stores = {
                s["name"]: s for s in api.ok(http.get("/api/v1/keystores", headers=api.admin))
            }
            assert stores["builtin"]["healthy"] is True
            assert stores["aws-kms"]["healthy"] is False
            tsg = api.create_tsg()
            before = len(api.ok(http.get("/api/v1/keys", headers=api.admin)))
            r = http.post(
                "/api/v1/keys",
                json={
                    "name": "in-kms",
                    "tsg_id": tsg["id"],
                    "algorithm": "EC_P256",
                    "storage": "aws-kms",
                },
                headers=api.admin,
            )
            assert r.status_code == 503
            assert r.json()["code"] == "keystore_unavailable"
            assert r.headers["retry-after"]
            assert "127.0.0.1" in r.json()["detail"], "the message names the endpoint"
            assert len(api.ok(http.get("/api/v1/keys", headers=api.admin))) == before
            builtin = api.create_key(tsg["id"], "EC_P256", ca="none")
            token = api.access_token(api.create_account(tsg["id"]))
            assert (
                api.sign(token, builtin["name"], hashlib.sha256(b"x").digest()).status_code == 200
            )
