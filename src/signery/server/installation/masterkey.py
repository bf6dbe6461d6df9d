"""`signery keystore rotate-master-key`: re-wrap every data key under a new master key.

Online and crash-safe. The steps, each of which leaves every key usable if the
process is killed right after it:

1. a new master key becomes the primary of the keyring file, the old keys stay
   in it (one atomic file replacement); from now on new keys are wrapped by the
   new key, and servers re-read the file when they meet its id;
2. data keys are re-wrapped one at a time, each in its own transaction (only
   the wrapped DEK changes; the encrypted private key is untouched), and so is
   the access-token secret;
3. the database records the new master key id, with an audit event;
4. the old keys leave the keyring file (another atomic replacement), after a
   last check that nothing is still wrapped by them.

Run again after an interruption, the command finishes the rotation it finds
in progress instead of starting another.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from signery.errors import ConfigurationError
from signery.keystores import BuiltinKeyStore, Keyring, KeyringEntry, MasterKey
from signery.protocol import AuditOutcome
from signery.server.audit.events import SYSTEM, AuditRecord, EventKind
from signery.server.audit.recorder import AuditRecorder
from signery.server.config import Settings
from signery.server.connectors.service import connectors_not_under, rewrap_connector_secrets
from signery.server.container import keyring_file
from signery.server.installation.secrets import rewrap_access_token_secret
from signery.server.persistence import meta
from signery.server.persistence.db import Database, make_engine, writer
from signery.server.runtime.clock import Clock, SystemClock


@dataclass(frozen=True, slots=True)
class RotationReport:
    previous_key_ids: list[str]
    new_key_id: str
    rewrapped: int
    resumed: bool


def rotate_master_key(
    settings: Settings,
    *,
    rate: float | None = None,
    progress: Callable[[int, int], None] | None = None,
    clock: Clock | None = None,
) -> RotationReport:
    """Rotate (or finish rotating) the master key of the installation in ``settings``.

    ``rate`` bounds the re-wrapping to so many data keys per second, so that a
    large installation is rotated without disturbing signing."""
    if settings.master_key is not None:
        raise ConfigurationError(
            "the master key comes from SIGNERY_MASTER_KEY: rotation needs the master key file"
        )
    clock = clock or SystemClock()
    source = keyring_file(settings)
    db = Database(make_engine(settings.resolved_database_url, pool_size=2))
    try:
        with db.read() as s:
            recorded = meta.read_meta(s).get(meta.MASTER_KEY_ID)
        if recorded is None:
            raise ConfigurationError("the database is not initialized; run `signery init` first")
        primary_id, entries = source.read()
        previous = [e.key.key_id for e in entries if e.key.key_id != primary_id]
        resumed = primary_id != recorded or bool(previous)
        if not resumed:
            # Step 1: the new primary, with the old keys kept beside it.
            new = MasterKey.generate()
            source.write(new.key_id, [KeyringEntry(new, settings.master_key_kms_key_id), *entries])
            previous = [e.key.key_id for e in entries]
        keyring = Keyring.load(source)
        store = BuiltinKeyStore(db.engine, keyring, write_engine=writer(db.engine))
        # Step 2: one data key at a time (the built-in store re-wraps its own).
        done = store.rewrap_all(rate=rate, progress=progress)
        rewrap_access_token_secret(db, keyring)
        rewrap_connector_secrets(db, keyring)
        # Step 3: the database follows, with its audit event.
        recorder = AuditRecorder(db=db, node_id="signery-rotate", clock=clock)
        try:
            with db.write() as s:
                meta.write_meta(s, meta.MASTER_KEY_ID, keyring.primary.key_id)
                recorder.record(
                    s,
                    AuditRecord(
                        EventKind.MASTER_KEY_ROTATED,
                        AuditOutcome.SUCCEEDED,
                        SYSTEM,
                        details={
                            "from": previous,
                            "to": keyring.primary.key_id,
                            "rewrapped": done,
                            "resumed": resumed,
                        },
                    ),
                )
        finally:
            recorder.stop()
        # Step 4: retire the old keys, unless something slipped in under one.
        primary_entry = next(e for e in source.read()[1] if e.key.key_id == keyring.primary.key_id)
        source.write(keyring.primary.key_id, [primary_entry])
        if store.material_not_under_primary(1) or connectors_not_under(db, keyring.primary.key_id):
            # A key created with an old primary in the instant before step 1: put
            # the old keys back, and let the next run re-wrap it.
            source.write(keyring.primary.key_id, [primary_entry, *_others(entries, keyring)])
            raise ConfigurationError(
                "a key was created during the rotation; run the rotation again"
            )
        return RotationReport(previous, keyring.primary.key_id, done, resumed)
    finally:
        db.dispose()


def _others(entries: list[KeyringEntry], keyring: Keyring) -> list[KeyringEntry]:
    return [e for e in entries if e.key.key_id != keyring.primary.key_id]
