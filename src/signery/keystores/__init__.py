"""Key stores: where private keys live. One small interface, one module per backend.

Backends register under a kind (``builtin``; ``aws-kms`` and ``pkcs11`` follow)
and are looked up by the name the server's configuration gives them.
"""

from signery.keystores._base import (
    GeneratedKey,
    KeyContext,
    KeyHandle,
    KeyStore,
    StoreHealth,
)
from signery.keystores._builtin import BuiltinKeyStore
from signery.keystores._keyring import Keyring, KeyringEntry, KeyringFile
from signery.keystores._masterkey import MasterKey
from signery.keystores._registry import KeyStoreRegistry
from signery.keystores._remote_key import remote_private_key

__all__ = [
    "BuiltinKeyStore",
    "GeneratedKey",
    "KeyContext",
    "KeyHandle",
    "KeyStore",
    "KeyStoreRegistry",
    "Keyring",
    "KeyringEntry",
    "KeyringFile",
    "MasterKey",
    "StoreHealth",
    "remote_private_key",
]
