"""`signery init`: create a new installation, or confirm an existing one.

Creates, in this order: the data directory (0700; an existing one that group
or others may access is refused, see signery.server.installation.datadir), the database schema
(Alembic), the master key file (0600, never overwritten), then in ONE
transaction: the root TSG, the built-in CA's rows (and the time-stamping
authority's), the bootstrap superuser with an API token (living
``api_token_max_lifetime_days``, like any API token), and the installation
facts. Running it again on an initialized installation changes nothing and
prints no secret.
"""

from __future__ import annotations

import logging
import os
import secrets
import uuid
from dataclasses import dataclass

from signery.errors import ConfigurationError
from signery.keystores import (
    Destroyable,
    KeyHandle,
    Keyring,
    KeyringEntry,
    KeyringFile,
    KeyStoreRegistry,
    MasterKey,
)
from signery.protocol import AuditOutcome, PrincipalType, Role
from signery.server.audit.events import SYSTEM, Actor, AuditRecord, EventKind
from signery.server.config import Settings
from signery.server.container import Core, keyring_file, load_keyring
from signery.server.installation.datadir import create_private
from signery.server.persistence import meta, migrate
from signery.server.persistence.db import Database, make_engine
from signery.server.runtime.clock import Clock, SystemClock
from signery.server.tsa.authority import TsaConfig
from signery.server.tsa.provisioning import created_record, provision_at_init
from signery.server.tsg.service import insert_tsg, new_tsg_id
from signery.server.users.service import GENERATED_PASSWORD_BYTES

log = logging.getLogger("signery.init")

ROOT_TSG_NAME = "root"
BOOTSTRAP_TOKEN_NAME = "bootstrap"


@dataclass(frozen=True, slots=True)
class InitResult:
    created: bool
    root_tsg_id: str
    issuer: str
    installation_id: str
    database_url: str
    master_key_id: str
    master_key_file: str | None
    admin_username: str | None = None
    admin_password: str | None = None
    admin_token: str | None = None
    ca_root_subject: str | None = None


