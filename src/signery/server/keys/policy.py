"""Per-key signing policy: its stored form, its resolution at set time, its parsing.

A key administrator sets the policy with names (accounts, users) or ids; every
name is resolved and every value checked when the policy is set, so the stored
form (``signing_keys.policy_json``, :class:`StoredPolicy` as JSON) holds only
ids and already valid values, and the signing path only parses it (once per
distinct JSON string, :class:`RulesCache`) into the
:class:`signery.server.access.authz.SigningRules` that ``decide_signing`` evaluates.
A key without a policy stores NULL and costs nothing on the signing path.

The stored form keeps the field names of :class:`signery.protocol.KeyPolicy`:
``signers`` = account ids, ``signer_tsgs`` = TSG ids (with their paths in
``signer_tsg_paths``), ``approval.approvers`` = user ids, and
``min_signing_version`` at the top level. Reading a policy shows names again;
ids of accounts or users deleted since show as ids.

Usage limits: ``max_signatures_total`` counts the key's past signatures too
(the ``total`` quota row is seeded from the key's usage counter when the limit
is first set); ``max_signatures_per_day`` counts from the moment it is set, per
calendar day in the policy's time zone.
"""

from __future__ import annotations

import ipaddress
import json
import threading
from collections import OrderedDict
from collections.abc import Iterable
from datetime import datetime, time, timedelta, tzinfo
from typing import TYPE_CHECKING, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from signery import protocol as p
from signery.errors import InvalidPolicy
from signery.protocol import AuditOutcome, KeyStatus, Weekday
from signery.server.access.authz import (
    Network,
    Permission,
    Principal,
    SigningRules,
    WindowRule,
    in_subtree,
)
from signery.server.access.context import RequestContext
from signery.server.accounts.models import AccountRow
from signery.server.audit.events import Actor, AuditRecord, EventKind
from signery.server.audit.models import UsageCounterRow
from signery.server.audit.recorder import AuditRecorder
from signery.server.keys.models import KeyUsageQuotaRow, SigningKeyRow
from signery.server.persistence.db import Database, table, upsert_statement
from signery.server.runtime.clock import Clock
from signery.server.tsg.models import TsgRow
from signery.server.tsg.tree import UUID_RE
from signery.server.users.models import UserRow

if TYPE_CHECKING:
    from signery.server.keys.service import KeyService

T = TypeVar("T")
TOTAL = "total"
RULES_CACHE_SIZE = 1024
WEEKDAYS: tuple[Weekday, ...] = tuple(Weekday)  # Monday first, like datetime.weekday()


class StoredPolicy(p.KeyPolicy):
    """The stored form: KeyPolicy with every name resolved to an id, and the
    paths of ``signer_tsgs`` (so that evaluating needs no query)."""

    signer_tsg_paths: list[str] | None = Field(default=None, max_length=1000)


# ------------------------------------------------------------------ parsing (signing path)


def zone_of(name: str) -> tzinfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidPolicy(f"timezone {name!r} is not an IANA time zone") from None


def minutes(hhmm: str) -> int:
    hours, mins = hhmm.split(":")
    return int(hours) * 60 + int(mins)


def _window(w: p.TimeWindow) -> WindowRule:
    return WindowRule(
        frozenset(WEEKDAYS.index(d) for d in w.days), minutes(w.start), minutes(w.end)
    )


def _aware(value: datetime | None) -> datetime | None:
    return value if value is None or value.tzinfo is not None else None


