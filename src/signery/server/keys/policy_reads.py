"""What the management plane reads about key policies, in the database.

Setting a policy resolves its names to ids and checks its values
(:func:`resolve_policy`); reading it shows names again (:func:`wire_policy`);
:func:`key_usage` counts what its limits allow, and :func:`keys_naming_signer`
finds the keys that name an account as a signer. The parsed value itself is
:class:`signery.server.keys.policy.KeyPolicy`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from datetime import datetime
from typing import TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from signery import protocol as p
from signery.errors import InvalidPolicy
from signery.ids import AccountId, KeyId
from signery.protocol import KeyStatus
from signery.refs import KeyRef
from signery.server.access.authz import in_subtree
from signery.server.accounts.models import AccountRow
from signery.server.audit.models import UsageCounterRow
from signery.server.keys.models import KeyUsageQuotaRow, SigningKeyRow
from signery.server.keys.policy import TOTAL, KeyPolicy, StoredPolicy, local_day, zone_of
from signery.server.tsg.models import TsgRow
from signery.server.users.models import UserRow

T = TypeVar("T")


def wire_policy(s: Session, key: SigningKeyRow) -> p.KeyPolicy | None:
    """The stored policy with names again (account names, usernames)."""
    policy = KeyPolicy.of(key.policy_json)
    if policy is None:
        return None
    stored = policy.stored
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


def keys_naming_signer(s: Session, account_id: AccountId) -> list[tuple[KeyId, str]]:
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
        policy = KeyPolicy.of(policy_json)
        assert policy is not None  # it contains the account id
        if policy.signers is not None and account_id in policy.signers:
            named.append((KeyId(key_id), path))
    return named


def key_usage(s: Session, key: SigningKeyRow, now: datetime) -> p.KeyUsage | None:
    """Signatures counted against the key's limits (None without limits)."""
    policy = KeyPolicy.of(key.policy_json)
    if policy is None or not policy.limited:
        return None
    day = local_day(policy.zone, now)
    used = dict(
        s.execute(
            select(KeyUsageQuotaRow.period, KeyUsageQuotaRow.used).where(
                KeyUsageQuotaRow.key_id == key.id, KeyUsageQuotaRow.period.in_([TOTAL, day])
            )
        ).all()
    )
    total = used.get(TOTAL)
    if total is None:
        total = successes(s, key.id)
    return p.KeyUsage(total=total, today=used.get(day, 0), day=day)


def successes(s: Session, key_id: str) -> int:
    """The key's successful signatures so far (its usage counter)."""
    found = s.scalar(
        select(UsageCounterRow.successes).where(
            UsageCounterRow.scope == "key", UsageCounterRow.subject_id == key_id
        )
    )
    return int(found or 0)


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
    for text in refs:
        ref = KeyRef.parse(text)
        matches = AccountRow.id == ref.text if ref.is_id else AccountRow.name == ref.name
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
    for text in refs:
        ref = KeyRef.parse(text)
        matches = UserRow.id == ref.text if ref.is_id else UserRow.username == ref.name
        found = s.scalars(select(UserRow.id).where(matches)).all()
        if not found:
            raise InvalidPolicy(f"approval.approvers: no user {ref!r}")
        ids.append(found[0])
    return list(dict.fromkeys(ids))
