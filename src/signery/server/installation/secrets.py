"""Secrets of the installation kept in the database, wrapped by the master key.

The key that signs access tokens is shared by every replica and must survive a
master-key rotation (a token issued by one replica is checked by another), so
it is not derived from the master key: it is a random secret, stored wrapped
(AES-256-GCM under the primary master key, bound to its purpose as AAD) in
``server_meta``, and re-wrapped by the rotation like every data key.
"""

from __future__ import annotations

import base64
import json
import secrets

from sqlalchemy.exc import IntegrityError

from signery.errors import ConfigurationError
from signery.keystores import Keyring
from signery.server.persistence.db import Database
from signery.server.persistence.meta import ServerMetaRow

ACCESS_TOKEN_SECRET = "access_token_secret"  # the meta key, not the secret
_AAD = b"signery/access-token-secret/v1"
SECRET_BYTES = 32


def _wrap(keyring: Keyring, secret: bytes) -> str:
    primary = keyring.primary
    return json.dumps(
        {
            "master_key_id": primary.key_id,
            "wrapped": base64.b64encode(primary.encrypt(secret, _AAD)).decode(),
        }
    )


def _unwrap(keyring: Keyring, value: str) -> bytes:
    try:
        doc = json.loads(value)
        master = keyring.get(doc["master_key_id"])
        wrapped = base64.b64decode(doc["wrapped"])
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigurationError("the stored access-token secret is damaged") from e
    if master is None:
        raise ConfigurationError(
            f"the access-token secret is wrapped by master key {doc['master_key_id']}, "
            "which is not in the master key file"
        )
    return master.decrypt(wrapped, _AAD)


def access_token_secret(db: Database, keyring: Keyring) -> bytes:
    """The installation's token-signing secret, created on first use."""
    with db.read() as s:
        row = s.get(ServerMetaRow, ACCESS_TOKEN_SECRET)
        value = row.value if row is not None else None
    if value is None:
        try:
            with db.write() as s:
                s.add(
                    ServerMetaRow(
                        key=ACCESS_TOKEN_SECRET,
                        value=_wrap(keyring, secrets.token_bytes(SECRET_BYTES)),
                    )
                )
        except Exception as e:  # another replica created it first: read theirs
            if not isinstance(e.__cause__, IntegrityError) and not isinstance(e, IntegrityError):
                raise
        with db.read() as s:
            row = s.get(ServerMetaRow, ACCESS_TOKEN_SECRET)
            assert row is not None
            value = row.value
    return _unwrap(keyring, value)


def rewrap_access_token_secret(db: Database, keyring: Keyring) -> bool:
    """Re-wrap the secret under the primary master key (master-key rotation)."""
    with db.write() as s:
        row = s.get(ServerMetaRow, ACCESS_TOKEN_SECRET, with_for_update=True)
        if row is None:
            return False
        doc = json.loads(row.value)
        if doc.get("master_key_id") == keyring.primary.key_id:
            return False
        row.value = _wrap(keyring, _unwrap(keyring, row.value))
    return True