def rules_of(policy_json: str) -> SigningRules:
    """Stored JSON -> SigningRules (the JSON was validated when it was set)."""
    stored = StoredPolicy.model_validate_json(policy_json)
    networks: tuple[Network, ...] | None = (
        tuple(ipaddress.ip_network(c) for c in stored.client_ips)
        if stored.client_ips is not None
        else None
    )
    return SigningRules(
        zone=zone_of(stored.timezone),
        signers=frozenset(stored.signers) if stored.signers is not None else None,
        signer_tsg_paths=(
            tuple(stored.signer_tsg_paths) if stored.signer_tsg_paths is not None else None
        ),
        schemes=(
            frozenset(s.value for s in stored.allowed_schemes)
            if stored.allowed_schemes is not None
            else None
        ),
        digests=(
            frozenset(d.value for d in stored.allowed_digests)
            if stored.allowed_digests is not None
            else None
        ),
        networks=networks,
        windows=(
            tuple(_window(w) for w in stored.time_windows)
            if stored.time_windows is not None
            else None
        ),
        valid_from=_aware(stored.valid_from),
        valid_until=_aware(stored.valid_until),
        max_total=stored.max_signatures_total,
        max_per_day=stored.max_signatures_per_day,
        min_signing_version=stored.min_signing_version,
    )


class RulesCache:
    """Parsed rules per distinct stored JSON string (LRU): a key's policy is
    parsed once, not on every signing; a changed policy is a new string."""

    def __init__(self, size: int = RULES_CACHE_SIZE) -> None:
        self._size = size
        self._rules: OrderedDict[str, SigningRules] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, policy_json: str) -> SigningRules:
        with self._lock:
            rules = self._rules.get(policy_json)
            if rules is not None:
                self._rules.move_to_end(policy_json)
                return rules
        rules = rules_of(policy_json)
        with self._lock:
            self._rules[policy_json] = rules
            while len(self._rules) > self._size:
                self._rules.popitem(last=False)
        return rules


def local_day(zone: tzinfo, now: datetime) -> str:
    """The calendar day (YYYY-MM-DD) of ``now`` in ``zone``: the per-day period."""
    return now.astimezone(zone).date().isoformat()


def next_local_midnight(zone: tzinfo, now: datetime) -> datetime:
    """When the next day starts in ``zone`` (the per-day limit resets then)."""
    tomorrow = now.astimezone(zone).date() + timedelta(days=1)
    return datetime.combine(tomorrow, time(0, 0), tzinfo=zone)


# ------------------------------------------------------------------ reading (management plane)


def stored_policy(key: SigningKeyRow) -> StoredPolicy | None:
    return StoredPolicy.model_validate_json(key.policy_json) if key.policy_json else None


def wire_policy(s: Session, key: SigningKeyRow) -> p.KeyPolicy | None:
    """The stored policy with names again (account names, usernames)."""
    stored = stored_policy(key)
    if stored is None:
        return None
    signers = None
    if stored.signers is not None:
        names = dict(
            s.execute(
                select(AccountRow.id, AccountRow.name).where(AccountRow.id.in_(stored.signers))
            ).all()
        )
        signers = [names.get(i, i) for i in stored.signers]
    approval = stored.approval
    if approval is not None and approval.approvers:
        users = dict(
            s.execute(
                select(UserRow.id, UserRow.username).where(UserRow.id.in_(approval.approvers))
            ).all()
        )
        approval = approval.model_copy(
            update={"approvers": [users.get(i, i) for i in approval.approvers]}
        )
    data = stored.model_dump(exclude={"signer_tsg_paths"})
    data.update(signers=signers, approval=approval)
    return p.KeyPolicy.model_validate(data)


def keys_naming_signer(s: Session, account_id: str) -> list[tuple[str, str]]:
    """(key id, key TSG path) of every key not destroyed whose policy names the
    account one by one in ``signers``. (A ``signer_tsgs`` rule names a TSG, not
    this account: it lets any account there sign, including new ones.)"""
    rows = s.execute(
        select(SigningKeyRow.id, SigningKeyRow.policy_json, TsgRow.path)
        .join(TsgRow, TsgRow.id == SigningKeyRow.tsg_id)
        .where(
            # Stored policies hold ids, never names: the account id appears in the
            # JSON of every policy naming it (and perhaps of others; parsed below).
            SigningKeyRow.policy_json.contains(account_id, autoescape=True),
            SigningKeyRow.status != KeyStatus.DESTROYED.value,
        )
        .order_by(SigningKeyRow.id)
    ).all()
    named = []
    for key_id, policy_json, path in rows:
        assert policy_json is not None  # it contains the account id
        signers = StoredPolicy.model_validate_json(policy_json).signers
        if signers is not None and account_id in signers:
            named.append((key_id, path))
    return named


