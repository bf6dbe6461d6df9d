"""Server settings: the only module of the server that reads the environment.

Sources, highest priority first: explicit overrides (CLI flags), ``SIGNERY_*``
environment variables, a TOML file (``SIGNERY_CONFIG`` or ``--config``), defaults.
"""

from __future__ import annotations

import os
import re
import socket
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from signery.errors import ConfigurationError
from signery.keystores import AwsKmsSettings, Pkcs11Settings
from signery.protocol import Algorithm

ENV_PREFIX = "SIGNERY_"
CONFIG_ENV = "SIGNERY_CONFIG"
DEFAULT_DATA_DIR = Path("signery-data")
# Signery's default TSA policy. An OID under 2.25 is a UUID written as one integer
# (ITU-T X.667 §6.3, RFC 4122 §1): globally unique without a registration, where an
# arc under 1.3.6.1.4.1 needs an IANA Private Enterprise Number Signery does not
# have (a made-up one would squat on another organization's arc). Operators with a
# written TSA policy of their own set its OID in tsa_policy_oid.
DEFAULT_TSA_POLICY_OID = "2.25.170333272617973591476890118894301136840"
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
# prometheus_client's multiprocess mode: set by the supervisor for its workers
# (signery.server.runtime.supervisor), read by prometheus_client when it is imported.
PROMETHEUS_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
OID_RE = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")


class TsaAccess(StrEnum):
    """Who may ask the time-stamping authority for a timestamp."""

    PUBLIC = "public"  # anyone, rate limited per client (like public TSAs)
    AUTHENTICATED = "authenticated"  # an API token or an account's access token
    DISABLED = "disabled"  # POST /api/v1/tsa answers 404


