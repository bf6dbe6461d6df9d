"""Reading, setting and clearing a key's signing policy (management plane).

The stored form and its parsed value are :mod:`signery.server.keys.policy`; the
database reads that resolve names and show them again are
:mod:`signery.server.keys.policy_reads`.
"""

from __future__ import annotations

import json

from sqlalchemy.orm import Session

from signery import protocol as p
from signery.protocol import AuditOutcome
from signery.server.access.authz import Permission, Principal
from signery.server.access.context import RequestContext
from signery.server.audit.events import Actor, AuditRecord, EventKind
from signery.server.audit.recorder import AuditRecorder
from signery.server.keys.models import KeyUsageQuotaRow, SigningKeyRow
from signery.server.keys.policy import TOTAL, KeyPolicy, StoredPolicy, rules_summary, stored_json
from signery.server.keys.policy_reads import resolve_policy, successes, wire_policy
from signery.server.keys.service import KeyService
from signery.server.persistence.db import Database, table, upsert_statement
from signery.server.runtime.clock import Clock


class KeyPolicyService:
    """Reads, sets and clears a key's policy (permission: KEY_MANAGE on the key)."""

    def __init__(
        self, *, db: Database, keys: KeyService, recorder: AuditRecorder, clock: Clock
    ) -> None:
        self._db = db
        self._keys = keys
        self._recorder = recorder
        self._clock = clock

    def get(self, principal: Principal, ref: str, tsg_id: str | None = None) -> p.KeyPolicy | None:
        with self._db.read() as s:
            key = self._keys.resolve(s, principal, ref, Permission.KEY_READ, tsg_id).row
            return wire_policy(s, key)

    def set(
        self,
        principal: Principal,
        ref: str,
        policy: p.KeyPolicy,
        ctx: RequestContext,
        tsg_id: str | None = None,
    ) -> p.KeyPolicy | None:
        """Replace the whole policy; names are resolved and values checked first."""
        with self._db.write() as s:
            resolved = self._keys.resolve(s, principal, ref, Permission.KEY_MANAGE, tsg_id)
            stored = resolve_policy(s, resolved.row, resolved.path, policy)
            self._store(s, principal, resolved.row, resolved.path, stored, ctx)
            return wire_policy(s, resolved.row)

    def clear(
        self, principal: Principal, ref: str, ctx: RequestContext, tsg_id: str | None = None
    ) -> None:
        with self._db.write() as s:
            resolved = self._keys.resolve(s, principal, ref, Permission.KEY_MANAGE, tsg_id)
            self._store(s, principal, resolved.row, resolved.path, None, ctx)

    def _store(
        self,
        s: Session,
        principal: Principal,
        key: SigningKeyRow,
        path: str,
        stored: StoredPolicy | None,
        ctx: RequestContext,
    ) -> None:
        before = KeyPolicy.of(key.policy_json)
        previous = before.stored if before is not None else None
        if (
            stored is not None
            and stored.max_signatures_total is not None
            and (previous is None or previous.max_signatures_total is None)
        ):
            # "At most N in total" counts the signatures the key already made:
            # the total row starts at the key's successes so far.
            s.execute(
                upsert_statement(
                    s.get_bind().dialect.name,
                    table(KeyUsageQuotaRow),
                    key=["key_id", "period"],
                    replace=["used"],
                ),
                {"key_id": key.id, "period": TOTAL, "used": successes(s, key.id)},
            )
        key.policy_json = stored_json(stored) if stored else None
        key.updated_at = self._clock.now()
        s.flush()
        self._recorder.record(
            s,
            AuditRecord(
                EventKind.KEY_POLICY_UPDATED,
                AuditOutcome.SUCCEEDED,
                Actor.of(principal),
                tsg_id=key.tsg_id,
                tsg_path=path,
                key_id=key.id,
                key_version=key.current_version,
                algorithm=key.algorithm,
                context=ctx,
                details={
                    "rules": rules_summary(stored),
                    "previous_rules": rules_summary(previous),
                    "policy": json.loads(key.policy_json) if key.policy_json else None,
                },
            ),
        )