def key_usage(s: Session, key: SigningKeyRow, now: datetime) -> p.KeyUsage | None:
    """Signatures counted against the key's limits (None without limits)."""
    stored = stored_policy(key)
    if stored is None or (
        stored.max_signatures_total is None and stored.max_signatures_per_day is None
    ):
        return None
    day = local_day(zone_of(stored.timezone), now)
    used = dict(
        s.execute(
            select(KeyUsageQuotaRow.period, KeyUsageQuotaRow.used).where(
                KeyUsageQuotaRow.key_id == key.id, KeyUsageQuotaRow.period.in_([TOTAL, day])
            )
        ).all()
    )
    total = used.get(TOTAL)
    if total is None:
        total = _successes(s, key.id)
    return p.KeyUsage(total=total, today=used.get(day, 0), day=day)


def _successes(s: Session, key_id: str) -> int:
    found = s.scalar(
        select(UsageCounterRow.successes).where(
            UsageCounterRow.scope == "key", UsageCounterRow.subject_id == key_id
        )
    )
    return int(found or 0)


def stored_json(stored: StoredPolicy) -> str:
    """The JSON stored for a policy: rules it does not set are left out (they
    default to None), nested values kept as they are (``approval.grant_max_uses``
    null means unlimited, not the default of 1)."""
    data = {k: v for k, v in stored.model_dump(mode="json").items() if v is not None}
    return json.dumps(data, separators=(",", ":"))


def rules_summary(stored: StoredPolicy | None) -> list[str]:
    """Which rules a policy sets (for audit events)."""
    if stored is None:
        return []
    return sorted(stored.model_dump(exclude_none=True, exclude={"timezone", "signer_tsg_paths"}))


# ------------------------------------------------------------------ setting (management plane)


