"""Key stores: where private keys live. One small interface, one module per backend.

Three kinds of store: ``builtin`` (keys encrypted in Signery's own database under
the master key), ``aws-kms`` (AWS KMS, ``pip install 'signery[aws]'``) and
``pkcs11`` (an HSM or token through its PKCS#11 library,
``pip install 'signery[pkcs11]'``). :data:`BACKENDS` maps each kind to its module,
imported only when a store of that kind is configured; :func:`open_key_stores`
opens the configured stores into the :class:`KeyStoreRegistry` the server's
services look stores up in by name.

Every store can generate a key pair, sign a digest and give a public key
(:class:`KeyStore`); erasing keys, cancelling an erasure and health checks are
optional capabilities (:class:`Destroyable`, :class:`DestroyCancellable`,
:class:`HealthChecked`). This package never imports the server.
"""

from signery.keystores._base import (
    CancellableKeyStore,
    Destroyable,
    DestroyableKeyStore,
    DestroyCancellable,
    GeneratedKey,
    HealthChecked,
    HealthCheckedKeyStore,
    KeyContext,
    KeyHandle,
    KeyStore,
    StoreHealth,
)
from signery.keystores._builtin import METADATA as BUILTIN_METADATA
from signery.keystores._builtin import BuiltinKeyStore, BuiltinSettings
from signery.keystores._files import read_secret_file
from signery.keystores._keyring import Keyring, KeyringEntry, KeyringFile, KeyWrapper
from signery.keystores._masterkey import MasterKey
from signery.keystores._registry import (
    BACKENDS,
    Backend,
    KeyStoreRegistry,
    health_of,
    open_key_stores,
    open_kms_key_wrapper,
)
from signery.keystores._remote_key import remote_private_key
from signery.keystores._settings import AwsKmsSettings, Pkcs11Settings

__all__ = [
    "BACKENDS",
    "BUILTIN_METADATA",
    "AwsKmsSettings",
    "Backend",
    "BuiltinKeyStore",
    "BuiltinSettings",
    "CancellableKeyStore",
    "DestroyCancellable",
    "Destroyable",
    "DestroyableKeyStore",
    "GeneratedKey",
    "HealthChecked",
    "HealthCheckedKeyStore",
    "KeyContext",
    "KeyHandle",
    "KeyStore",
    "KeyStoreRegistry",
    "KeyWrapper",
    "Keyring",
    "KeyringEntry",
    "KeyringFile",
    "MasterKey",
    "Pkcs11Settings",
    "StoreHealth",
    "health_of",
    "open_key_stores",
    "open_kms_key_wrapper",
    "read_secret_file",
    "remote_private_key",
]
