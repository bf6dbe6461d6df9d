"""The deployment's master key: wraps the built-in store's data keys.

A 256-bit AES key, kept in a file of mode 0600 created by ``signery init`` (or
passed in the environment). It never enters the database; the database holds
only its identifier (a key check value) so a wrong master key is detected at
start-up instead of at the first signing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from signery.errors import ConfigurationError, MasterKeyMismatch
from signery.keystores._files import read_secret_file

MASTER_KEY_BYTES = 32  # AES-256
GCM_NONCE_BYTES = 12  # NIST SP 800-38D §8.2: 96-bit random nonces
GCM_TAG_BYTES = 16
FILE_MODE = 0o600


def read_key_file(path: Path) -> str:
    """The text of a master key file, refusing one that others could read."""
    return read_secret_file(
        path, "master key file", missing_hint="; run `signery init` first"
    ).strip()


class MasterKey:
    """An AES-256-GCM key with a public identifier. Its bytes are never printed."""

    __slots__ = ("_aead", "_key", "key_id")

    def __init__(self, key: bytes) -> None:
        if len(key) != MASTER_KEY_BYTES:
            raise ConfigurationError("the master key must be 32 bytes (AES-256)")
        self._key = bytes(key)
        self._aead = AESGCM(self._key)
        # Key check value: identifies the key without revealing it (one-way, keyed).
        self.key_id = hmac.new(self._key, b"signery master key id v1", hashlib.sha256).hexdigest()[
            :16
        ]

    def __repr__(self) -> str:
        return f"MasterKey(key_id={self.key_id!r})"

    def secret_bytes(self) -> bytes:
        """The key itself: only for writing it into the keyring file (or wrapping
        it with KMS). Never logged, never sent anywhere else."""
        return self._key

    # ------------------------------------------------------------ construction

    @classmethod
    def generate(cls) -> MasterKey:
        return cls(secrets.token_bytes(MASTER_KEY_BYTES))

    @classmethod
    def from_base64(cls, text: str) -> MasterKey:
        try:
            raw = base64.b64decode(text.strip().encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError) as e:
            raise ConfigurationError("the master key is not valid base64") from e
        return cls(raw)

    @classmethod
    def load(cls, path: Path) -> MasterKey:
        """Read a single-key master key file, refusing one that others could read."""
        return cls.from_base64(read_key_file(path))

    def write_new(self, path: Path) -> None:
        """Create ``path`` with mode 0600; never overwrite an existing key file."""
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        except FileExistsError:
            raise ConfigurationError(
                f"master key file {path} already exists; refusing to overwrite"
            ) from None
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(base64.b64encode(self._key).decode("ascii") + "\n")
            f.flush()
            os.fsync(f.fileno())

    # ------------------------------------------------------------ use

    def encrypt(self, plaintext: bytes, associated_data: bytes) -> bytes:
        nonce = secrets.token_bytes(GCM_NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plaintext, associated_data)

    def decrypt(self, blob: bytes, associated_data: bytes) -> bytes:
        if len(blob) < GCM_NONCE_BYTES + GCM_TAG_BYTES:
            raise MasterKeyMismatch("ciphertext is truncated")
        try:
            return self._aead.decrypt(
                blob[:GCM_NONCE_BYTES], blob[GCM_NONCE_BYTES:], associated_data
            )
        except InvalidTag:
            raise MasterKeyMismatch() from None

    def derive(self, purpose: str, length: int = 32) -> bytes:
        """An independent secret for ``purpose`` (RFC 5869 HKDF-SHA256), e.g. token signing."""
        return HKDF(hashes.SHA256(), length, salt=None, info=f"signery/{purpose}".encode()).derive(
            self._key
        )
