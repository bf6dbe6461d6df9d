"""AWS KMS key store (being written: see issue 3)."""

from __future__ import annotations

from signery.errors import ConfigurationError
from signery.keystores._base import KeyStore
from signery.keystores._settings import AwsKmsSettings


def open_store(settings: AwsKmsSettings) -> KeyStore:
    raise ConfigurationError("the aws-kms key store is not available in this build yet")