def _safe_url(url: str) -> str:
    """The database URL without its password, for display."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparsable URL is refused later with a clear error
        return "<invalid url>"


def initialize(
    settings: Settings,
    *,
    admin_username: str = "admin",
    clock: Clock | None = None,
) -> InitResult:
    clock = clock or SystemClock()
    create_private(settings)

    db = Database(make_engine(settings.resolved_database_url, pool_size=2))
    try:
        migrate.upgrade(db.engine)
        with db.read() as s:
            existing = meta.read_meta(s)
        keyring, key_file = _keyring(settings, initialized=meta.INITIALIZED_AT in existing)
        master_key = keyring.primary
        if meta.INITIALIZED_AT in existing:
            if keyring.get(existing.get(meta.MASTER_KEY_ID, "")) is None:
                raise ConfigurationError(
                    "this database was initialized with another master key; refusing to continue"
                )
            return InitResult(
                created=False,
                root_tsg_id=existing[meta.ROOT_TSG_ID],
                issuer=existing[meta.ISSUER],
                installation_id=existing[meta.INSTALLATION_ID],
                database_url=_safe_url(settings.resolved_database_url),
                master_key_id=master_key.key_id,
                master_key_file=key_file,
            )
        return _create(settings, db, keyring, key_file, admin_username, clock)
    finally:
        db.dispose()


def _keyring(settings: Settings, *, initialized: bool) -> tuple[Keyring, str | None]:
    if settings.master_key is not None:
        return load_keyring(settings), None
    path = settings.resolved_master_key_file
    if path.exists():
        return load_keyring(settings), str(path)
    if initialized:
        # Creating a new key now would orphan every key in the database.
        raise ConfigurationError(
            f"the database is initialized but the master key file {path} is missing; "
            "restore it from backup or set SIGNERY_MASTER_KEY"
        )
    key = MasterKey.generate()
    if settings.master_key_kms_key_id is not None:
        # The file holds only what KMS can unwrap (never the key in clear).
        source = keyring_file(settings)
        source.write(key.key_id, [KeyringEntry(key, settings.master_key_kms_key_id)])
        return Keyring.load(source), str(path)
    key.write_new(path)
    return Keyring(key, source=KeyringFile(path)), str(path)


def _create(
    settings: Settings,
    db: Database,
    keyring: Keyring,
    key_file: str | None,
    admin_username: str,
    clock: Clock,
) -> InitResult:
    # Only the built-in store, unless the CA's keys go elsewhere (ca_storage): init
    # must not need a reachable HSM or KMS (nor log in to one) it does not use.
    core = Core.build(
        settings, clock=clock, master_key=keyring, optional_stores=settings.ca_storage != "builtin"
    )
    master_key = keyring.primary
    try:
        installation_id = str(uuid.uuid4())
        root_tsg_id = new_tsg_id()
        issuer = settings.issuer or settings.public_url or f"urn:signery:{installation_id}"
        created_ca = core.ca.create(
            root_tsg_id=root_tsg_id,
            algorithm=settings.ca_algorithm,
            organization=settings.ca_organization,
            installation=installation_id[:8],
        )
        try:
            # The TSA (RFC 3161), certified by the CA just made; None when its key
            # store is not opened here (then it is made on first use).
            created_tsa = provision_at_init(
                core.keystores,
                clock,
                TsaConfig.of(settings),
                created_ca,
                root_tsg_id=root_tsg_id,
                installation=installation_id[:8],
            )
        except BaseException:
            for handle in created_ca.handles:
                _discard(core.keystores, handle)
            raise
        users = core.users()
        password = secrets.token_urlsafe(GENERATED_PASSWORD_BYTES)
        password_hash = users.hash_password(password)
        try:
            with core.db.write() as s:
                now = clock.now()
                root = insert_tsg(s, ROOT_TSG_NAME, None, now, tsg_id=root_tsg_id)
                s.flush()
                for row in created_ca.rows:
                    s.add(row)
                if created_tsa is not None:
                    s.add(created_tsa.row)
                user = users.insert_user(s, admin_username, password_hash, root.id)
                users.insert_binding(s, user.id, Role.SUPERUSER, root.id)
                token, token_row = users.insert_token(
                    s, user.id, BOOTSTRAP_TOKEN_NAME, users.max_token_lifetime_days
                )
                for key, value in (
                    (meta.INSTALLATION_ID, installation_id),
                    (meta.ISSUER, issuer),
                    (meta.ROOT_TSG_ID, root.id),
                    (meta.MASTER_KEY_ID, master_key.key_id),
                    (meta.INITIALIZED_AT, now.isoformat()),
                ):
                    meta.write_meta(s, key, value)
                admin = Actor(PrincipalType.USER, user.id, user.username)
                for record in (
                    AuditRecord(
                        EventKind.SERVER_INITIALIZED,
                        AuditOutcome.SUCCEEDED,
                        SYSTEM,
                        tsg_id=root.id,
                        tsg_path=root.path,
                        details={
                            "installation_id": installation_id,
                            "issuer": issuer,
                            "node": os.uname().nodename,
                        },
                    ),
                    AuditRecord(
                        EventKind.CA_CREATED,
                        AuditOutcome.SUCCEEDED,
                        SYSTEM,
                        tsg_id=root.id,
                        tsg_path=root.path,
                        algorithm=settings.ca_algorithm.value,
                        details={
                            "root_subject": created_ca.root.subject.rfc4514_string(),
                            "issuing_subject": created_ca.issuing.subject.rfc4514_string(),
                        },
                    ),
                    AuditRecord(
                        EventKind.USER_CREATED,
                        AuditOutcome.SUCCEEDED,
                        SYSTEM,
                        tsg_id=root.id,
                        tsg_path=root.path,
                        details={"user_id": user.id, "username": user.username},
                    ),
                    AuditRecord(
                        EventKind.ROLE_BOUND,
                        AuditOutcome.SUCCEEDED,
                        SYSTEM,
                        tsg_id=root.id,
                        tsg_path=root.path,
                        details={"user_id": user.id, "role": Role.SUPERUSER.value},
                    ),
                    AuditRecord(
                        EventKind.API_TOKEN_CREATED,
                        AuditOutcome.SUCCEEDED,
                        admin,
                        tsg_id=root.id,
                        tsg_path=root.path,
                        details={
                            "token_id": token_row.id,
                            "user_id": user.id,
                            "name": BOOTSTRAP_TOKEN_NAME,
                            "expires_in_days": users.max_token_lifetime_days,
                        },
                    ),
                ):
                    core.recorder.record(s, record)
                if created_tsa is not None:
                    core.recorder.record(s, created_record(created_tsa, root.path, when="init"))
        except BaseException:
            if created_tsa is not None:
                _discard(core.keystores, created_tsa.handle)
            # Each handle in the store that made it (ca_storage may be an HSM or KMS).
            for handle in created_ca.handles:
                _discard(core.keystores, handle)
            raise
        return InitResult(
            created=True,
            root_tsg_id=root_tsg_id,
            issuer=issuer,
            installation_id=installation_id,
            database_url=_safe_url(settings.resolved_database_url),
            master_key_id=master_key.key_id,
            master_key_file=key_file,
            admin_username=admin_username,
            admin_password=password,
            admin_token=token,
            ca_root_subject=created_ca.root.subject.rfc4514_string(),
        )
    finally:
        core.keystores.close()
        core.db.dispose()


def _discard(keystores: KeyStoreRegistry, handle: KeyHandle) -> None:
    """Erase a key pair made by an initialization that failed, if its store can."""
    store = keystores.get(handle.store)
    if isinstance(store, Destroyable):
        store.destroy(handle)
