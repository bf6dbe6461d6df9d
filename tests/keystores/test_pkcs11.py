"""The pkcs11 key store against real SoftHSM2 tokens: what the conformance suite
cannot see from outside the interface.

Key attributes are read back from the token with python-pkcs11 and, for the
labels and access flags, with OpenSC's independent ``pkcs11-tool``. Signatures
are verified with ``cryptography`` against the public keys the store returned.
Every token is fresh (tests.keystores.softhsm) and has a random PIN, which is
looked for in every error message, log record and repr.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import hashlib
import logging
import os
import re
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from pkcs11 import Attribute, ObjectClass
from pkcs11 import exceptions as p11
from pydantic import SecretStr

from signery.crypto import Hashed, schemes_for
from signery.errors import (
    ConfigurationError,
    KeyMaterialMissing,
    KeyStoreUnavailable,
    SigneryError,
)
from signery.keystores import GeneratedKey, KeyContext, KeyHandle, StoreHealth
from signery.keystores._pkcs11 import (
    LABEL_MAX_BYTES,
    Pkcs11KeyStore,
    _find,
    _Pin,
    open_store,
)
from signery.keystores._settings import Pkcs11Settings
from signery.protocol import Algorithm, DigestAlgorithm, SignatureScheme
from tests.keystores.softhsm import SoftHsmToken, claim_token, pkcs11_tool

TSG = "1234567890"
HASHES = {
    DigestAlgorithm.SHA256: hashes.SHA256,
    DigestAlgorithm.SHA384: hashes.SHA384,
    DigestAlgorithm.SHA512: hashes.SHA512,
}


def context(label: str = "pkcs11-test") -> KeyContext:
    return KeyContext(str(uuid.uuid4()), 1, TSG, label=label)


def digest(alg: DigestAlgorithm, text: str) -> Hashed:
    return Hashed(alg, hashlib.new(alg.value, text.encode()).digest())


def verify(public_key: object, hashed: Hashed, scheme: SignatureScheme, signature: bytes) -> None:
    """Independent verification with cryptography; raises InvalidSignature."""
    h = HASHES[hashed.algorithm]()
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        public_key.verify(signature, hashed.digest, ec.ECDSA(utils.Prehashed(h)))
        return
    assert isinstance(public_key, rsa.RSAPublicKey)
    pad: padding.AsymmetricPadding = (
        padding.PSS(padding.MGF1(h), h.digest_size)
        if scheme is SignatureScheme.RSA_PSS
        else padding.PKCS1v15()
    )
    public_key.verify(signature, hashed.digest, pad, utils.Prehashed(h))


def open_pkcs11(settings: Pkcs11Settings) -> Pkcs11KeyStore:
    store = open_store(settings)
    assert isinstance(store, Pkcs11KeyStore)
    return store


def token_objects(store: Pkcs11KeyStore, handle: KeyHandle) -> dict[ObjectClass, list[Any]]:
    """The key objects with the handle's CKA_ID, read through one of the store's
    own sessions (the process is logged in once; see the module under test)."""
    cka_id = bytes.fromhex(handle.ref)
    with store._pool.borrow() as slot:
        return {
            cls: _find(slot.live, {Attribute.CLASS: cls, Attribute.ID: cka_id}, limit=8)
            for cls in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY)
        }


def all_text(error: BaseException) -> str:
    """Everything an exception could print: message, repr, and its whole chain."""
    parts: list[str] = []
    seen: BaseException | None = error
    for _ in range(20):
        if seen is None:
            break
        parts += [str(seen), repr(seen), repr(seen.args)]
        seen = seen.__cause__ or seen.__context__
    return "\n".join(parts)


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def token() -> SoftHsmToken:
    return claim_token()


@pytest.fixture(scope="module")
def store(token: SoftHsmToken) -> Iterator[Pkcs11KeyStore]:
    s = open_pkcs11(token.settings(sessions=4))
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(scope="module")
def keys(store: Pkcs11KeyStore) -> dict[Algorithm, GeneratedKey]:
    return {alg: store.generate(alg, context(f"attrs {alg.value}")) for alg in sorted(Algorithm)}


# ------------------------------------------------------------------ key attributes


@pytest.mark.parametrize("algorithm", sorted(Algorithm))
def test_private_keys_are_sensitive_and_never_extractable(
    store: Pkcs11KeyStore, keys: dict[Algorithm, GeneratedKey], algorithm: Algorithm
) -> None:
    objects = token_objects(store, keys[algorithm].handle)
    assert len(objects[ObjectClass.PRIVATE_KEY]) == 1
    assert len(objects[ObjectClass.PUBLIC_KEY]) == 1
    private = objects[ObjectClass.PRIVATE_KEY][0]
    attrs = private.get_attributes(
        [
            Attribute.TOKEN,
            Attribute.PRIVATE,
            Attribute.SENSITIVE,
            Attribute.ALWAYS_SENSITIVE,
            Attribute.EXTRACTABLE,
            Attribute.NEVER_EXTRACTABLE,
            Attribute.LOCAL,
            Attribute.SIGN,
            Attribute.DECRYPT,
            Attribute.UNWRAP,
            Attribute.DERIVE,
        ]
    )
    assert attrs[Attribute.TOKEN] is True
    assert attrs[Attribute.PRIVATE] is True
    assert attrs[Attribute.SENSITIVE] is True
    assert attrs[Attribute.ALWAYS_SENSITIVE] is True
    assert attrs[Attribute.EXTRACTABLE] is False
    assert attrs[Attribute.NEVER_EXTRACTABLE] is True
    assert attrs[Attribute.LOCAL] is True  # generated on the token, not imported
    assert attrs[Attribute.SIGN] is True
    assert not attrs[Attribute.DECRYPT]
    assert not attrs[Attribute.UNWRAP]
    assert not attrs[Attribute.DERIVE]
    public = objects[ObjectClass.PUBLIC_KEY][0]
    assert public[Attribute.VERIFY] is True
    assert public[Attribute.TOKEN] is True


@pytest.mark.parametrize("algorithm", [Algorithm.RSA_2048, Algorithm.EC_P256])
def test_the_token_refuses_to_reveal_or_release_the_private_key(
    store: Pkcs11KeyStore, keys: dict[Algorithm, GeneratedKey], algorithm: Algorithm
) -> None:
    private = token_objects(store, keys[algorithm].handle)[ObjectClass.PRIVATE_KEY][0]
    secret = Attribute.PRIVATE_EXPONENT if algorithm.is_rsa else Attribute.VALUE
    with pytest.raises(p11.AttributeSensitive):
        private[secret]
    # CKA_EXTRACTABLE only ever goes from true to false (PKCS#11 v2.40 base §4.9).
    with pytest.raises((p11.AttributeReadOnly, p11.AttributeValueInvalid)):
        private[Attribute.EXTRACTABLE] = True
    assert private[Attribute.EXTRACTABLE] is False


def test_objects_are_labelled_with_the_key_identity(store: Pkcs11KeyStore) -> None:
    ctx = KeyContext(str(uuid.uuid4()), 7, TSG, label="release signing \u00e9" + "x" * 300)
    generated = store.generate(Algorithm.EC_P256, ctx)
    try:
        objects = token_objects(store, generated.handle)
        labels = {obj[Attribute.LABEL] for objs in objects.values() for obj in objs}
        assert len(labels) == 1
        label = labels.pop()
        assert label.startswith("signery:release signing \u00e9xxx")
        assert label.endswith(f":{ctx.key_id}:v7"), "the key id and version are never cut"
        assert len(label.encode()) <= LABEL_MAX_BYTES
        assert re.fullmatch(r"[0-9a-f]{32}", generated.handle.ref)
        assert objects[ObjectClass.PRIVATE_KEY][0][Attribute.ID] == bytes.fromhex(
            generated.handle.ref
        )
    finally:
        store.destroy(generated.handle)


def test_pkcs11_tool_sees_the_keys_with_their_labels_and_access(
    store: Pkcs11KeyStore, token: SoftHsmToken, keys: dict[Algorithm, GeneratedKey]
) -> None:
    result = pkcs11_tool(token, "--list-objects")
    assert result.returncode == 0, result.stderr
    blocks = re.split(r"\n(?=\S)", result.stdout)
    private_blocks = [b for b in blocks if b.startswith("Private Key Object")]
    for algorithm, generated in keys.items():
        ref = generated.handle.ref
        mine = [b for b in private_blocks if re.search(rf"ID:\s+{ref}\b", b)]
        assert len(mine) == 1, f"{algorithm}: {result.stdout}"
        block = mine[0]
        label = f"signery:attrs {algorithm.value}:{generated.handle.context.key_id}:v1"
        assert f"label:      {label}" in block
        access = re.search(r"Access:\s+(.*)", block)
        assert access is not None
        flags = {f.strip() for f in access.group(1).split(",")}
        assert {"sensitive", "always sensitive", "never extractable", "local"} <= flags
        assert "extractable" not in flags
        assert re.search(r"Usage:\s+sign\s*$", block, re.MULTILINE)


# ------------------------------------------------------------------ destroy


def test_destroy_erases_both_objects(store: Pkcs11KeyStore) -> None:
    generated = store.generate(Algorithm.RSA_2048, context("doomed"))
    assert all(len(objs) == 1 for objs in token_objects(store, generated.handle).values())
    store.destroy(generated.handle)
    assert all(objs == [] for objs in token_objects(store, generated.handle).values())
    store.destroy(generated.handle)  # erasing what is gone is not an error
    with pytest.raises(KeyMaterialMissing):
        store.public_key(generated.handle)


def test_a_key_deleted_by_another_process_cannot_sign(
    store: Pkcs11KeyStore, token: SoftHsmToken
) -> None:
    """Regression guard for the per-session key cache: a cached object handle
    whose object another process deleted must not sign, nor fail obscurely."""
    generated = store.generate(Algorithm.EC_P256, context("deleted elsewhere"))
    hashed = digest(DigestAlgorithm.SHA256, "cached")
    for _ in range(2 * store._pool.size):  # every session has found (cached) it
        verify(
            generated.public_key,
            hashed,
            SignatureScheme.ECDSA,
            store.sign(generated.handle, hashed, SignatureScheme.ECDSA),
        )
    ref = generated.handle.ref
    result = pkcs11_tool(token, "--delete-object", "--type", "privkey", "--id", ref)
    assert result.returncode == 0, result.stderr
    for _ in range(2 * store._pool.size):
        with pytest.raises(KeyMaterialMissing):
            store.sign(generated.handle, hashed, SignatureScheme.ECDSA)
    store.destroy(generated.handle)


def test_a_handle_of_the_wrong_algorithm_is_refused(
    store: Pkcs11KeyStore, keys: dict[Algorithm, GeneratedKey]
) -> None:
    rsa_handle = keys[Algorithm.RSA_2048].handle
    as_ec = KeyHandle(store.name, rsa_handle.ref, Algorithm.EC_P256, rsa_handle.context)
    with pytest.raises(KeyMaterialMissing):
        store.sign(as_ec, digest(DigestAlgorithm.SHA256, "x"), SignatureScheme.ECDSA)
    with pytest.raises(KeyMaterialMissing):
        store.public_key(as_ec)
    malformed = KeyHandle(store.name, "not-hex", Algorithm.EC_P256, rsa_handle.context)
    with pytest.raises(KeyMaterialMissing):
        store.sign(malformed, digest(DigestAlgorithm.SHA256, "x"), SignatureScheme.ECDSA)


# ------------------------------------------------------------------ sessions


def test_the_library_is_initialised_for_threads(store: Pkcs11KeyStore) -> None:
    """Regression guard: python-pkcs11 would pass C_Initialize(NULL), which turns
    SoftHSM's locks off while it releases the GIL around every call."""
    assert store._module.os_locking is True
    assert "serialised" not in store.health().detail


