"""AWS KMS key store (being written: see issue 3)."""

from __future__ import annotations

from signery.errors import ConfigurationError
from signery.keystores._base import KeyStore
from signery.keystores._settings import AwsKmsSettings


class AwsKmsKeyStore(KeyStore):
    kind = "aws-kms"

    def __init__(self, settings: AwsKmsSettings) -> None:
        raise ConfigurationError("the aws-kms key store is not available in this build yet")