class KeyPolicyService:
    """Reads, sets and clears a key's policy (permission: KEY_MANAGE on the key)."""

    def __init__(
        self, db: Database, keys: KeyService, recorder: AuditRecorder, clock: Clock
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
        previous = stored_policy(key)
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
                {"key_id": key.id, "period": TOTAL, "used": _successes(s, key.id)},
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


def resolve_policy(
    s: Session, key: SigningKeyRow, key_path: str, policy: p.KeyPolicy
) -> StoredPolicy | None:
    """Check every value and resolve every name of ``policy`` for ``key``; None
    when the policy restricts nothing (stored as NULL)."""
    if not policy.model_dump(exclude_defaults=True):
        return None
    zone_of(policy.timezone)
    signers = _signers(s, key_path, policy.signers) if policy.signers is not None else None
    signer_tsgs, signer_paths = (
        _signer_tsgs(s, key_path, policy.signer_tsgs)
        if policy.signer_tsgs is not None
        else (None, None)
    )
    client_ips = _networks(policy.client_ips) if policy.client_ips is not None else None
    for i, w in enumerate(policy.time_windows or []):
        if w.start == w.end:
            raise InvalidPolicy(
                f"time_windows[{i}]: start and end are both {w.start}; the window is empty"
            )
    for name, value in (("valid_from", policy.valid_from), ("valid_until", policy.valid_until)):
        if value is not None and value.tzinfo is None:
            raise InvalidPolicy(f"{name} must include a UTC offset (e.g. 2026-01-01T00:00:00Z)")
    if (
        policy.valid_from is not None
        and policy.valid_until is not None
        and policy.valid_from >= policy.valid_until
    ):
        raise InvalidPolicy("valid_from must be before valid_until")
    if policy.min_signing_version is not None and policy.min_signing_version > key.current_version:
        raise InvalidPolicy(
            f"min_signing_version {policy.min_signing_version} is above the key's current "
            f"version {key.current_version}"
        )
    approval = policy.approval
    if approval is not None and approval.approvers:
        approvers = _users(s, approval.approvers)
        if approval.required > len(approvers):
            raise InvalidPolicy(
                f"approval.required is {approval.required} but only {len(approvers)} "
                "approvers are listed"
            )
        approval = approval.model_copy(update={"approvers": approvers})
    data = policy.model_dump()
    data.update(
        signers=signers,
        signer_tsgs=signer_tsgs,
        signer_tsg_paths=signer_paths,
        client_ips=client_ips,
        approval=approval.model_dump() if approval is not None else None,
        allowed_schemes=_unique(policy.allowed_schemes),
        allowed_digests=_unique(policy.allowed_digests),
    )
    return StoredPolicy.model_validate(data)


def _unique(values: Iterable[T] | None) -> list[T] | None:
    return list(dict.fromkeys(values)) if values is not None else None


def _signers(s: Session, key_path: str, refs: list[str]) -> list[str]:
    """Built-in accounts by name or id, among those the TSG boundary already lets
    use the key: an account reaches the keys of its TSG's subtree, so only
    accounts in the key's TSG or above it can sign with it. An account elsewhere
    cannot be named (and the answer does not say whether it exists)."""
    ids: list[str] = []
    for ref in refs:
        matches = AccountRow.id == ref if UUID_RE.match(ref) else AccountRow.name == ref
        found = s.execute(
            select(AccountRow.id, AccountRow.tsg_id, TsgRow.path)
            .join(TsgRow, TsgRow.id == AccountRow.tsg_id)
            .where(matches)
            # Locked until the policy commits: a key being added to the account at
            # the same moment (AccountService.add_key locks it too) either sees
            # this policy, or is registered before the account is named.
            .with_for_update(of=AccountRow)
        ).all()
        inside = [(i, t) for i, t, path in found if in_subtree(key_path, path)]
        if not inside:
            raise InvalidPolicy(
                f"signers: no built-in account {ref!r} that can reach the key (in the key's "
                "TSG or a TSG above it)"
            )
        if len(inside) > 1:
            raise InvalidPolicy(
                f"signers: {len(inside)} accounts named {ref!r} can reach the key "
                f"(TSGs {', '.join(sorted(t for _, t in inside))}); name it by its id",
                candidates=[{"id": i, "tsg_id": t} for i, t in inside],
            )
        ids.append(inside[0][0])
    return list(dict.fromkeys(ids))


def _signer_tsgs(s: Session, key_path: str, refs: list[str]) -> tuple[list[str], list[str]]:
    """TSGs whose subtrees may sign: each must contain the key (the key's TSG or
    a TSG above it), as accounts elsewhere cannot reach the key at all. Naming
    ``org/team`` for a key in ``org/team/build`` lets the accounts of team and
    build sign, and not those of org."""
    ids, paths = [], []
    for ref in dict.fromkeys(refs):
        path = s.scalar(select(TsgRow.path).where(TsgRow.id == ref))
        if path is None or not in_subtree(key_path, path):
            raise InvalidPolicy(f"signer_tsgs: {ref!r} is neither the key's TSG nor a TSG above it")
        ids.append(ref)
        paths.append(path)
    return ids, paths


def _networks(values: list[str]) -> list[str]:
    out = []
    for value in values:
        try:
            # strict: "10.0.0.1/8" (host bits set) is refused, not silently widened.
            out.append(str(ipaddress.ip_network(value.strip(), strict=True)))
        except ValueError as e:
            raise InvalidPolicy(f"client_ips: {value!r} is not a CIDR range ({e})") from None
    return list(dict.fromkeys(out))


def _users(s: Session, refs: list[str]) -> list[str]:
    ids = []
    for ref in refs:
        matches = UserRow.id == ref if UUID_RE.match(ref) else UserRow.username == ref
        found = s.scalars(select(UserRow.id).where(matches)).all()
        if not found:
            raise InvalidPolicy(f"approval.approvers: no user {ref!r}")
        ids.append(found[0])
    return list(dict.fromkeys(ids))