def test_sixteen_threads_sign_through_a_pool_of_two_sessions() -> None:
    store = open_pkcs11(claim_token().settings(sessions=2))
    try:
        generated = [
            store.generate(Algorithm.EC_P256, context("threads ec")),
            store.generate(Algorithm.RSA_2048, context("threads rsa")),
        ]
        jobs = [
            (key, scheme, digest(alg, f"{i}-{scheme}-{alg}"))
            for i in range(16 * 12)
            for key in generated
            for scheme in schemes_for(key.handle.algorithm)
            for alg in [list(DigestAlgorithm)[i % 3]]
        ]
        busy = {"now": 0, "most": 0}
        lock = threading.Lock()
        borrow = store._pool.borrow

        @contextlib.contextmanager
        def counted(wait: float = 30.0) -> Iterator[Any]:
            with borrow(wait) as slot:
                with lock:
                    busy["now"] += 1
                    busy["most"] = max(busy["most"], busy["now"])
                try:
                    yield slot
                finally:
                    with lock:
                        busy["now"] -= 1

        store._pool.borrow = counted  # type: ignore[method-assign]

        def sign(job: tuple[GeneratedKey, SignatureScheme, Hashed]) -> bytes:
            key, scheme, hashed = job
            return store.sign(key.handle, hashed, scheme)

        with ThreadPoolExecutor(max_workers=16) as pool:
            signatures = list(pool.map(sign, jobs))
        assert len(signatures) == len(jobs)
        for (key, scheme, hashed), signature in zip(jobs, signatures, strict=True):
            verify(key.public_key, hashed, scheme, signature)
        assert busy["most"] == 2, "16 threads, 2 sessions: both in use, never more"
        assert store._pool._idle.qsize() == 2
        assert store.health().ok
        for key in generated:
            store.destroy(key.handle)
    finally:
        store.close()


