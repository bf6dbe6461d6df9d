"""The signing plane: every algorithm, scheme and digest; what is recorded; listing."""

from __future__ import annotations

import base64
import hashlib
from datetime import datetime, timedelta
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

from signery.crypto import load_public_key_pem
from tests.support import Account, Api

DIGESTS = {
    "sha256": (hashlib.sha256, hashes.SHA256),
    "sha384": (hashlib.sha384, hashes.SHA384),
    "sha512": (hashlib.sha512, hashes.SHA512),
}
CASES = [
    ("EC_P256", "ecdsa"),
    ("EC_P384", "ecdsa"),
    ("EC_P521", "ecdsa"),
    ("RSA_2048", "rsa-pkcs1v15"),
    ("RSA_2048", "rsa-pss"),
    ("RSA_3072", "rsa-pkcs1v15"),
    ("RSA_3072", "rsa-pss"),
    ("RSA_4096", "rsa-pkcs1v15"),
    ("RSA_4096", "rsa-pss"),
]


@pytest.fixture(scope="module")
def tsg(api: Api) -> dict[str, Any]:
    return api.create_tsg()


@pytest.fixture(scope="module")
def account(api: Api, tsg: dict[str, Any]) -> Account:
    return api.create_account(tsg["id"])


@pytest.fixture(scope="module")
def token(api: Api, account: Account) -> str:
    return api.access_token(account)


