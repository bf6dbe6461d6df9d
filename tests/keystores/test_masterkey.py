"""The master key: a 0600 file that is never overwritten, never printed, and whose
AES-GCM encryption is bound to the associated data it was made with."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest

from signery.errors import ConfigurationError, MasterKeyMismatch
from signery.keystores import MasterKey

KEY_BYTES = bytes(range(32))
OTHER_KEY_BYTES = bytes(range(1, 33))
AAD = b'{"purpose":"dek","key_id":"k1"}'


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def write_key_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text, "ascii")
    path.chmod(mode)
    return path


# ------------------------------------------------------------------ the key file


def test_write_new_creates_a_0600_file_that_loads_back(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "master.key"
    key = MasterKey.generate()

    key.write_new(path)

    assert mode_of(path) == 0o600
    loaded = MasterKey.load(path)
    assert loaded.key_id == key.key_id
    # Same key, not just the same id: what one encrypts the other decrypts.
    assert loaded.decrypt(key.encrypt(b"secret", AAD), AAD) == b"secret"


def test_write_new_is_0600_even_under_a_permissive_umask(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    previous = os.umask(0)
    try:
        MasterKey.generate().write_new(path)
    finally:
        os.umask(previous)
    assert mode_of(path) == 0o600


def test_write_new_refuses_to_overwrite_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    first = MasterKey.generate()
    first.write_new(path)
    before = path.read_bytes()

    with pytest.raises(ConfigurationError, match="already exists"):
        MasterKey.generate().write_new(path)

    assert path.read_bytes() == before
    assert MasterKey.load(path).key_id == first.key_id


def test_generate_makes_a_different_key_each_time() -> None:
    assert MasterKey.generate().key_id != MasterKey.generate().key_id


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o610, 0o601, 0o700 | 0o040])
def test_load_refuses_a_file_others_can_access(tmp_path: Path, mode: int) -> None:
    path = write_key_file(tmp_path / "master.key", base64.b64encode(KEY_BYTES).decode(), mode)

    with pytest.raises(ConfigurationError, match="group or others"):
        MasterKey.load(path)


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_load_accepts_an_owner_only_file(tmp_path: Path, mode: int) -> None:
    path = write_key_file(tmp_path / "master.key", base64.b64encode(KEY_BYTES).decode(), mode)

    assert MasterKey.load(path).key_id == MasterKey(KEY_BYTES).key_id


def test_load_of_a_missing_file_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="does not exist"):
        MasterKey.load(tmp_path / "absent.key")


@pytest.mark.parametrize("length", [0, 16, 31, 33, 64])
def test_a_key_of_the_wrong_length_is_refused(tmp_path: Path, length: int) -> None:
    raw = bytes(length)
    with pytest.raises(ConfigurationError, match="32 bytes"):
        MasterKey(raw)
    with pytest.raises(ConfigurationError, match="32 bytes"):
        MasterKey.from_base64(base64.b64encode(raw).decode())
    path = write_key_file(tmp_path / "master.key", base64.b64encode(raw).decode())
    with pytest.raises(ConfigurationError, match="32 bytes"):
        MasterKey.load(path)


@pytest.mark.parametrize(
    "text",
    [
        "not base64 at all!",
        base64.b64encode(KEY_BYTES).decode()[:-2],  # padding cut off
        base64.b64encode(KEY_BYTES).decode().replace("A", "*", 1),
        base64.urlsafe_b64encode(b"\xfb\xff" * 16).decode(),  # url-safe alphabet, not RFC 4648 §4
        "é" * 44,
    ],
)
def test_bad_base64_is_refused(text: str) -> None:
    with pytest.raises(ConfigurationError):
        MasterKey.from_base64(text)


def test_a_key_file_that_is_not_text_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    path.write_bytes(b"\xff\xfe" + KEY_BYTES)
    path.chmod(0o600)

    with pytest.raises(ConfigurationError):
        MasterKey.load(path)


def test_surrounding_whitespace_in_the_file_is_tolerated(tmp_path: Path) -> None:
    path = write_key_file(
        tmp_path / "master.key", "  " + base64.b64encode(KEY_BYTES).decode() + "\n\n"
    )

    assert MasterKey.load(path).key_id == MasterKey(KEY_BYTES).key_id


# ------------------------------------------------------------------ never printed


def test_repr_and_str_never_show_the_key_bytes() -> None:
    key = MasterKey(KEY_BYTES)
    renderings = [repr(key), str(key), f"{key!r}", f"{key}"]
    forms = [
        KEY_BYTES.hex(),
        KEY_BYTES.hex().upper(),
        base64.b64encode(KEY_BYTES).decode(),
        base64.urlsafe_b64encode(KEY_BYTES).decode().rstrip("="),
        repr(KEY_BYTES),
        str(list(KEY_BYTES)),
    ]
    for text in renderings:
        assert key.key_id in repr(key)
        for form in forms:
            assert form not in text
    # __slots__ and no __dict__: nothing generic (vars(), pickling helpers) lists the bytes.
    assert not hasattr(key, "__dict__")


def test_key_id_does_not_reveal_the_key() -> None:
    key = MasterKey(KEY_BYTES)
    assert key.key_id not in KEY_BYTES.hex()
    assert key.key_id != KEY_BYTES.hex()[: len(key.key_id)]


# ------------------------------------------------------------------ encryption


def test_encrypt_then_decrypt_returns_the_plaintext() -> None:
    key = MasterKey(KEY_BYTES)
    for plaintext in (b"", b"x", os.urandom(32), os.urandom(5000)):
        assert key.decrypt(key.encrypt(plaintext, AAD), AAD) == plaintext


def test_encryption_is_randomized_and_hides_the_plaintext() -> None:
    key = MasterKey(KEY_BYTES)
    plaintext = b"a data encryption key, 32 bytes"
    first, second = key.encrypt(plaintext, AAD), key.encrypt(plaintext, AAD)

    assert first != second  # fresh nonce each time
    assert plaintext not in first
    # 12-byte nonce + ciphertext + 16-byte GCM tag
    assert len(first) == 12 + len(plaintext) + 16


@pytest.mark.parametrize(
    "other_aad",
    [b"", AAD + b" ", AAD.replace(b"dek", b"key"), AAD.replace(b"k1", b"k2"), AAD.upper()],
)
def test_decrypt_with_different_associated_data_is_a_mismatch(other_aad: bytes) -> None:
    key = MasterKey(KEY_BYTES)
    blob = key.encrypt(b"secret", AAD)

    with pytest.raises(MasterKeyMismatch) as caught:
        key.decrypt(blob, other_aad)
    assert caught.value.code == "master_key_mismatch"


def test_decrypt_under_another_key_is_a_mismatch() -> None:
    blob = MasterKey(KEY_BYTES).encrypt(b"secret", AAD)

    with pytest.raises(MasterKeyMismatch):
        MasterKey(OTHER_KEY_BYTES).decrypt(blob, AAD)


@pytest.mark.parametrize("position", [0, 11, 12, 20, -1])
def test_a_tampered_ciphertext_is_a_mismatch(position: int) -> None:
    key = MasterKey(KEY_BYTES)
    blob = bytearray(key.encrypt(b"some secret bytes", AAD))
    blob[position] ^= 0x01

    with pytest.raises(MasterKeyMismatch):
        key.decrypt(bytes(blob), AAD)


@pytest.mark.parametrize("length", [0, 5, 12, 27])
def test_a_truncated_ciphertext_is_a_mismatch_not_a_foreign_error(length: int) -> None:
    """A blob cut short (a damaged database row) is refused with our error, like any
    other ciphertext that does not decrypt, never with a bare ValueError."""
    key = MasterKey(KEY_BYTES)
    blob = key.encrypt(b"some secret bytes", AAD)

    with pytest.raises(MasterKeyMismatch):
        key.decrypt(blob[:length], AAD)


# ------------------------------------------------------------------ identity and derivation


def test_key_id_is_stable_for_the_same_key_and_differs_for_another(tmp_path: Path) -> None:
    a1, a2 = MasterKey(KEY_BYTES), MasterKey(bytes(KEY_BYTES))
    b = MasterKey(OTHER_KEY_BYTES)
    path = tmp_path / "master.key"
    a1.write_new(path)

    assert a1.key_id == a2.key_id == MasterKey.load(path).key_id
    assert a1.key_id == MasterKey.from_base64(base64.b64encode(KEY_BYTES).decode()).key_id
    assert a1.key_id != b.key_id
    assert len(a1.key_id) == 16
    int(a1.key_id, 16)  # hex: fits the 16-character master_key_id columns


def test_derive_is_deterministic() -> None:
    assert MasterKey(KEY_BYTES).derive("access-token/v1") == MasterKey(KEY_BYTES).derive(
        "access-token/v1"
    )


def test_derived_secrets_are_independent_of_each_other_and_of_the_key() -> None:
    key = MasterKey(KEY_BYTES)
    purposes = ["access-token/v1", "access-token/v2", "csrf", "", "access-token/v1 "]
    derived = [key.derive(p) for p in purposes]

    assert len(set(derived)) == len(purposes)
    assert KEY_BYTES not in derived
    assert key.derive("csrf") != MasterKey(OTHER_KEY_BYTES).derive("csrf")
    # A derived secret is not usable as the master key itself.
    assert MasterKey(key.derive("csrf")).key_id != key.key_id


@pytest.mark.parametrize("length", [16, 32, 64])
def test_derive_honours_the_length(length: int) -> None:
    key = MasterKey(KEY_BYTES)
    out = key.derive("purpose", length)

    assert len(out) == length
    # HKDF output for a shorter length is a prefix of the longer one; the purpose,
    # not the length, is what separates secrets.
    assert key.derive("purpose", 64)[:length] == out
