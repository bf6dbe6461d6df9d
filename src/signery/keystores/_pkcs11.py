"""PKCS#11 key store (being written: see issue 3)."""

from __future__ import annotations

from signery.errors import ConfigurationError
from signery.keystores._base import KeyStore
from signery.keystores._settings import Pkcs11Settings


def open_store(settings: Pkcs11Settings) -> KeyStore:
    raise ConfigurationError("the pkcs11 key store is not available in this build yet")