@pytest.fixture(scope="module")
def keys(api: Api, tsg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {alg: api.create_key(tsg["id"], alg) for alg in sorted({a for a, _ in CASES})}


def independent_verify(
    public_pem: str, signature: bytes, digest: bytes, digest_name: str, scheme: str
) -> None:
    """Verify with cryptography directly (not through signery.crypto)."""
    key = load_public_key_pem(public_pem)
    algorithm = DIGESTS[digest_name][1]()
    if isinstance(key, ec.EllipticCurvePublicKey):
        key.verify(signature, digest, ec.ECDSA(utils.Prehashed(algorithm)))
    else:
        assert isinstance(key, rsa.RSAPublicKey)
        pad: padding.AsymmetricPadding = (
            padding.PSS(padding.MGF1(algorithm), algorithm.digest_size)
            if scheme == "rsa-pss"
            else padding.PKCS1v15()
        )
        key.verify(signature, digest, pad, utils.Prehashed(algorithm))


@pytest.mark.parametrize(("algorithm", "scheme"), CASES)
@pytest.mark.parametrize("digest_name", sorted(DIGESTS))
def test_signature_verifies_for_every_algorithm_scheme_and_digest(
    api: Api,
    keys: dict[str, dict[str, Any]],
    token: str,
    algorithm: str,
    scheme: str,
    digest_name: str,
) -> None:
    key = keys[algorithm]
    digest = DIGESTS[digest_name][0](f"{algorithm}{scheme}{digest_name}".encode()).digest()
    body = api.ok(api.sign(token, key["name"], digest, digest_name, scheme))
    signature = base64.b64decode(body["signature"])
    independent_verify(key["public_key_pem"], signature, digest, digest_name, scheme)
    assert body["key_id"] == key["id"]
    assert body["key_version"] == 1
    assert body["algorithm"] == algorithm
    assert body["scheme"] == scheme
    assert body["digest_algorithm"] == digest_name
    assert body["certificate_chain"] == key["certificate_chain"]
    assert len(body["certificate_chain"]) == 3


def test_ecdsa_signatures_are_der_encoded(
    api: Api, keys: dict[str, dict[str, Any]], token: str
) -> None:
    digest = hashlib.sha256(b"der").digest()
    body = api.ok(api.sign(token, keys["EC_P256"]["name"], digest))
    r, s = utils.decode_dss_signature(base64.b64decode(body["signature"]))
    assert r > 0
    assert s > 0


def test_rsa_pss_uses_a_salt_as_long_as_the_digest(
    api: Api, keys: dict[str, dict[str, Any]], token: str
) -> None:
    """Same parameters as AWS KMS, so a key can move stores without verifiers noticing."""
    digest = hashlib.sha256(b"pss").digest()
    body = api.ok(api.sign(token, keys["RSA_2048"]["name"], digest, scheme="rsa-pss"))
    key = load_public_key_pem(keys["RSA_2048"]["public_key_pem"])
    assert isinstance(key, rsa.RSAPublicKey)
    key.verify(
        base64.b64decode(body["signature"]),
        digest,
        padding.PSS(padding.MGF1(hashes.SHA256()), 32),
        utils.Prehashed(hashes.SHA256()),
    )


def test_success_is_audited_and_counted(
    api: Api, keys: dict[str, dict[str, Any]], account: Account, token: str
) -> None:
    key = keys["EC_P256"]
    seq = api.last_seq()
    before = api.usage()
    digest = hashlib.sha256(b"counted").digest()
    response = api.http.post(
        f"/api/v1/signing/keys/{key['name']}/sign",
        json={
            "digest": base64.b64encode(digest).decode(),
            "digest_algorithm": "sha256",
            "scheme": "ecdsa",
            "client": {"machine": "build-17", "tool": "pytest"},
        },
        headers={
            "Authorization": f"Bearer {token}",
            "User-Agent": "ua-test",
            "X-Request-ID": "req-abc.123",
        },
    )
    body = api.ok(response)
    assert response.headers["x-request-id"] == "req-abc.123"
    [event] = api.events_after(seq)
    assert event["kind"] == "signing.sign.succeeded"
    assert event["outcome"] == "succeeded"
    assert event["digest"] == digest.hex()
    assert event["key_id"] == key["id"]
    assert event["key_version"] == body["key_version"] == 1
    assert event["algorithm"] == "EC_P256"
    assert event["principal"] == {"type": "account", "id": account.id, "name": account.name}
    assert event["tsg_id"] == key["tsg_id"]
    assert event["client_machine"] == "build-17"
    assert event["client_tool"] == "pytest"
    assert event["user_agent"] == "ua-test"
    assert event["request_id"] == "req-abc.123"
    assert event["details"] == {"scheme": "ecdsa", "digest_algorithm": "sha256"}
    assert event["node_id"]
    after = api.usage()
    assert api.counter(after, "key", key["id"])[0] == api.counter(before, "key", key["id"])[0] + 1
    assert (
        api.counter(after, "account", account.id)[0]
        == api.counter(before, "account", account.id)[0] + 1
    )
    assert after[("key", key["id"])]["last_used_at"] is not None


def test_key_can_be_addressed_by_id(api: Api, keys: dict[str, dict[str, Any]], token: str) -> None:
    key = keys["EC_P384"]
    body = api.ok(api.sign(token, key["id"], hashlib.sha384(b"id").digest(), "sha384"))
    assert body["key_name"] == key["name"]


def test_listing_shows_the_subtree_only(
    api: Api, tsg: dict[str, Any], account: Account, token: str
) -> None:
    child = api.create_tsg(parent=tsg["id"])
    sibling = api.create_tsg()
    in_child = api.create_key(child["id"], "EC_P256", ca="none")
    in_sibling = api.create_key(sibling["id"], "EC_P256")
    listed = api.ok(
        api.http.get("/api/v1/signing/keys", headers={"Authorization": f"Bearer {token}"})
    )
    names = {k["name"] for k in listed}
    assert in_child["name"] in names
    assert in_sibling["name"] not in names
    entry = next(k for k in listed if k["name"] == in_child["name"])
    assert entry["certificate_chain"] == []
    assert entry["schemes"] == ["ecdsa"]
    assert entry["public_key_pem"] == in_child["public_key_pem"]
    # An account in the child cannot see its parent's keys.
    child_account = api.create_account(child["id"])
    child_token = api.access_token(child_account)
    child_names = {
        k["name"]
        for k in api.ok(
            api.http.get("/api/v1/signing/keys", headers={"Authorization": f"Bearer {child_token}"})
        )
    }
    assert child_names == {in_child["name"]}


def test_same_name_in_two_visible_tsgs_is_ambiguous(
    api: Api, tsg: dict[str, Any], token: str
) -> None:
    a = api.create_tsg(parent=tsg["id"])
    b = api.create_tsg(parent=tsg["id"])
    name = api.unique("twin")
    first = api.create_key(a["id"], "EC_P256", name=name)
    api.create_key(b["id"], "EC_P256", name=name)
    response = api.sign(token, name, hashlib.sha256(b"x").digest())
    assert response.status_code == 409
    assert response.json()["code"] == "key_name_ambiguous"
    assert api.sign(token, first["id"], hashlib.sha256(b"x").digest()).status_code == 200


def test_certificate_chain_is_leaf_first_root_last(keys: dict[str, dict[str, Any]]) -> None:
    leaf, issuing, root = (
        x509.load_pem_x509_certificate(p.encode()) for p in keys["RSA_3072"]["certificate_chain"]
    )
    leaf.verify_directly_issued_by(issuing)
    issuing.verify_directly_issued_by(root)
    root.verify_directly_issued_by(root)


def test_listing_names_when_the_current_version_was_made(
    api: Api, tsg: dict[str, Any], token: str
) -> None:
    """The OpenPGP fingerprint holds the key's creation time, so the signing plane
    lists the current version's, and it must not move between listings."""
    key = api.create_key(tsg["id"], "RSA_2048", ca="none")
    headers = {"Authorization": f"Bearer {token}"}

    def listed() -> datetime:
        entries = api.ok(api.http.get("/api/v1/signing/keys", headers=headers))
        entry = next(k for k in entries if k["id"] == key["id"])
        return datetime.fromisoformat(entry["version_created_at"])

    first = listed()
    assert first == datetime.fromisoformat(key["versions"][0]["created_at"])
    assert first.utcoffset() == timedelta(0)
    assert listed() == first
