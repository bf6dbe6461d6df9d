"""The master keyring: the master keys a deployment knows, one of them primary.

The primary key wraps every new data key; the others are older keys still
needed to unwrap data keys that a rotation has not reached yet (see
``signery keystore rotate-master-key``). The keyring lives in the master key
file (mode 0600), in one of two formats:

* one base64 line: a single master key (what ``signery init`` writes);
* a JSON document ``{"format": "signery-keyring/1", "primary": id, "keys": [...]}``
  whose entries hold a key either in clear (``"key"``: base64) or wrapped by an
  AWS KMS symmetric key (``"kms_key_id"`` + ``"ciphertext"``), which is then
  unwrapped at start and never written in clear.

The file is always replaced atomically (temporary file, fsync, rename), so a
crash at any moment leaves either the old or the new keyring, never half of one.
A process re-reads the file when it meets a key id it does not know, so servers
keep working while another process rotates the master key.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from signery.errors import ConfigurationError
from signery.keystores._masterkey import FILE_MODE, MasterKey, read_key_file

FORMAT = "signery-keyring/1"


class KeyWrapper(Protocol):
    """Wraps master keys with an external key (AWS KMS): the file never holds them in clear."""

    def wrap(self, key_id: str, plaintext: bytes) -> bytes: ...

    def unwrap(self, key_id: str, ciphertext: bytes) -> bytes: ...


@dataclass(frozen=True, slots=True)
class KeyringEntry:
    key: MasterKey
    kms_key_id: str | None = None  # wrapped by this KMS key in the file


def _b64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise ConfigurationError(f"keyring: {what} must be a base64 string")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as e:
        raise ConfigurationError(f"keyring: {what} is not valid base64") from e


class KeyringFile:
    """Reads and atomically replaces the master key file."""

    def __init__(self, path: Path, wrapper: KeyWrapper | None = None) -> None:
        self.path = path
        self._wrapper = wrapper

    def exists(self) -> bool:
        return self.path.exists()

    def read(self) -> tuple[str, list[KeyringEntry]]:
        """(primary key id, entries); refuses a file others can read, or a bad one."""
        text = read_key_file(self.path)
        if not text.startswith("{"):
            key = MasterKey.from_base64(text)
            return key.key_id, [KeyringEntry(key)]
        try:
            doc = json.loads(text)
        except ValueError as e:
            raise ConfigurationError(f"master key file {self.path} is not valid JSON") from e
        if (
            not isinstance(doc, dict)
            or doc.get("format") != FORMAT
            or not isinstance(doc.get("keys"), list)
        ):
            raise ConfigurationError(f"master key file {self.path} is not a {FORMAT} keyring")
        entries = [self._entry(raw) for raw in doc["keys"]]
        primary = doc.get("primary")
        if primary not in {e.key.key_id for e in entries}:
            raise ConfigurationError(
                f"master key file {self.path}: the primary key is not in the keyring"
            )
        return str(primary), entries

    def _entry(self, raw: Any) -> KeyringEntry:
        if not isinstance(raw, dict):
            raise ConfigurationError("keyring: each key must be an object")
        if "key" in raw:
            key = MasterKey(_b64(raw["key"], "key"))
            kms_key_id = None
        elif "kms_key_id" in raw and "ciphertext" in raw:
            if self._wrapper is None:
                raise ConfigurationError(
                    "the master key is wrapped by AWS KMS: configure [aws_kms] (region, endpoint)"
                )
            kms_key_id = str(raw["kms_key_id"])
            key = MasterKey(self._wrapper.unwrap(kms_key_id, _b64(raw["ciphertext"], "ciphertext")))
        else:
            raise ConfigurationError(
                "keyring: a key needs either 'key' or 'kms_key_id' + 'ciphertext'"
            )
        if "id" in raw and raw["id"] != key.key_id:
            raise ConfigurationError(f"keyring: key {raw['id']} does not match its own identifier")
        return KeyringEntry(key, kms_key_id)

    def write(self, primary: str, entries: Sequence[KeyringEntry]) -> None:
        """Replace the file atomically with these keys (KMS entries stay wrapped)."""
        keys: list[dict[str, str]] = []
        for entry in entries:
            if entry.kms_key_id is not None:
                if self._wrapper is None:
                    raise ConfigurationError("a KMS-wrapped key needs [aws_kms] to be written")
                wrapped = self._wrapper.wrap(entry.kms_key_id, entry.key.secret_bytes())
                keys.append(
                    {
                        "id": entry.key.key_id,
                        "kms_key_id": entry.kms_key_id,
                        "ciphertext": base64.b64encode(wrapped).decode("ascii"),
                    }
                )
            else:
                keys.append(
                    {
                        "id": entry.key.key_id,
                        "key": base64.b64encode(entry.key.secret_bytes()).decode("ascii"),
                    }
                )
        doc = json.dumps({"format": FORMAT, "primary": primary, "keys": keys}, indent=2) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        try:
            with os.fdopen(fd, "w", encoding="ascii") as f:
                f.write(doc)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)  # the rename itself survives a power loss
            finally:
                os.close(dir_fd)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


class Keyring:
    """The master keys in memory. ``primary`` wraps; any known key unwraps."""

    def __init__(
        self,
        primary: MasterKey,
        others: Iterable[MasterKey] = (),
        source: KeyringFile | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._source = source
        self._set(primary.key_id, [primary, *others])

    @classmethod
    def load(cls, source: KeyringFile) -> Keyring:
        primary_id, entries = source.read()
        keys = {e.key.key_id: e.key for e in entries}
        return cls(keys[primary_id], [k for i, k in keys.items() if i != primary_id], source)

    def _set(self, primary_id: str, keys: Iterable[MasterKey]) -> None:
        by_id = {k.key_id: k for k in keys}
        with self._lock:
            self._primary_id = primary_id
            self._keys = by_id

    @property
    def primary(self) -> MasterKey:
        with self._lock:
            return self._keys[self._primary_id]

    def key_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._keys)

    def get(self, key_id: str) -> MasterKey | None:
        """A known key; an unknown id makes the keyring re-read its file once
        (another process may have rotated the master key meanwhile)."""
        with self._lock:
            found = self._keys.get(key_id)
        if found is None and self.refresh():
            with self._lock:
                found = self._keys.get(key_id)
        return found

    def refresh(self) -> bool:
        """Re-read the file; True when it was read."""
        if self._source is None or not self._source.exists():
            return False
        primary_id, entries = self._source.read()
        self._set(primary_id, [e.key for e in entries])
        return True

    def __repr__(self) -> str:
        return f"Keyring(primary={self._primary_id!r}, keys={self.key_ids()!r})"
