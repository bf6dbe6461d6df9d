"""Per-key signing policy: its stored form, parsed once into a :class:`KeyPolicy`.

A key administrator sets the policy with names (accounts, users) or ids; every
name is resolved and every value checked when the policy is set
(``signery.server.keys.policy_reads.resolve_policy``), so the stored form
(``signing_keys.policy_json``, :class:`StoredPolicy` as JSON) holds only ids and
already valid values. Everything that reads a key's policy (the signing path,
approvals, the management plane) asks :meth:`KeyPolicy.of`, which parses each
distinct stored string once into one frozen value, kept in one bounded cache: a
changed policy is a new string, so a cached value is never stale. A key without
a policy stores NULL and costs nothing on the signing path.

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
from dataclasses import dataclass
from datetime import datetime, time, timedelta, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, ValidationError

from signery import protocol as p
from signery.cache import BoundedCache
from signery.errors import InvalidPolicy, InvalidRequest, SigneryError
from signery.ids import AccountId
from signery.protocol import Weekday
from signery.server.access.authz import Network, SigningRules, WindowRule

TOTAL = "total"
# Distinct stored policies kept parsed per process (a policy is a few hundred bytes).
POLICY_CACHE_SIZE = 1024
WEEKDAYS: tuple[Weekday, ...] = tuple(Weekday)  # Monday first, like datetime.weekday()


class StoredPolicy(p.KeyPolicy):
    """The stored form: KeyPolicy with every name resolved to an id, and the
    paths of ``signer_tsgs`` (so that evaluating needs no query)."""

    signer_tsg_paths: list[str] | None = Field(default=None, max_length=1000)


@dataclass(frozen=True, slots=True)
class KeyPolicy:
    """A key's stored policy, parsed and checked once: the rules
    ``decide_signing`` evaluates, the approval it requires (None: none), and the
    stored form the management plane shows. Shared by every reader of the same
    stored string (:meth:`of`), so never changed: a new policy is a new value."""

    stored: StoredPolicy
    rules: SigningRules
    approval: p.ApprovalPolicy | None

    @classmethod
    def of(cls, policy_json: str | None) -> KeyPolicy | None:
        """The parsed policy of a key's ``policy_json`` (None for a key without
        one), from the one cache of parsed policies."""
        if not policy_json:
            return None
        return _PARSED.get_or_make(policy_json, cls.parse)

    @classmethod
    def parse(cls, policy_json: str) -> KeyPolicy:
        """Stored JSON -> KeyPolicy. The JSON was validated when it was set; one
        that cannot be read all the same (edited in the database) refuses every
        use of the key: a policy is never skipped (fail closed)."""
        try:
            stored = StoredPolicy.model_validate_json(policy_json)
            return cls(stored, _rules_of(stored), stored.approval)
        except SigneryError:
            raise
        except (ValidationError, ValueError) as e:
            raise InvalidRequest("the key's policy cannot be read") from e

    @property
    def signers(self) -> frozenset[AccountId] | None:
        """The accounts named one by one as signers (None: any account may sign)."""
        return self.rules.signers

    @property
    def min_signing_version(self) -> int | None:
        return self.rules.min_signing_version

    @property
    def zone(self) -> tzinfo:
        """The policy's time zone (its windows and per-day limits count in it)."""
        return self.rules.zone

    @property
    def limited(self) -> bool:
        """Whether it sets a usage limit (total or per day)."""
        return self.rules.limited

    def summary(self) -> list[str]:
        """Which rules it sets (for audit events)."""
        return rules_summary(self.stored)


# One cache for the whole process: parsing is a pure function of an immutable
# string, so the signing path, approvals and the management plane share it.
_PARSED: BoundedCache[str, KeyPolicy] = BoundedCache(POLICY_CACHE_SIZE)


# ------------------------------------------------------------------ parsing


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


def _rules_of(stored: StoredPolicy) -> SigningRules:
    networks: tuple[Network, ...] | None = (
        tuple(ipaddress.ip_network(c) for c in stored.client_ips)
        if stored.client_ips is not None
        else None
    )
    return SigningRules(
        zone=zone_of(stored.timezone),
        signers=(
            frozenset(AccountId(s) for s in stored.signers) if stored.signers is not None else None
        ),
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


def local_day(zone: tzinfo, now: datetime) -> str:
    """The calendar day (YYYY-MM-DD) of ``now`` in ``zone``: the per-day period."""
    return now.astimezone(zone).date().isoformat()


def next_local_midnight(zone: tzinfo, now: datetime) -> datetime:
    """When the next day starts in ``zone`` (the per-day limit resets then)."""
    tomorrow = now.astimezone(zone).date() + timedelta(days=1)
    return datetime.combine(tomorrow, time(0, 0), tzinfo=zone)


# ------------------------------------------------------------------ the stored form


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
