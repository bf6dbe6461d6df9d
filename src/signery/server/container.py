"""Wiring: builds every service once, with its collaborators passed explicitly."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from alembic.runtime.migration import MigrationContext

from signery.errors import ConfigurationError, SigneryError
from signery.keystores import (
    BuiltinSettings,
    Keyring,
    KeyringFile,
    KeyStoreRegistry,
    KeyWrapper,
    MasterKey,
    open_key_stores,
    open_kms_key_wrapper,
    read_secret_file,
)
from signery.server.access.authz import Authorizer
from signery.server.accounts.service import AccountService
from signery.server.accounts.tokens import AccessTokenCodec, TokenService
from signery.server.approvals.expiry import ApprovalExpiry
from signery.server.approvals.gate import ApprovalGate
from signery.server.approvals.service import ApprovalService
from signery.server.audit.checkpoints import CheckpointService
from signery.server.audit.recorder import AuditRecorder
from signery.server.audit.sinks import (
    Forwarder,
    ForwarderConfig,
    Sink,
    SyslogSink,
    SyslogTarget,
    WebhookSink,
)
from signery.server.ca.revocation import RevocationService
from signery.server.ca.service import BuiltinCa
from signery.server.ca.subject_policy import SubjectPolicyService
from signery.server.config import Settings, metrics_multiprocess_dir
from signery.server.connectors.est_server import EstService
from signery.server.connectors.service import ConnectorService
from signery.server.identity.authn import Authenticator
from signery.server.installation.secrets import access_token_secret
from signery.server.keys.certified import CertifiedKeys, keys_outside_every_policy
from signery.server.keys.lifecycle import KeyLifecycle
from signery.server.keys.policy_reads import keys_naming_signer
from signery.server.keys.policy_service import KeyPolicyService
from signery.server.keys.requests import CertificateRequests
from signery.server.keys.service import KeyService
from signery.server.limits.service import AuthLimits, FailureCounters, LimitsConfig
from signery.server.persistence import meta
from signery.server.persistence.db import Database, make_engine, writer
from signery.server.persistence.migrate import head_revision
from signery.server.reports.service import AuditService
from signery.server.runtime.clock import Clock, SystemClock
from signery.server.runtime.jobs import Job, Scheduler
from signery.server.runtime.metrics import MIN_SCRAPE_TOKEN_CHARS, Metrics, ScrapeToken
from signery.server.signing.service import SigningService
from signery.server.tsa.authority import TsaConfig
from signery.server.tsa.service import TsaService
from signery.server.tsg.service import TsgService
from signery.server.tsg.tree import TsgDirectory
from signery.server.users.service import UserService, password_hasher

log = logging.getLogger("signery.server")


def build_keystores(
    settings: Settings, db: Database, keyring: Keyring, *, optional_stores: bool = True
) -> KeyStoreRegistry:
    """The built-in store, and each optional store the settings enable.

    Optional SDKs are imported only when their store is configured, with an
    install hint when missing; a store that cannot be opened stops the start
    with one clear ConfigurationError (signery.keystores.open_key_stores)."""
    configured: dict[str, object] = {
        BuiltinSettings.kind: BuiltinSettings(db.engine, keyring, write_engine=writer(db.engine))
    }
    if optional_stores:
        configured.update(settings.optional_key_stores())
    return open_key_stores(configured)


def keyring_file(settings: Settings) -> KeyringFile:
    """The master key file, able to unwrap keys wrapped by AWS KMS when [aws_kms] is set."""
    wrapper: KeyWrapper | None = None
    if settings.aws_kms is not None:
        wrapper = open_kms_key_wrapper(settings.aws_kms)
    return KeyringFile(settings.resolved_master_key_file, wrapper)


def load_keyring(settings: Settings) -> Keyring:
    """The master keyring: SIGNERY_MASTER_KEY (one key), or the master key file."""
    if settings.master_key is not None:
        return Keyring(MasterKey.from_base64(settings.master_key.get_secret_value()))
    return Keyring.load(keyring_file(settings))


def load_scrape_token(settings: Settings) -> ScrapeToken:
    """The /metrics scrape token from the settings or its file (mode 0600), if any."""
    if settings.metrics_token_file is not None:
        token = read_secret_file(settings.metrics_token_file, "metrics token file").strip()
    elif settings.metrics_token is not None:
        token = settings.metrics_token.get_secret_value().strip()
    else:
        return ScrapeToken(None)
    if len(token) < MIN_SCRAPE_TOKEN_CHARS:
        raise ConfigurationError(
            f"the metrics token must have at least {MIN_SCRAPE_TOKEN_CHARS} characters "
            "(e.g. `openssl rand -hex 32`)"
        )
    return ScrapeToken(token)


def build_forwarders(settings: Settings, db: Database, clock: Clock) -> list[Forwarder]:
    """One forwarder per configured audit sink (none by default)."""
    sinks: list[Sink] = []
    timeout = settings.audit_sink_timeout_seconds
    if settings.audit_syslog_url is not None:
        target = SyslogTarget.parse(settings.audit_syslog_url)
        sinks.append(
            SyslogSink(target=target, facility=settings.audit_syslog_facility, timeout=timeout)
        )
    if settings.audit_webhook_url is not None:
        token = settings.audit_webhook_token
        sinks.append(
            WebhookSink(
                url=settings.audit_webhook_url,
                token=token.get_secret_value() if token is not None else None,
                timeout=timeout,
                ca_file=settings.audit_webhook_ca_file,
            )
        )
    config = ForwarderConfig(
        poll_seconds=settings.audit_sink_poll_seconds,
        batch_max=settings.audit_sink_batch_max,
        retry_max_seconds=settings.audit_sink_retry_max_seconds,
        lease_seconds=settings.audit_sink_lease_seconds,
        gap_seconds=settings.audit_sink_gap_seconds,
    )
    return [
        Forwarder(db=db, sink=sink, node_id=settings.resolved_node_id, clock=clock, config=config)
        for sink in sinks
    ]


@dataclass
class Core:
    """Collaborators shared by the services (and by `signery init`)."""

    settings: Settings
    db: Database
    clock: Clock
    keyring: Keyring
    keystores: KeyStoreRegistry
    recorder: AuditRecorder
    directory: TsgDirectory
    authz: Authorizer
    ca: BuiltinCa

    @classmethod
    def build(
        cls,
        settings: Settings,
        clock: Clock | None = None,
        master_key: MasterKey | Keyring | None = None,
        *,
        optional_stores: bool = True,
    ) -> Core:
        clock = clock or SystemClock()
        db = Database(make_engine(settings.resolved_database_url, pool_size=settings.db_pool_size))
        if master_key is None:
            keyring = load_keyring(settings)
        elif isinstance(master_key, MasterKey):
            keyring = Keyring(master_key)
        else:
            keyring = master_key
        try:
            keystores = build_keystores(settings, db, keyring, optional_stores=optional_stores)
        except BaseException:
            db.dispose()
            raise
        return cls(
            settings=settings,
            db=db,
            clock=clock,
            keyring=keyring,
            keystores=keystores,
            recorder=AuditRecorder(
                db=db,
                node_id=settings.resolved_node_id,
                clock=clock,
                batch_max=settings.audit_batch_max,
                hash_chain=settings.audit_hash_chain,
                refusal_share=settings.audit_anonymous_refusals,
                refusal_interval=settings.audit_refusal_interval_seconds,
            ),
            directory=TsgDirectory(),
            authz=Authorizer(),
            ca=BuiltinCa(
                db=db,
                keystores=keystores,
                clock=clock,
                max_leaf_validity_days=settings.leaf_max_validity_days,
                storage=settings.ca_storage,
                public_url=settings.public_url,
                crl_validity=timedelta(hours=settings.crl_validity_hours),
            ),
        )

    def users(self) -> UserService:
        return UserService(
            db=self.db,
            authz=self.authz,
            recorder=self.recorder,
            clock=self.clock,
            directory=self.directory,
            hasher=password_hasher(),
            max_token_lifetime_days=self.settings.api_token_max_lifetime_days,
        )


class Services:
    """Everything the HTTP layer calls. Built once per application."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.settings = core.settings
        self.db = core.db
        self.recorder = core.recorder
        installation = self._check_installation()
        self.issuer = core.settings.issuer or installation[meta.ISSUER]
        self.metrics = Metrics(metrics_multiprocess_dir())
        self.scrape_token = load_scrape_token(core.settings)
        codec = AccessTokenCodec(
            secret=access_token_secret(core.db, core.keyring), issuer=self.issuer, clock=core.clock
        )
        self.codec = codec
        self.tsgs = TsgService(
            db=core.db,
            authz=core.authz,
            recorder=core.recorder,
            clock=core.clock,
            directory=core.directory,
        )
        self.subject_policies = SubjectPolicyService(
            db=core.db,
            authz=core.authz,
            recorder=core.recorder,
            clock=core.clock,
            directory=core.directory,
        )
        self.users = core.users()
        self.accounts = AccountService(
            db=core.db,
            authz=core.authz,
            recorder=core.recorder,
            clock=core.clock,
            directory=core.directory,
            signer_keys=keys_naming_signer,
        )
        self.limits = AuthLimits(
            counters=FailureCounters(core.db, core.clock),
            config=LimitsConfig.of(core.settings),
            clock=core.clock,
        )
        self.tokens = TokenService(
            db=core.db,
            recorder=core.recorder,
            clock=core.clock,
            directory=core.directory,
            codec=codec,
            limits=self.limits,
        )
        self.connectors = ConnectorService(
            db=core.db,
            authz=core.authz,
            recorder=core.recorder,
            clock=core.clock,
            directory=core.directory,
            keyring=core.keyring,
            keystores=core.keystores,
            users=CertifiedKeys(),
        )
        requests = CertificateRequests(
            db=core.db,
            recorder=core.recorder,
            clock=core.clock,
            keystores=core.keystores,
            connectors=self.connectors,
        )
        self.keys = KeyService(
            db=core.db,
            authz=core.authz,
            recorder=core.recorder,
            clock=core.clock,
            directory=core.directory,
            keystores=core.keystores,
            ca=core.ca,
            requests=requests,
        )
        self.lifecycle = KeyLifecycle(
            db=core.db,
            recorder=core.recorder,
            clock=core.clock,
            keys=self.keys,
            keystores=core.keystores,
            ca=core.ca,
            requests=requests,
        )
        # Background jobs; each claims its work per key, so every replica runs them.
        self.scheduler = Scheduler(
            clock=core.clock,
            interval_seconds=core.settings.scheduler_interval_seconds,
            jobs=[
                Job("key_rotation", lambda now: self.lifecycle.rotate_due(now).as_dict()),
                Job("key_destruction", lambda now: self.lifecycle.destroy_due(now).as_dict()),
            ],
        )
        self.policies = KeyPolicyService(
            db=core.db, keys=self.keys, recorder=core.recorder, clock=core.clock
        )
        self.est = EstService(
            db=core.db,
            authz=core.authz,
            recorder=core.recorder,
            clock=core.clock,
            directory=core.directory,
            ca=core.ca,
            validity_days=core.settings.est_validity_days,
        )
        self.revocation = RevocationService(
            db=core.db,
            authz=core.authz,
            recorder=core.recorder,
            clock=core.clock,
            directory=core.directory,
            ca=core.ca,
            holders=CertifiedKeys(),
        )
        self.approval_expiry = ApprovalExpiry(
            db=core.db, recorder=core.recorder, directory=core.directory
        )
        self.scheduler.add(Job("approval_expiry", self.approval_expiry.expire_due))
        self.approvals = ApprovalService(
            db=core.db,
            authz=core.authz,
            recorder=core.recorder,
            clock=core.clock,
            directory=core.directory,
            expiry=self.approval_expiry,
        )
        self.approval_gate = ApprovalGate(
            db=core.db, recorder=core.recorder, clock=core.clock, expiry=self.approval_expiry
        )
        self.signing = SigningService(
            db=core.db,
            recorder=core.recorder,
            clock=core.clock,
            keystores=core.keystores,
            metrics=self.metrics,
            approvals=self.approval_gate,
        )
        self.audit = AuditService(core.db, core.authz)
        self.checkpoints = CheckpointService(
            db=core.db,
            authz=core.authz,
            keystores=core.keystores,
            clock=core.clock,
            storage=core.settings.audit_storage or core.settings.ca_storage,
            export_dir=core.settings.audit_checkpoint_dir,
            interval_seconds=core.settings.audit_checkpoint_interval_seconds,
        )
        self.scheduler.add(Job("audit_checkpoints", self.checkpoints.due))
        self.tsa = TsaService(
            db=core.db,
            keystores=core.keystores,
            recorder=core.recorder,
            clock=core.clock,
            config=TsaConfig.of(core.settings),
        )
        self.authn = Authenticator(
            db=core.db,
            directory=core.directory,
            codec=codec,
            clock=core.clock,
            users=self.users,
            limits=self.limits,
        )
        # Audit sinks read the committed trail; signing never waits for them.
        self.sinks = build_forwarders(core.settings, core.db, core.clock)

    def _check_installation(self) -> dict[str, str]:
        """Refuse to serve a database that is not initialized, not migrated, or
        whose key material was wrapped by another master key."""
        try:
            with self.db.engine.connect() as conn:
                current = MigrationContext.configure(conn).get_current_revision()
        except SigneryError:
            raise
        except Exception as e:
            raise ConfigurationError(f"cannot open the database: {type(e).__name__}") from e
        if current is None:
            raise ConfigurationError("the database is empty; run `signery init` first")
        if current != head_revision():
            raise ConfigurationError(
                f"the database schema is at {current}, this server needs {head_revision()}; "
                "run `signery db upgrade`"
            )
        with self.db.read() as s:
            values = meta.read_meta(s)
        if meta.INITIALIZED_AT not in values:
            raise ConfigurationError("the database is not initialized; run `signery init`")
        expected = values.get(meta.MASTER_KEY_ID, "")
        if self.core.keyring.get(expected) is None:
            raise ConfigurationError(
                "the master key does not match this database (keys "
                f"{', '.join(self.core.keyring.key_ids())}, database expects {expected})"
            )
        return values

    def start(self) -> None:
        self._warn_about_keys_outside_every_subject_policy()
        self.recorder.start()
        self.scheduler.start()
        for forwarder in self.sinks:
            forwarder.start()

    def _warn_about_keys_outside_every_subject_policy(self) -> None:
        # After an upgrade: tell the operator at once, not at the first refused
        # renewal or scheduled rotation (docs/security.md, "On upgrade").
        with self.db.read() as s:
            count = keys_outside_every_policy(s)
        if count:
            log.warning(
                "%d keys below the root TSG have built-in CA certificates but no subject "
                "policy covers their TSG: their renewals and rotations are refused until a "
                "superuser at the root sets one (signery tsg subject-policy set; "
                "docs/security.md, On upgrade)",
                count,
                extra={"keys_outside_every_subject_policy": count},
            )

    def stop(self) -> None:
        self.scheduler.stop()
        self.recorder.stop()
        # Events not forwarded yet stay in the table, after the sink's cursor: the
        # next holder of the lease (this replica restarted, or another) sends them.
        for forwarder in self.sinks:
            forwarder.stop()
        self.signing.close()
        self.core.keystores.close()
        self.db.dispose()
