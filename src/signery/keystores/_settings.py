"""Configuration of the optional key stores (embedded in the server's settings).

Plain pydantic models: the server's settings embed them, so they come from the
TOML file (``[aws_kms]``, ``[pkcs11]``) or from the environment with a double
underscore (``SIGNERY_AWS_KMS__REGION``, ``SIGNERY_PKCS11__TOKEN_LABEL``...).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator


class AwsKmsSettings(BaseModel):
    """AWS KMS (store name ``aws-kms``). Credentials come from the standard AWS
    chain (environment, shared files, instance role) unless given here."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    # The key-store kind these settings open (signery.keystores.BACKENDS).
    kind: ClassVar[str] = "aws-kms"

    region: str = Field(description="AWS region, e.g. eu-central-1")
    endpoint_url: str | None = Field(
        default=None, description="Another KMS endpoint (VPC endpoint, or a test double)"
    )
    profile: str | None = Field(default=None, description="Named profile of the AWS config files")
    access_key_id: str | None = None
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None
    deletion_window_days: int = Field(
        default=7, ge=7, le=30, description="Waiting period of ScheduleKeyDeletion"
    )
    alias_prefix: str = Field(default="alias/signery", pattern=r"^alias/[a-zA-Z0-9/_-]+$")
    connect_timeout: float = Field(default=3.0, gt=0, le=60)
    read_timeout: float = Field(default=10.0, gt=0, le=120)
    max_attempts: int = Field(
        default=5, ge=1, le=20, description="Tries of a throttled or timed-out call"
    )

    @model_validator(mode="after")
    def _credentials_pair(self) -> AwsKmsSettings:
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("access_key_id and secret_access_key go together")
        return self


class Pkcs11Settings(BaseModel):
    """A PKCS#11 token (store name ``pkcs11``): an HSM, a smart card, SoftHSM2."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: ClassVar[str] = "pkcs11"

    module: Path = Field(
        description="Path of the PKCS#11 library, e.g. /usr/lib/softhsm/libsofthsm2.so"
    )
    token_label: str = Field(min_length=1, max_length=32)
    pin: SecretStr | None = Field(default=None, description="User PIN (prefer pin_file)")
    pin_file: Path | None = Field(default=None, description="File holding the user PIN")
    sessions: int = Field(default=4, ge=1, le=64, description="Size of the session pool")

    @model_validator(mode="after")
    def _one_pin(self) -> Pkcs11Settings:
        if (self.pin is None) == (self.pin_file is None):
            raise ValueError("give exactly one of pin and pin_file")
        return self