def test_lost_sessions_and_a_lost_login_are_replaced() -> None:
    store = open_pkcs11(claim_token().settings(sessions=2))
    try:
        generated = store.generate(Algorithm.EC_P256, context("reopen"))
        hashed = digest(DigestAlgorithm.SHA256, "reopen")
        # Close every session behind the pool's back: the handles turn invalid and,
        # with the last one closed, the process is logged out (PKCS#11 v2.40 §5.6).
        slots = [store._pool._idle.get_nowait() for _ in range(store._pool.size)]
        for slot in slots:
            slot.live.close()
            store._pool._idle.put_nowait(slot)
        signature = store.sign(generated.handle, hashed, SignatureScheme.ECDSA)
        verify(generated.public_key, hashed, SignatureScheme.ECDSA, signature)
        for _ in range(4):
            store.sign(generated.handle, hashed, SignatureScheme.ECDSA)
        assert store.health().ok
        store.destroy(generated.handle)
    finally:
        store.close()


def test_a_pin_refused_at_runtime_is_tried_once_then_reported(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The PIN changed on the token while the server ran (SoftHSM keeps the old
    one valid in a process that already used it, so the change is played by
    swapping the PIN the store holds). The store must not keep trying a PIN the
    token refused: every wrong try counts towards locking the token."""
    token = claim_token()
    store = open_pkcs11(token.settings(sessions=1))
    try:
        generated = store.generate(Algorithm.EC_P256, context("pin change"))
        hashed = digest(DigestAlgorithm.SHA256, "pin change")
        wrong = "changed-" + token.pin
        monkeypatch.setattr(store._pool, "_pin", _Pin(wrong.encode()))
        logins: list[int] = []
        login = store._module.login
        monkeypatch.setattr(
            store._module, "login", lambda session, pin: logins.append(1) or login(session, pin)
        )
        # Log the process out (its only session closes): the next use logs in again.
        slot = store._pool._idle.get_nowait()
        slot.live.close()
        store._pool._idle.put_nowait(slot)
        caplog.set_level(logging.DEBUG)
        with pytest.raises(KeyStoreUnavailable) as first:
            store.sign(generated.handle, hashed, SignatureScheme.ECDSA)
        assert first.value.detail == (
            f"PKCS#11 login failed for token {token.label!r}: the user PIN is incorrect"
        )
        for _ in range(3):
            with pytest.raises(KeyStoreUnavailable):
                store.sign(generated.handle, hashed, SignatureScheme.ECDSA)
        health = store.health()
        assert not health.ok
        assert health.detail == first.value.detail
        assert logins == [1], "one refused login, never a second try"
        for text in (caplog.text, all_text(first.value), health.detail, repr(store)):
            assert token.pin not in text
            assert wrong not in text
    finally:
        store.close()


def test_a_closed_store_refuses_and_reports_it() -> None:
    store = open_pkcs11(claim_token().settings(sessions=1))
    generated = store.generate(Algorithm.EC_P256, context("closed"))
    store.destroy(generated.handle)
    store.close()
    store.close()  # idempotent
    with pytest.raises(KeyStoreUnavailable):
        store.sign(generated.handle, digest(DigestAlgorithm.SHA256, "x"), SignatureScheme.ECDSA)
    assert store.health() == StoreHealth(False, "the pkcs11 key store is closed")


# ------------------------------------------------------------------ configuration


def not_a_pkcs11_library() -> Path:
    """A real shared library that is not a PKCS#11 module (zlib)."""
    name = ctypes.util.find_library("z")
    if name is None:
        pytest.skip("no zlib shared library to load")
    for directory in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/usr/lib", "/lib"):
        path = Path(directory) / name
        if path.is_file():
            return path
    pytest.skip(f"{name} not found on disk")
    raise AssertionError("unreachable")


def bad_settings(token: SoftHsmToken, tmp: Path) -> dict[str, Pkcs11Settings]:
    """One broken setting each; everything else right."""
    wrong_pin_file = tmp / "wrong.pin"
    wrong_pin_file.touch(mode=0o600)
    wrong_pin_file.write_text("wrong-" + token.pin + "\n")
    text_file = tmp / "libnot-pkcs11.so"
    text_file.write_text("this is text, not a shared library\n")
    open_pin_file = tmp / "readable.pin"
    open_pin_file.write_text(token.pin)
    open_pin_file.chmod(0o644)
    base: dict[str, Any] = {"module": token.module, "token_label": token.label}
    return {
        "wrong pin": Pkcs11Settings(**base, pin_file=wrong_pin_file),
        "wrong pin inline": Pkcs11Settings(**base, pin=SecretStr("x" + token.pin)),
        "wrong label": Pkcs11Settings(
            module=token.module, token_label="no-such-token", pin=SecretStr(token.pin)
        ),
        "missing module": Pkcs11Settings(
            module=tmp / "nowhere" / "libpkcs11.so",
            token_label=token.label,
            pin=SecretStr(token.pin),
        ),
        "text file as module": Pkcs11Settings(
            module=text_file, token_label=token.label, pin=SecretStr(token.pin)
        ),
        "library that is not pkcs11": Pkcs11Settings(
            module=not_a_pkcs11_library(), token_label=token.label, pin=SecretStr(token.pin)
        ),
        "relative module path": Pkcs11Settings(
            module=Path("libsofthsm2.so"), token_label=token.label, pin=SecretStr(token.pin)
        ),
        "missing pin file": Pkcs11Settings(**base, pin_file=tmp / "absent.pin"),
        "pin file others can read": Pkcs11Settings(**base, pin_file=open_pin_file),
    }


EXPECTED = {
    "wrong pin": r"^PKCS#11 login failed for token '{label}': the user PIN is incorrect$",
    "wrong pin inline": r"^PKCS#11 login failed for token '{label}': the user PIN is incorrect$",
    "wrong label": r"^no PKCS#11 token labelled 'no-such-token' in .*; tokens present: .*'{label}'",
    "missing module": r"^PKCS#11 module .*/nowhere/libpkcs11\.so does not exist$",
    "text file as module": r"^PKCS#11 module .*libnot-pkcs11\.so cannot be loaded: ",
    "library that is not pkcs11": r"is not a PKCS#11 library \(it has no C_GetFunctionList\)$",
    "relative module path": r"^PKCS#11 module path libsofthsm2\.so must be absolute$",
    "missing pin file": r"^PKCS#11 PIN file .*absent\.pin does not exist$",
    "pin file others can read": r"^PKCS#11 PIN file .*readable\.pin is accessible by group or",
}


@pytest.fixture(scope="module")
def config_token() -> SoftHsmToken:
    """A token that only the configuration tests log in to (wrong PINs included)."""
    return claim_token()


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_bad_configuration_is_one_clear_error(
    case: str, config_token: SoftHsmToken, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = bad_settings(config_token, tmp_path)[case]
    with pytest.raises(SigneryError) as caught:
        open_store(settings)
    error = caught.value
    assert type(error) is ConfigurationError, all_text(error)
    assert "\n" not in error.detail
    assert re.search(EXPECTED[case].format(label=re.escape(config_token.label)), error.detail), (
        error.detail
    )
    for text in (all_text(error), caplog.text):
        assert config_token.pin not in text
    # Nothing was left logged in or open: the right settings still work.
    store = open_pkcs11(config_token.settings(sessions=1))
    try:
        assert store.health().ok
    finally:
        store.close()


def test_the_wrong_label_error_names_every_token_present(config_token: SoftHsmToken) -> None:
    with pytest.raises(ConfigurationError) as caught:
        open_store(
            Pkcs11Settings(
                module=config_token.module, token_label="nope", pin=SecretStr(config_token.pin)
            )
        )
    present = re.findall(r"'(signery-\d+)'", caught.value.detail)
    assert config_token.label in present
    assert len(present) > 1


def test_the_pin_is_in_no_message_log_or_repr(
    store: Pkcs11KeyStore, token: SoftHsmToken, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for settings in (
        token.settings(sessions=1),
        Pkcs11Settings(module=token.module, token_label=token.label, pin=SecretStr(token.pin)),
    ):
        assert token.pin not in repr(settings)
        # The module's own store holds this token's login; a second store in
        # the same process is refused, clearly, without the PIN.
        with pytest.raises(ConfigurationError) as caught:
            open_store(settings)
        assert "already logged in" in caught.value.detail
        assert token.pin not in all_text(caught.value)
    texts = [repr(store), repr(vars(store)), repr(vars(store._pool)), str(store.health())]
    other = claim_token()
    second = open_pkcs11(other.settings(sessions=2))
    try:
        generated = second.generate(Algorithm.RSA_2048, context("secrecy"))
        second.sign(generated.handle, digest(DigestAlgorithm.SHA256, "s"), SignatureScheme.RSA_PSS)
        texts += [repr(second), str(second.health()), repr(generated), repr(vars(second._pool))]
        second.destroy(generated.handle)
    finally:
        second.close()
    texts.append(caplog.text)
    for text in texts:
        assert token.pin not in text
        assert other.pin not in text
    assert not any(other.pin in str(v) for v in os.environ.values())
