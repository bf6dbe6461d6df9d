"""What the aws-kms store does beyond the conformance suite, and the moto wrapper
it is tested against.

KMS behaviour comes from devtools.moto_kms (moto corrected to sign
digests like AWS KMS), read back with boto3. Failures KMS cannot be made to
produce on demand (throttling, timeouts, access denied) come from FakeKms, a
loopback HTTP server that answers chosen KMS errors and counts the calls, so
that retries and "no call at all" are proven by counting, not assumed.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

from signery.crypto import Hashed, hash_bytes, verify_signature
from signery.errors import (
    ConfigurationError,
    DigestNotAllowed,
    KeyMaterialMissing,
    KeyStoreError,
    KeyStoreUnavailable,
    SigneryError,
)
from signery.keystores import KeyContext, KeyHandle, KeyStore
from signery.protocol import Algorithm, DigestAlgorithm, SignatureScheme
from tests.keystores.moto import (
    DUMMY_ACCESS_KEY_ID,
    DUMMY_SECRET,
    REGION,
    MotoKms,
    kms_settings,
    moto_kms,
)
from tests.support import REQUIRE_ALL, free_port

try:
    from signery.keystores import _awskms as awskms
except ImportError:  # boto3 missing: a skip on a developer machine, a failure in CI
    if REQUIRE_ALL:
        raise
    pytest.skip("boto3 not available", allow_module_level=True)

TSG = "1234567890"
ECDSA = SignatureScheme.ECDSA
P256_DIGEST = hash_bytes(b"artifact", DigestAlgorithm.SHA256)


@pytest.fixture(scope="module")
def kms() -> MotoKms:
    return moto_kms()


@pytest.fixture(scope="module")
def store(kms: MotoKms) -> Iterator[KeyStore]:
    s = awskms.open_store(kms_settings(kms.url))
    yield s
    s.close()


def context(label: str = "release") -> KeyContext:
    return KeyContext(str(uuid.uuid4()), 1, TSG, label=label)


def tags_of(kms: MotoKms, ref: str) -> dict[str, str]:
    answer = kms.client().list_resource_tags(KeyId=ref)
    return {t["TagKey"]: t["TagValue"] for t in answer["Tags"]}


def aliases_of(kms: MotoKms, ref: str) -> list[str]:
    return [a["AliasName"] for a in kms.client().list_aliases(KeyId=ref)["Aliases"]]


def key_state(kms: MotoKms, ref: str) -> str:
    return str(kms.client().describe_key(KeyId=ref)["KeyMetadata"]["KeyState"])


def sign_verified(store: KeyStore, handle: KeyHandle, public_key: Any) -> None:
    signature = store.sign(handle, P256_DIGEST, ECDSA)
    assert verify_signature(public_key, P256_DIGEST, ECDSA, signature)


# ------------------------------------------------------------------ a fake KMS endpoint


class FakeKms:
    """A loopback HTTP endpoint speaking just enough of the KMS JSON protocol:
    each operation gets a canned (status, body), optionally after a delay, and
    every call is counted by operation name (X-Amz-Target)."""

    def __init__(
        self,
        answers: dict[str, tuple[int, dict[str, Any]]] | None = None,
        default: tuple[int, dict[str, Any]] = (
            400,
            {"__type": "ThrottlingException", "message": "Rate exceeded"},
        ),
        delay: float = 0.0,
    ) -> None:
        self.answers = answers or {}
        self.default = default
        self.delay = delay
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                operation = self.headers.get("X-Amz-Target", "").rpartition(".")[2]
                with fake._lock:
                    fake.calls[operation] += 1
                if fake.delay:
                    time.sleep(fake.delay)
                status, body = fake.answers.get(operation, fake.default)
                data = json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/x-amz-json-1.1")
                    self.send_header("Content-Length", str(len(data)))
                    self.send_header("x-amzn-RequestId", str(uuid.uuid4()))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting (timeout tests)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeKms:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def tags_answer(ctx: KeyContext) -> tuple[int, dict[str, Any]]:
    """ListResourceTags naming ``ctx``, so a store gets as far as Sign."""
    tags = [{"TagKey": k, "TagValue": v} for k, v in awskms.key_tags(ctx).items()]
    return 200, {"Tags": tags, "Truncated": False}


def fake_handle(algorithm: Algorithm = Algorithm.EC_P256) -> KeyHandle:
    return KeyHandle("aws-kms", str(uuid.uuid4()), algorithm, context())


# ------------------------------------------------------------------ tags, alias, creation


def test_a_new_key_is_tagged_described_and_aliased(store: KeyStore, kms: MotoKms) -> None:
    ctx = context("release.key_2")
    generated = store.generate(Algorithm.EC_P256, ctx)
    ref = generated.handle.ref

    assert tags_of(kms, ref) == {
        "signery:tsg": TSG,
        "signery:key-id": ctx.key_id,
        "signery:key-name": "release.key_2",
        "signery:key-version": "1",
    }
    meta = kms.client().describe_key(KeyId=ref)["KeyMetadata"]
    assert meta["KeyUsage"] == "SIGN_VERIFY"
    assert meta["KeySpec"] == "ECC_NIST_P256"
    assert meta["KeyState"] == "Enabled"
    assert "release.key_2" in meta["Description"]
    # KMS aliases allow [a-zA-Z0-9/_-] only: the dot is replaced.
    suffix = ctx.key_id.replace("-", "")[-12:]
    assert aliases_of(kms, ref) == [f"alias/signery-test/{TSG}/release-key_2-v1-{suffix}"]
    # The public key KMS holds is the one returned.
    public = serialization.load_der_public_key(kms.client().get_public_key(KeyId=ref)["PublicKey"])
    assert public.public_numbers() == generated.public_key.public_numbers()  # type: ignore[union-attr]


def test_alias_names_follow_the_kms_rules() -> None:
    ctx = KeyContext("0b1c2d3e-aaaa-4bbb-8ccc-123456789abc", 7, TSG, label="a" * 300)
    name = awskms.alias_name("alias/signery", ctx)
    assert len(name) == 256
    assert name.endswith("-v7-123456789abc")
    assert all(c.isalnum() or c in "/_-" for c in name)
    other_key = KeyContext(str(uuid.uuid4()), 7, TSG, label="a" * 300)
    assert awskms.alias_name("alias/signery", other_key) != name
    empty = awskms.alias_name("alias/signery", KeyContext("k-1", 1, TSG))
    assert empty == f"alias/signery/{TSG}/key-v1-k1"


def test_slashes_at_the_end_of_the_alias_prefix_are_dropped(kms: MotoKms) -> None:
    s = awskms.open_store(kms_settings(kms.url, alias_prefix="alias/signery-slash//"))
    try:
        generated = s.generate(Algorithm.EC_P256, context("tidy"))
    finally:
        s.close()
    (alias,) = aliases_of(kms, generated.handle.ref)
    assert alias.startswith(f"alias/signery-slash/{TSG}/tidy-v1-")


def test_a_failed_alias_leaves_no_key_behind(store: KeyStore, kms: MotoKms) -> None:
    ctx = context("taken")
    # Someone already holds the alias this key version would get.
    squatter = kms.client().create_key(KeyUsage="SIGN_VERIFY", KeySpec="ECC_NIST_P256")
    kms.client().create_alias(
        AliasName=awskms.alias_name("alias/signery-test", ctx),
        TargetKeyId=squatter["KeyMetadata"]["KeyId"],
    )
    with pytest.raises(KeyStoreError) as caught:
        store.generate(Algorithm.EC_P256, ctx)
    assert "AlreadyExistsException" in caught.value.detail

    created = [
        k["KeyId"]
        for k in kms.client().list_keys()["Keys"]
        if tags_of(kms, k["KeyId"]).get("signery:key-id") == ctx.key_id
    ]
    assert len(created) == 1, "the key was created with its tags"
    assert key_state(kms, created[0]) == "PendingDeletion", "and then scheduled for deletion"


# ------------------------------------------------------------------ refusals by KMS


def test_a_key_disabled_in_kms_is_refused_as_keystore_key_disabled(
    store: KeyStore, kms: MotoKms
) -> None:
    generated = store.generate(Algorithm.EC_P256, context())
    sign_verified(store, generated.handle, generated.public_key)

    kms.client().disable_key(KeyId=generated.handle.ref)
    with pytest.raises(awskms.KeyStoreKeyDisabled) as caught:
        store.sign(generated.handle, P256_DIGEST, ECDSA)
    assert caught.value.code == "keystore_key_disabled"
    assert caught.value.kind.value == "conflict"

    kms.client().enable_key(KeyId=generated.handle.ref)
    sign_verified(store, generated.handle, generated.public_key)


def test_destroy_schedules_the_deletion_and_signing_is_refused(
    store: KeyStore, kms: MotoKms
) -> None:
    generated = store.generate(Algorithm.RSA_2048, context())
    ref = generated.handle.ref
    assert aliases_of(kms, ref)

    started = time.time()
    store.destroy(generated.handle)

    meta = kms.client().describe_key(KeyId=ref)["KeyMetadata"]
    assert meta["KeyState"] == "PendingDeletion"
    # deletion_window_days (7 by default) is the waiting period asked for.
    waiting = meta["DeletionDate"].timestamp() - started
    assert 7 * 86400 - 120 < waiting < 7 * 86400 + 120
    assert aliases_of(kms, ref) == []
    hashed = hash_bytes(b"doomed", DigestAlgorithm.SHA256)
    with pytest.raises(awskms.KeyStoreKeyPendingDeletion) as caught:
        store.sign(generated.handle, hashed, SignatureScheme.RSA_PKCS1V15)
    assert caught.value.code == "keystore_key_pending_deletion"

    store.destroy(generated.handle)  # a repeated destroy is harmless
    assert key_state(kms, ref) == "PendingDeletion"


def test_cancel_destroy_restores_signing_and_the_alias(store: KeyStore, kms: MotoKms) -> None:
    ctx = context("comeback")
    generated = store.generate(Algorithm.EC_P256, ctx)
    alias = aliases_of(kms, generated.handle.ref)
    store.destroy(generated.handle)

    # The handle as the signing service builds it: without the label.
    handle = KeyHandle(
        "aws-kms",
        generated.handle.ref,
        Algorithm.EC_P256,
        KeyContext(ctx.key_id, ctx.version, ctx.tsg_id),
    )
    store.cancel_destroy(handle)

    assert key_state(kms, handle.ref) == "Enabled"
    assert aliases_of(kms, handle.ref) == alias
    sign_verified(store, handle, generated.public_key)
    store.cancel_destroy(handle)  # nothing pending any more: nothing to do


def test_cancel_destroy_does_not_enable_a_key_an_operator_disabled(
    store: KeyStore, kms: MotoKms
) -> None:
    generated = store.generate(Algorithm.EC_P256, context())
    kms.client().disable_key(KeyId=generated.handle.ref)
    with pytest.raises(awskms.KeyStoreKeyDisabled):
        store.cancel_destroy(generated.handle)
    assert key_state(kms, generated.handle.ref) == "Disabled"


def test_a_key_reference_moved_to_another_key_does_not_sign(store: KeyStore, kms: MotoKms) -> None:
    generated = store.generate(Algorithm.EC_P256, context())
    for moved in (
        KeyContext(str(uuid.uuid4()), 1, TSG),  # another key's row
        KeyContext(generated.handle.context.key_id, 2, TSG),  # another version
        KeyContext(generated.handle.context.key_id, 1, "0987654321"),  # another TSG
    ):
        handle = KeyHandle("aws-kms", generated.handle.ref, Algorithm.EC_P256, moved)
        with pytest.raises(KeyMaterialMissing, match="tags name another"):
            store.sign(handle, P256_DIGEST, ECDSA)


def test_a_handle_of_the_wrong_algorithm_gets_no_public_key(store: KeyStore) -> None:
    generated = store.generate(Algorithm.EC_P256, context())
    fresh = awskms.open_store(store._settings)  # type: ignore[attr-defined]
    try:
        wrong = KeyHandle(
            "aws-kms", generated.handle.ref, Algorithm.EC_P384, generated.handle.context
        )
        with pytest.raises(KeyMaterialMissing, match="ECC_NIST_P384"):
            fresh.public_key(wrong)
        # moto's GetPublicKey has no KeySpec: the store read CustomerMasterKeySpec.
        assert fresh.public_key(generated.handle).public_numbers() == (
            generated.public_key.public_numbers()
        )
    finally:
        fresh.close()


def test_health_names_the_endpoint(store: KeyStore, kms: MotoKms) -> None:
    health = store.health()
    assert health.ok
    assert REGION in health.detail
    assert kms.url in health.detail


# ------------------------------------------------------------------ refused before any KMS call


def test_p384_with_sha256_is_refused_before_any_kms_call() -> None:
    handle = fake_handle(Algorithm.EC_P384)
    sha256 = hash_bytes(b"x", DigestAlgorithm.SHA256)
    with FakeKms() as fake:
        s = awskms.open_store(kms_settings(fake.url))
        try:
            with pytest.raises(DigestNotAllowed, match="sha384 only"):
                s.sign(handle, sha256, ECDSA)
        finally:
            s.close()
        assert sum(fake.calls.values()) == 0
    # Even with KMS unreachable the refusal is the digest's, not the network's.
    closed = awskms.open_store(kms_settings(f"http://127.0.0.1:{free_port()}", max_attempts=1))
    try:
        with pytest.raises(DigestNotAllowed):
            closed.sign(handle, sha256, ECDSA)
        with pytest.raises(DigestNotAllowed):
            closed.sign(
                fake_handle(Algorithm.EC_P521), Hashed(DigestAlgorithm.SHA384, b"\x00" * 48), ECDSA
            )
    finally:
        closed.close()


def test_rsa_keys_sign_every_digest_and_curves_only_theirs(store: KeyStore) -> None:
    assert store.digests_for(Algorithm.RSA_3072) == tuple(DigestAlgorithm)
    assert store.digests_for(Algorithm.EC_P256) == (DigestAlgorithm.SHA256,)
    assert store.digests_for(Algorithm.EC_P384) == (DigestAlgorithm.SHA384,)
    assert store.digests_for(Algorithm.EC_P521) == (DigestAlgorithm.SHA512,)
    assert not store.signs_inline(Algorithm.EC_P256)


# ------------------------------------------------------------------ unreachable, throttled, slow


def test_an_unreachable_endpoint_is_unavailable_quickly() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    s = awskms.open_store(kms_settings(url, max_attempts=2, connect_timeout=1.0))
    try:
        started = time.monotonic()
        health = s.health()
        assert not health.ok
        assert url in health.detail
        assert REGION in health.detail
        assert time.monotonic() - started < 5

        started = time.monotonic()
        with pytest.raises(KeyStoreUnavailable) as caught:
            s.generate(Algorithm.EC_P256, context())
        assert time.monotonic() - started < 10
        message = caught.value.detail
        assert url in message
        assert REGION in message
        assert DUMMY_SECRET not in message
        assert DUMMY_ACCESS_KEY_ID not in message
        assert caught.value.code == "keystore_unavailable"

        with pytest.raises(KeyStoreUnavailable):
            s.sign(fake_handle(), P256_DIGEST, ECDSA)
    finally:
        s.close()


def test_throttling_is_retried_then_answered_503() -> None:
    handle = fake_handle()
    with FakeKms({"ListResourceTags": tags_answer(handle.context)}) as fake:
        s = awskms.open_store(kms_settings(fake.url, max_attempts=3))
        try:
            with pytest.raises(KeyStoreUnavailable) as caught:
                s.sign(handle, P256_DIGEST, ECDSA)
        finally:
            s.close()
    # max_attempts counts tries: the first one and two retries, all of Sign.
    assert fake.calls == Counter({"ListResourceTags": 1, "Sign": 3})
    error = caught.value
    assert error.code == "keystore_unavailable"
    assert "ThrottlingException" in error.detail
    assert error.extra["retry_after"] == awskms.THROTTLED_RETRY_AFTER


def test_limit_exceeded_is_answered_503_too() -> None:
    handle = fake_handle()
    limit = (400, {"__type": "LimitExceededException", "message": "quota"})
    with FakeKms({"ListResourceTags": tags_answer(handle.context)}, default=limit) as fake:
        s = awskms.open_store(kms_settings(fake.url, max_attempts=2))
        try:
            with pytest.raises(KeyStoreUnavailable, match="LimitExceededException"):
                s.sign(handle, P256_DIGEST, ECDSA)
        finally:
            s.close()
    assert fake.calls["Sign"] == 2


def test_a_slow_kms_times_out_as_unavailable() -> None:
    handle = fake_handle()
    with FakeKms({"ListResourceTags": tags_answer(handle.context)}, delay=1.5) as fake:
        s = awskms.open_store(kms_settings(fake.url, max_attempts=2, read_timeout=0.3))
        try:
            started = time.monotonic()
            with pytest.raises(KeyStoreUnavailable, match="did not answer in time"):
                s.sign(handle, P256_DIGEST, ECDSA)
            assert time.monotonic() - started < 10
        finally:
            s.close()
        assert fake.calls["ListResourceTags"] == 2, "a timed-out call is retried"


@pytest.mark.parametrize(
    ("aws_code", "error_code"),
    [
        ("AccessDeniedException", "keystore_access_denied"),
        ("UnrecognizedClientException", "keystore_access_denied"),
        ("NotFoundException", "key_material_missing"),
        ("DisabledException", "keystore_key_disabled"),
        ("KMSInternalException", "keystore_unavailable"),
        ("InvalidKeyUsageException", "keystore_error"),
    ],
)
def test_kms_errors_become_ours_without_the_aws_message(aws_code: str, error_code: str) -> None:
    handle = fake_handle()
    arn = "arn:aws:iam::111122223333:user/signery-operator"
    answer = (400, {"__type": aws_code, "message": f"User: {arn} is not allowed"})
    with FakeKms({"ListResourceTags": tags_answer(handle.context)}, default=answer) as fake:
        s = awskms.open_store(kms_settings(fake.url, max_attempts=1))
        try:
            with pytest.raises(SigneryError) as caught:
                s.sign(handle, P256_DIGEST, ECDSA)
        finally:
            s.close()
    assert caught.value.code == error_code
    assert arn not in caught.value.detail
    assert "111122223333" not in caught.value.detail
    assert not isinstance(caught.value.__cause__, SigneryError), "raised from the SDK's error"


def test_missing_credentials_are_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    settings = kms_settings(
        f"http://127.0.0.1:{free_port()}", access_key_id=None, secret_access_key=None
    )
    s = awskms.open_store(settings)
    try:
        with pytest.raises(KeyStoreUnavailable, match="no usable AWS credentials"):
            s.generate(Algorithm.EC_P256, context())
        assert not s.health().ok
    finally:
        s.close()


# ------------------------------------------------------------------ configuration


@pytest.mark.parametrize(
    "overrides",
    [
        {"endpoint_url": "not a url"},
        {"endpoint_url": "ftp://kms.example"},
        {"endpoint_url": "http://:8080"},
        {"endpoint_url": "http://127.0.0.1:99999"},
        {"endpoint_url": "https://operator:hunter2@kms.example"},
        {"endpoint_url": "https://kms.example/?x=1"},
        {"region": "eu central 1"},
        {"alias_prefix": "alias/aws"},
        {"alias_prefix": "alias//aws/x"},
        {"alias_prefix": "alias//"},
        {"access_key_id": None, "secret_access_key": None, "profile": "signery-no-such-profile"},
        {"profile": "default"},
    ],
)
def test_a_configuration_wrong_offline_is_refused_at_open(
    overrides: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    with pytest.raises(ConfigurationError) as caught:
        awskms.open_store(kms_settings("https://kms.example", **overrides))
    assert "[aws_kms]" in caught.value.detail
    assert "hunter2" not in caught.value.detail
    assert DUMMY_SECRET not in caught.value.detail


def test_an_unreachable_endpoint_does_not_stop_open_store() -> None:
    started = time.monotonic()
    s = awskms.open_store(kms_settings("https://kms.invalid"))
    s.close()
    assert time.monotonic() - started < 2, "open_store makes no network call"


def test_the_store_shows_no_secret() -> None:
    s = awskms.open_store(kms_settings("http://127.0.0.1:9"))
    try:
        shown = repr(s) + str(vars(s))
    finally:
        s.close()
    assert DUMMY_SECRET not in shown


# ------------------------------------------------------------------ the moto wrapper itself


def kms_key(kms: MotoKms, spec: str) -> tuple[str, Any]:
    ref = kms.client().create_key(KeyUsage="SIGN_VERIFY", KeySpec=spec)["KeyMetadata"]["KeyId"]
    der = kms.client().get_public_key(KeyId=ref)["PublicKey"]
    return ref, serialization.load_der_public_key(der)


def test_moto_signs_a_digest_as_a_digest(kms: MotoKms) -> None:
    ref, public = kms_key(kms, "ECC_NIST_P256")
    digest = hashlib.sha256(b"artifact").digest()
    signature = kms.client().sign(
        KeyId=ref, Message=digest, MessageType="DIGEST", SigningAlgorithm="ECDSA_SHA_256"
    )["Signature"]
    public.verify(signature, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    # Unpatched moto signed SHA-256(digest): that reading must fail now.
    with pytest.raises(InvalidSignature):
        public.verify(signature, digest, ec.ECDSA(hashes.SHA256()))
    # moto's Verify agrees with the digest reading, and only with it.
    assert kms.client().verify(
        KeyId=ref,
        Message=digest,
        MessageType="DIGEST",
        Signature=signature,
        SigningAlgorithm="ECDSA_SHA_256",
    )["SignatureValid"]
    other = hashlib.sha256(b"other").digest()
    assert not kms.client().verify(
        KeyId=ref,
        Message=other,
        MessageType="DIGEST",
        Signature=signature,
        SigningAlgorithm="ECDSA_SHA_256",
    )["SignatureValid"]


def test_unpatched_moto_hashes_the_digest_again() -> None:
    """What the wrapper corrects (getmoto/moto#10202), shown on moto's own class in
    this process, where the wrapper is not applied."""
    pytest.importorskip("moto")
    from moto.kms.utils import ECDSAPrivateKey

    key = ECDSAPrivateKey("ECC_NIST_P256")
    digest = hashlib.sha256(b"artifact").digest()
    signature = key.sign(digest, "ECDSA_SHA_256")
    public = key.private_key.public_key()
    with pytest.raises(InvalidSignature):
        public.verify(signature, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))


def test_moto_refuses_a_digest_of_the_wrong_length(kms: MotoKms) -> None:
    from botocore.exceptions import ClientError

    ref, _ = kms_key(kms, "ECC_NIST_P256")
    for message in (b"\x01" * 31, b"\x01" * 48):
        with pytest.raises(ClientError) as caught:
            kms.client().sign(
                KeyId=ref, Message=message, MessageType="DIGEST", SigningAlgorithm="ECDSA_SHA_256"
            )
        assert caught.value.response["Error"]["Code"] == "ValidationException"
    with pytest.raises(ClientError) as caught:
        kms.client().sign(
            KeyId=ref, Message=b"\x01" * 32, MessageType="HASHED", SigningAlgorithm="ECDSA_SHA_256"
        )
    assert caught.value.response["Error"]["Code"] == "ValidationException"


def pss_salt_length(public: rsa.RSAPublicKey, signature: bytes, h: hashes.HashAlgorithm) -> int:
    """The salt length inside an RSASSA-PSS signature, read as RFC 8017 §9.1.2 does."""
    numbers = public.public_numbers()
    em_bits = public.key_size - 1
    em_len = (em_bits + 7) // 8
    em = pow(int.from_bytes(signature, "big"), numbers.e, numbers.n).to_bytes(em_len, "big")
    assert em[-1] == 0xBC
    masked_db, seed = em[: em_len - h.digest_size - 1], em[em_len - h.digest_size - 1 : -1]
    mask = b"".join(
        hashlib.new(h.name, seed + counter.to_bytes(4, "big")).digest()
        for counter in range(len(masked_db) // h.digest_size + 1)
    )
    db = bytearray(a ^ b for a, b in zip(masked_db, mask, strict=False))
    db[0] &= 0xFF >> (8 * em_len - em_bits)
    separator = db.index(1)
    assert not any(db[:separator])
    return len(db) - separator - 1


@pytest.mark.parametrize("digest_algorithm", list(DigestAlgorithm))
def test_moto_pss_salt_is_as_long_as_the_digest(
    kms: MotoKms, digest_algorithm: DigestAlgorithm
) -> None:
    ref, public = kms_key(kms, "RSA_2048")
    assert isinstance(public, rsa.RSAPublicKey)
    hashed = hash_bytes(b"pss", digest_algorithm)
    h = hashed.hash_algorithm()
    signature = kms.client().sign(
        KeyId=ref,
        Message=hashed.digest,
        MessageType="DIGEST",
        SigningAlgorithm=f"RSASSA_PSS_SHA_{h.digest_size * 8}",
    )["Signature"]
    public.verify(
        signature, hashed.digest, padding.PSS(padding.MGF1(h), h.digest_size), utils.Prehashed(h)
    )
    # Unpatched moto used the maximum: 256 - digest size - 2 bytes for RSA-2048.
    assert pss_salt_length(public, signature, h) == h.digest_size


@pytest.mark.parametrize(
    ("spec", "refused", "accepted"),
    [
        ("ECC_NIST_P384", "ECDSA_SHA_256", "ECDSA_SHA_384"),
        ("ECC_NIST_P521", "ECDSA_SHA_384", "ECDSA_SHA_512"),
        ("ECC_NIST_P256", "ECDSA_SHA_512", "ECDSA_SHA_256"),
    ],
)
def test_moto_ties_the_hash_to_the_curve(
    kms: MotoKms, spec: str, refused: str, accepted: str
) -> None:
    from botocore.exceptions import ClientError

    ref, public = kms_key(kms, spec)
    sizes = {"256": 32, "384": 48, "512": 64}
    with pytest.raises(ClientError) as caught:
        kms.client().sign(
            KeyId=ref,
            Message=b"\x02" * sizes[refused[-3:]],
            MessageType="DIGEST",
            SigningAlgorithm=refused,
        )
    assert caught.value.response["Error"]["Code"] == "ValidationException"
    digest = b"\x02" * sizes[accepted[-3:]]
    signature = kms.client().sign(
        KeyId=ref, Message=digest, MessageType="DIGEST", SigningAlgorithm=accepted
    )["Signature"]
    h = {"256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512}[accepted[-3:]]()
    public.verify(signature, digest, ec.ECDSA(utils.Prehashed(h)))


def test_moto_refuses_disabled_and_doomed_keys_like_kms(kms: MotoKms) -> None:
    from botocore.exceptions import ClientError

    ref, _ = kms_key(kms, "ECC_NIST_P256")
    digest = hashlib.sha256(b"state").digest()
    client = kms.client()

    def refusal(call: Any, **params: Any) -> str:
        with pytest.raises(ClientError) as caught:
            call(KeyId=ref, **params)
        return str(caught.value.response["Error"]["Code"])

    sign = {"Message": digest, "MessageType": "DIGEST", "SigningAlgorithm": "ECDSA_SHA_256"}
    client.disable_key(KeyId=ref)
    assert refusal(client.sign, **sign) == "DisabledException"
    assert refusal(client.get_public_key) == "DisabledException"
    client.enable_key(KeyId=ref)
    client.schedule_key_deletion(KeyId=ref, PendingWindowInDays=7)
    assert refusal(client.sign, **sign) == "KMSInvalidStateException"
    assert refusal(client.get_public_key) == "KMSInvalidStateException"


def test_moto_raw_messages_are_still_hashed_first(kms: MotoKms) -> None:
    ref, public = kms_key(kms, "ECC_NIST_P256")
    message = b"a raw message, hashed by KMS"
    signature = kms.client().sign(
        KeyId=ref, Message=message, MessageType="RAW", SigningAlgorithm="ECDSA_SHA_256"
    )["Signature"]
    public.verify(signature, message, ec.ECDSA(hashes.SHA256()))


def test_moto_get_public_key_still_omits_key_spec(kms: MotoKms) -> None:
    """Left uncorrected on purpose: the store must fall back to CustomerMasterKeySpec."""
    ref, _ = kms_key(kms, "ECC_NIST_P256")
    answer = kms.client().get_public_key(KeyId=ref)
    assert "KeySpec" not in answer
    assert answer["CustomerMasterKeySpec"] == "ECC_NIST_P256"


def test_the_wrapper_names_the_missing_moto() -> None:
    """moto is imported lazily: without it the module still imports, and running it
    ends with an install hint instead of a traceback."""
    blocked = (
        "import sys; sys.modules['moto'] = None; "
        "from devtools import moto_kms; "
        "sys.exit(moto_kms.main(['--port', '0']))"
    )
    done = subprocess.run(
        [sys.executable, "-c", blocked],
        capture_output=True,
        timeout=60,
        check=False,
        cwd=Path(__file__).resolve().parents[2],  # the repository's devtools/
    )
    assert done.returncode == 2
    assert b"pip install 'moto[server]" in done.stderr
    assert b"Traceback" not in done.stderr