class Settings(BaseSettings):
    """Everything a Signery server can be told. Unknown keys are refused."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        validate_default=True,
    )

    data_dir: Path = Field(
        default=DEFAULT_DATA_DIR, description="Holds the SQLite file and master key"
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL; SQLite file in data_dir when unset. "
        "PostgreSQL: postgresql+psycopg://user@host/db",
    )
    master_key_file: Path | None = Field(
        default=None, description="Defaults to data_dir/master.key"
    )
    master_key: SecretStr | None = Field(
        default=None, description="Base64 master key; takes precedence over master_key_file"
    )

    host: str = "127.0.0.1"
    port: int = Field(default=8800, ge=0, le=65535)
    workers: int = Field(default=1, ge=1, le=64)
    public_url: str | None = Field(default=None, description="URL clients use to reach this server")
    issuer: str | None = Field(
        default=None, description="Audience clients must put in their assertions; set at init"
    )
    node_id: str | None = Field(default=None, description="Name of this replica in audit events")

    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    max_sign_body_bytes: int = Field(default=16 * 1024, ge=512)
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="Peers whose X-Forwarded-For is believed (exact IP addresses)",
    )

    log_level: str = "info"
    access_log: bool = True

    ca_algorithm: Algorithm = Algorithm.EC_P384
    ca_organization: str = "Signery"
    leaf_max_validity_days: int = Field(default=460, ge=1, le=3650)
    ca_storage: str = Field(default="builtin", description="Key store of the built-in CA's keys")
    crl_validity_hours: int = Field(default=168, ge=2, le=24 * 90, description="CRL nextUpdate")

    # RFC 3161 time-stamping authority (POST /api/v1/tsa; signery.server.tsa).
    tsa_policy_oid: str = Field(
        default=DEFAULT_TSA_POLICY_OID,
        description="TSA policy OID written into every timestamp (RFC 3161 §2.4.2 policy)",
    )
    tsa_accuracy_seconds: int = Field(
        default=1, ge=1, le=60, description="Accuracy of genTime (RFC 3161 §2.4.2 accuracy)"
    )
    tsa_rate_limit_per_minute: int = Field(
        default=60,
        ge=1,
        le=1_000_000,
        description="Timestamps per client address (IPv6: per /64) per minute, per process",
    )
    tsa_algorithm: Algorithm = Field(
        default=Algorithm.EC_P256, description="Algorithm of the TSA key, chosen when it is made"
    )
    tsa_storage: str | None = Field(
        default=None, description="Key store of the TSA key (default: ca_storage)"
    )
    tsa_access: TsaAccess = Field(
        default=TsaAccess.PUBLIC,
        description="Who may get timestamps: public (rate limited), authenticated, disabled",
    )

    # What an unauthenticated caller can cost (signery.server.limits, docs/security.md).
    # Failures are counted in the database, so the limits hold across workers and
    # replicas; a window is fixed (it starts at a multiple of its length).
    auth_password_failures_per_user: int = Field(
        default=10,
        ge=1,
        le=100_000,
        description="Failed password sign-ins per username per window, then 429",
    )
    auth_password_failures_per_source: int = Field(
        default=50,
        ge=1,
        le=1_000_000,
        description="Failed password sign-ins per client address (IPv6: /64) per window, then 429",
    )
    auth_password_window_seconds: int = Field(
        default=900, ge=10, le=86_400, description="Window of the password failure limits"
    )
    auth_password_checks_max: int = Field(
        default=2,
        ge=1,
        le=64,
        description="Password verifications (argon2id, 64 MiB each) at once, per process",
    )
    auth_password_check_wait_seconds: float = Field(
        default=5.0,
        ge=0,
        le=60,
        description="How long a sign-in waits for a verification slot before a 429",
    )
    auth_token_failures_per_source: int = Field(
        default=300,
        ge=1,
        le=1_000_000,
        description="Refused token requests per client address (IPv6: /64) per window, then 429",
    )
    auth_token_window_seconds: int = Field(
        default=60, ge=10, le=86_400, description="Window of the token endpoint's failure limit"
    )
    audit_anonymous_refusals: int = Field(
        default=100,
        ge=0,
        le=1_000_000,
        description="Refusals of unauthenticated requests audited one by one per client "
        "address per interval; the rest become one event per reason at its end",
    )
    audit_refusal_interval_seconds: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="Interval of audit_anonymous_refusals, and of the events summing the rest",
    )

    # /metrics (Prometheus) answers only to a scrape token or an auditor at the root TSG.
    metrics_token_file: Path | None = Field(
        default=None, description="File holding the bearer token Prometheus scrapes /metrics with"
    )
    metrics_token: SecretStr | None = Field(
        default=None, description="The scrape token itself, instead of metrics_token_file"
    )

    aws_kms: AwsKmsSettings | None = Field(
        default=None, description="Enables the aws-kms key store ([aws_kms] / SIGNERY_AWS_KMS__*)"
    )
    pkcs11: Pkcs11Settings | None = Field(
        default=None, description="Enables the pkcs11 key store ([pkcs11] / SIGNERY_PKCS11__*)"
    )
    master_key_kms_key_id: str | None = Field(
        default=None,
        description="Wrap the master key with this AWS KMS symmetric key (needs [aws_kms])",
    )

    db_pool_size: int = Field(default=10, ge=1, le=200)
    audit_batch_max: int = Field(default=512, ge=1, le=10_000)
    audit_hash_chain: bool = Field(
        default=True,
        description="Hash-chain audit events (turn off only to measure its cost in a benchmark)",
    )
    audit_storage: str | None = Field(
        default=None, description="Key store of the audit checkpoint key (default: ca_storage)"
    )
    audit_checkpoint_interval_seconds: int = Field(
        default=300,
        ge=0,
        le=86_400,
        description="Seconds between signed checkpoints of a moved chain head (0: on demand only)",
    )
    audit_checkpoint_dir: Path | None = Field(
        default=None,
        description="Also write each signed checkpoint here as <node>-<seq>.json (outside the DB)",
    )
    jti_retention_seconds: int = Field(default=3600, ge=600)
    api_token_max_lifetime_days: int = Field(
        default=90,
        ge=1,
        le=3650,
        description="Longest life of a user's API token (also the life of one asked for "
        "without expires_in_days, and of the bootstrap token made by signery init)",
    )
    scheduler_interval_seconds: int = Field(
        default=30,
        ge=0,
        le=3600,
        description="Seconds between runs of scheduled rotations and destructions (0: never)",
    )

    # Audit sinks (signery.server.audit.sinks): each event forwarded, at least once.
    audit_syslog_url: str | None = Field(
        default=None,
        description="Forward audit events to syslog (RFC 5424): tcp://host:514 or udp://host:514",
    )
    audit_syslog_facility: int = Field(
        default=13, ge=0, le=23, description="Syslog facility (13: log audit, RFC 5424 §6.2.1)"
    )
    audit_webhook_url: str | None = Field(
        default=None,
        description="POST audit events as JSON to this URL (https; http only to loopback)",
    )
    audit_webhook_token: SecretStr | None = Field(
        default=None, description="Bearer token sent to audit_webhook_url"
    )
    audit_webhook_ca_file: Path | None = Field(
        default=None, description="Extra CA certificates (PEM) trusted for audit_webhook_url"
    )
    audit_sink_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    audit_sink_poll_seconds: float = Field(
        default=1.0, gt=0, le=300, description="How often a sink looks for new events"
    )
    audit_sink_batch_max: int = Field(default=100, ge=1, le=10_000)
    audit_sink_retry_max_seconds: float = Field(
        default=60.0, gt=0, le=3600, description="Longest pause between retries to a sink"
    )
    audit_sink_lease_seconds: float = Field(
        default=30.0, gt=0, le=3600, description="A replica's hold on a sink, renewed while alive"
    )
    audit_sink_gap_seconds: float = Field(
        default=30.0,
        ge=0,
        le=3600,
        description=(
            "How long later events wait, in order, for an event number whose transaction"
            " is still open; then they go out and the number is sent when it commits"
        ),
    )

    # HTTPS for `signery serve` (EST, RFC 7030 §3.3, requires it).
    tls_cert_file: Path | None = Field(
        default=None, description="Serve HTTPS: certificate chain file (PEM), leaf first"
    )
    tls_key_file: Path | None = Field(default=None, description="Private key of tls_cert_file")
    tls_client_ca_file: Path | None = Field(
        default=None, description="Require TLS client certificates issued by these CAs (PEM)"
    )
    est_validity_days: int = Field(
        default=365,
        ge=1,
        le=3650,
        description="Validity of certificates issued over EST (capped by leaf_max_validity_days)",
    )

    def optional_key_stores(self) -> dict[str, AwsKmsSettings | Pkcs11Settings]:
        """The settings of each optional key store that is enabled, by store kind
        (what signery.keystores.open_key_stores opens)."""
        return {s.kind: s for s in (self.aws_kms, self.pkcs11) if s is not None}

    @model_validator(mode="after")
    def _kms_master_key(self) -> Settings:
        if self.master_key_kms_key_id is not None and self.aws_kms is None:
            raise ValueError(
                "master_key_kms_key_id needs the [aws_kms] settings (region, endpoint)"
            )
        return self

    @model_validator(mode="after")
    def _tls_files(self) -> Settings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file needs tls_cert_file and tls_key_file")
        return self

    @model_validator(mode="after")
    def _metrics_token(self) -> Settings:
        if self.metrics_token is not None and self.metrics_token_file is not None:
            raise ValueError("set metrics_token or metrics_token_file, not both")
        return self

    @field_validator("audit_syslog_url")
    @classmethod
    def _syslog_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parts = urlsplit(v)
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError as e:
            raise ValueError("audit_syslog_url has an invalid port") from e
        if parts.scheme not in ("tcp", "udp") or not parts.hostname or parts.path not in ("", "/"):
            raise ValueError("audit_syslog_url must look like tcp://host:514 or udp://host:514")
        return v

    @field_validator("audit_webhook_url")
    @classmethod
    def _webhook_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parts = urlsplit(v)
        if parts.scheme == "https" and parts.hostname:
            return v
        # Plain HTTP would expose the events and the token on the network; allowed
        # only to this machine (a local relay, tests).
        if parts.scheme == "http" and parts.hostname in LOOPBACK_HOSTS:
            return v
        raise ValueError("audit_webhook_url must be https:// (http:// only to localhost)")

    @field_validator("tsa_policy_oid")
    @classmethod
    def _policy_oid(cls, v: str) -> str:
        arcs = v.split(".")
        # X.660 §A.4: under the roots 0 and 1 the second arc is at most 39.
        if not OID_RE.fullmatch(v) or len(v) > 200 or (arcs[0] != "2" and int(arcs[1]) > 39):
            raise ValueError("tsa_policy_oid must be a dotted object identifier such as 2.25.1")
        return v

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        if v.lower() not in {"debug", "info", "warning", "error", "critical"}:
            raise ValueError("log_level must be debug, info, warning, error or critical")
        return v.lower()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file named by load_settings() (model_config["toml_file"]) ranks
        # below the environment, so an operator can override one value per replica.
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))

    # ------------------------------------------------------------ derived values

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'signery.db').resolve()}"

    @property
    def resolved_master_key_file(self) -> Path:
        return self.master_key_file or self.data_dir / "master.key"

    @property
    def resolved_node_id(self) -> str:
        return self.node_id or f"{socket.gethostname()}:{os.getpid()}"


def metrics_multiprocess_dir() -> Path | None:
    """The directory every worker counts its metrics in, when this process is one
    of several workers (prometheus_client multiprocess mode), else None."""
    value = os.environ.get(PROMETHEUS_MULTIPROC_ENV)
    return Path(value) if value else None


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build settings from overrides, the environment and an optional TOML file.

    Raises ConfigurationError with every problem listed, never a traceback.
    """
    from pydantic import ValidationError

    if config_file is None and os.environ.get(CONFIG_ENV):
        config_file = Path(os.environ[CONFIG_ENV])
    settings_cls: type[Settings] = Settings
    if config_file is not None:
        if not config_file.is_file():
            raise ConfigurationError(f"config file {config_file} does not exist")
        settings_cls = type(
            "Settings",
            (Settings,),
            {"model_config": {**Settings.model_config, "toml_file": config_file}},
        )
    clean = {k: v for k, v in overrides.items() if v is not None}
    try:
        return settings_cls(**clean)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}"
            for err in e.errors()
        )
        raise ConfigurationError(f"invalid settings: {problems}") from e
    except (OSError, ValueError) as e:
        raise ConfigurationError(f"cannot read settings: {e}") from e
