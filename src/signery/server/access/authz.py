"""Authorization: the one place that decides, denying by default.

A role bound to a principal at a TSG grants its permissions on that TSG and
every descendant, never on ancestors or siblings. A built-in account may sign
with keys in its own TSG's subtree. Everything not granted is denied.

Objects outside everything a principal can see are reported as missing (404),
never as forbidden, so that their existence does not leak across tenants.

Nobody reaches beyond their own roles through someone else: acting on another
principal's credentials (its API tokens) requires *covering* every role that
principal holds, and a role is granted or removed only by someone who covers it
(:func:`covers`). Covering a role bound at a TSG means holding every one of its
permissions on that TSG, and so on its whole subtree. A superuser at the root
covers everything.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, tzinfo
from enum import StrEnum

from signery.errors import (
    ClientIpNotAllowed,
    KeyNotYetValid,
    KeyValidityEnded,
    NotFound,
    OutsideSigningWindow,
    PermissionDenied,
    PolicyDigestNotAllowed,
    PolicySchemeNotAllowed,
    PrivilegeEscalation,
    SignerKeyAdminRequired,
    SignerNotAllowed,
)
from signery.ids import AccountId
from signery.protocol import PrincipalType, Role


class Permission(StrEnum):
    TSG_READ = "signery.tsg.read"
    TSG_CREATE = "signery.tsg.create"
    USER_READ = "signery.user.read"
    USER_MANAGE = "signery.user.manage"
    ROLE_BINDING_READ = "signery.role_binding.read"
    ROLE_BINDING_MANAGE = "signery.role_binding.manage"
    ACCOUNT_READ = "signery.account.read"
    ACCOUNT_MANAGE = "signery.account.manage"
    KEY_READ = "signery.signing_key.read"
    KEY_CREATE = "signery.signing_key.create"
    KEY_MANAGE = "signery.signing_key.manage"
    CA_CONNECTOR_READ = "signery.ca_connector.read"
    CA_CONNECTOR_MANAGE = "signery.ca_connector.manage"
    # EST enrollment at the built-in CA: a certificate for a key Signery does not
    # hold. Only superusers have it (no narrower role grants it), and it is
    # checked at the root TSG: an act of the CA every tenant trusts.
    CA_ENROLL = "signery.ca.enroll"
    # Revoking any certificate the built-in CA issued, by serial: an act of the CA
    # itself, so it is checked at the root TSG. Only superusers have it.
    CA_REVOKE = "signery.ca.revoke"
    # Setting or clearing a TSG's subject policy (which subjects the built-in CA
    # certifies there): checked at the root TSG, so only superusers there; a
    # subtree's superuser cannot widen what its own subtree may claim.
    CA_SUBJECT_POLICY_MANAGE = "signery.ca.subject_policy.manage"
    AUDIT_READ = "signery.audit.read"
    USAGE_READ = "signery.usage.read"
    # /metrics: counts of the whole installation, so read at the root TSG only.
    METRICS_READ = "signery.metrics.read"
    SIGN = "signery.signing.sign"
    # Approving (or denying) signing requests, and pre-approving signing with a
    # key. Never held by built-in accounts: a machine does not approve itself.
    SIGNING_APPROVE = "signery.signing.approve"


_P = Permission

ROLE_PERMISSIONS: dict[Role, frozenset[Permission]] = {
    # Signing is for built-in accounts: no user role signs, superuser included,
    # so that every signature is attributable to a machine identity.
    Role.SUPERUSER: frozenset(p for p in Permission if p is not _P.SIGN),
    Role.KEY_ADMIN: frozenset(
        {
            _P.TSG_READ,
            _P.KEY_READ,
            _P.KEY_CREATE,
            _P.KEY_MANAGE,
            _P.USAGE_READ,
            _P.CA_CONNECTOR_READ,
        }
    ),
    Role.KEY_VIEWER: frozenset({_P.TSG_READ, _P.KEY_READ}),
    Role.ACCOUNT_ADMIN: frozenset({_P.TSG_READ, _P.ACCOUNT_READ, _P.ACCOUNT_MANAGE}),
    Role.AUDITOR: frozenset(
        {
            _P.TSG_READ,
            _P.AUDIT_READ,
            _P.USAGE_READ,
            _P.METRICS_READ,
            _P.KEY_READ,
            _P.ACCOUNT_READ,
            _P.USER_READ,
            _P.CA_CONNECTOR_READ,
        }
    ),
    Role.APPROVER: frozenset({_P.TSG_READ, _P.KEY_READ, _P.ACCOUNT_READ, _P.SIGNING_APPROVE}),
}

ACCOUNT_PERMISSIONS: frozenset[Permission] = frozenset({_P.SIGN})


@dataclass(frozen=True, slots=True)
class Binding:
    role: Role
    tsg_id: str
    tsg_path: str


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller. Built only by the authenticator, after full validation."""

    type: PrincipalType
    id: str
    name: str
    tsg_id: str
    tsg_path: str
    bindings: tuple[Binding, ...] = field(default=())

    def grants(self) -> list[tuple[frozenset[Permission], str]]:
        """(permissions, subtree path) pairs this principal holds."""
        if self.type is PrincipalType.ACCOUNT:
            return [(ACCOUNT_PERMISSIONS, self.tsg_path)]
        return [(ROLE_PERMISSIONS[b.role], b.tsg_path) for b in self.bindings]


@dataclass(frozen=True, slots=True)
class Allowed:
    allowed: bool = True


@dataclass(frozen=True, slots=True)
class Denied:
    """Why access was refused; the reason code goes into the audit event."""

    reason: str
    visible: bool
    allowed: bool = False


Decision = Allowed | Denied


def in_subtree(path: str, root_path: str) -> bool:
    """True when the TSG at ``path`` is the TSG at ``root_path`` or a descendant."""
    return path.startswith(root_path)


def held_at(principal: Principal, tsg_path: str) -> frozenset[Permission]:
    """Every permission ``principal`` holds on the TSG at ``tsg_path``. Grants reach
    whole subtrees, so these are held on every descendant too."""
    held: set[Permission] = set()
    for permissions, scope in principal.grants():
        if in_subtree(tsg_path, scope):
            held |= permissions
    return frozenset(held)


def covers(principal: Principal, role: Role, tsg_path: str) -> bool:
    """Could ``principal`` exercise ``role`` bound at ``tsg_path`` itself: does it hold
    every permission of the role there (and so everywhere the binding reaches)?
    Several of its bindings may add up to cover one role."""
    return ROLE_PERMISSIONS[role] <= held_at(principal, tsg_path)


def uncovered(principal: Principal, bindings: Iterable[Binding]) -> tuple[Binding, ...]:
    """The ``bindings`` (of another principal) that ``principal`` does not cover."""
    return tuple(b for b in bindings if not covers(principal, b.role, b.tsg_path))


def is_root_path(path: str) -> bool:
    """True for the root TSG's path (``/<id>/``: one segment)."""
    return path.count("/") == 2


class Authorizer:
    """Decides whether a principal may do something to an object in a TSG."""

    def decide(self, principal: Principal, permission: Permission, target_path: str) -> Decision:
        visible = False
        for permissions, scope in principal.grants():
            if in_subtree(target_path, scope):
                visible = True
                if permission in permissions:
                    return Allowed()
        if not visible:
            return Denied("tsg_not_visible", visible=False)
        return Denied("permission_denied", visible=True)

    def require(
        self,
        principal: Principal,
        permission: Permission,
        target_path: str,
        *,
        not_found: type[NotFound] = NotFound,
    ) -> None:
        """Raise unless allowed: NotFound when the target is outside every scope of the
        principal (existence must not leak), PermissionDenied when it is visible."""
        decision = self.decide(principal, permission, target_path)
        if isinstance(decision, Denied):
            if decision.visible:
                raise PermissionDenied(f"{permission.value} is not granted here")
            raise not_found()

    def decide_over(self, principal: Principal, target: Iterable[Binding]) -> Decision:
        """May ``principal`` act on the credentials of a principal bound as ``target``
        (create, list or revoke its API tokens)? Only when it covers every one of
        those bindings: otherwise a token it mints would reach where it cannot.
        The caller must already see the target (else: not found, decided before)."""
        if uncovered(principal, target):
            return Denied(PrivilegeEscalation.code, visible=True)
        return Allowed()

    def decide_binding(self, principal: Principal, role: Role, tsg_path: str) -> Decision:
        """May ``principal`` grant (or remove) ``role`` at ``tsg_path``, beyond holding
        the permission to manage bindings there? Nobody grants a role it could not
        exercise itself, nor removes one it could not have granted."""
        if not covers(principal, role, tsg_path):
            return Denied(PrivilegeEscalation.code, visible=True)
        return Allowed()

    def decide_account_key(self, principal: Principal, signer_of: Iterable[str]) -> Decision:
        """May ``principal``, allowed to manage an account, register a new key on it,
        given the TSG paths of the keys whose policies name that account as a
        signer? A new key lets its holder sign as the account, so each of those
        keys needs ``signing_key.manage`` too (a key admin could name another
        signer anyway); an account no policy names needs nothing more."""
        for path in signer_of:
            if not isinstance(self.decide(principal, Permission.KEY_MANAGE, path), Allowed):
                return Denied(SignerKeyAdminRequired.code, visible=True)
        return Allowed()

    def decide_installation(self, principal: Principal, permission: Permission) -> Decision:
        """For what spans every TSG (the metrics of the whole installation): the
        permission must be held at the root TSG."""
        if any(is_root_path(scope) for scope in self.scopes(principal, permission)):
            return Allowed()
        return Denied("permission_denied", visible=True)

    def scopes(self, principal: Principal, permission: Permission) -> list[str]:
        """Subtree paths where ``permission`` is granted, minimal (no path inside another)."""
        paths = sorted({scope for perms, scope in principal.grants() if permission in perms})
        minimal: list[str] = []
        for p in paths:
            if not any(in_subtree(p, m) for m in minimal):
                minimal.append(p)
        return minimal


# ------------------------------------------------------------------ per-key signing policy

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
MINUTES_PER_DAY = 24 * 60


@dataclass(frozen=True, slots=True)
class WindowRule:
    """Days (0 = Monday) and minutes of the day ``[start, end)`` in the policy's
    zone. ``end < start`` runs across midnight and belongs to the day it starts on."""

    days: frozenset[int]
    start: int
    end: int

    def contains(self, local: datetime) -> bool:
        minute = local.hour * 60 + local.minute
        day = local.weekday()
        if self.start < self.end:
            return day in self.days and self.start <= minute < self.end
        # Across midnight: the evening part on a listed day, or the morning part
        # on the day after a listed day.
        yesterday = (local - timedelta(days=1)).weekday()
        return (day in self.days and minute >= self.start) or (
            yesterday in self.days and minute < self.end
        )


@dataclass(frozen=True, slots=True)
class SigningRules:
    """A key's signing rules, parsed once (signery.server.keys.policy.KeyPolicy);
    ``None`` everywhere means that rule restricts nothing."""

    zone: tzinfo
    signers: frozenset[AccountId] | None = None
    signer_tsg_paths: tuple[str, ...] | None = None
    schemes: frozenset[str] | None = None
    digests: frozenset[str] | None = None
    networks: tuple[Network, ...] | None = None
    windows: tuple[WindowRule, ...] | None = None
    valid_from: datetime | None = None
    valid_until: datetime | None = None
    max_total: int | None = None
    max_per_day: int | None = None
    min_signing_version: int | None = None

    @property
    def limited(self) -> bool:
        return self.max_total is not None or self.max_per_day is not None


@dataclass(frozen=True, slots=True)
class SigningFacts:
    """What a signing request is, for the policy decision."""

    account_id: str
    account_tsg_path: str
    scheme: str
    digest_algorithm: str
    client_ip: str | None
    now: datetime


def _ip_allowed(client_ip: str | None, networks: tuple[Network, ...]) -> bool:
    # Fail closed: a request whose address is unknown or unparsable is outside
    # every allow-list.
    if client_ip is None:
        return False
    try:
        address = ipaddress.ip_address(client_ip)
    except ValueError:
        return False
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [address]
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        # "::ffff:10.0.0.1" from a dual-stack socket is the IPv4 client 10.0.0.1.
        candidates.append(address.ipv4_mapped)
    return any(a in n for a in candidates for n in networks if a.version == n.version)


def decide_signing(rules: SigningRules, facts: SigningFacts) -> Decision:
    """May this signing go ahead under the key's policy? Rules are checked in a
    fixed order (signers, schemes, digests, client IP, time windows, validity);
    the first that refuses names the reason (an error code)."""
    use = KeyUseFacts(facts.account_id, facts.account_tsg_path, facts.client_ip, facts.now)
    signer = _decide_signer(rules, use)
    if isinstance(signer, Denied):
        return signer
    if rules.schemes is not None and facts.scheme not in rules.schemes:
        return Denied(PolicySchemeNotAllowed.code, visible=True)
    if rules.digests is not None and facts.digest_algorithm not in rules.digests:
        return Denied(PolicyDigestNotAllowed.code, visible=True)
    return _decide_where_and_when(rules, use)


@dataclass(frozen=True, slots=True)
class KeyUseFacts:
    """Who would sign, from where and when: what the signing plane's key listing
    knows before any request names a scheme or a digest."""

    account_id: str
    account_tsg_path: str
    client_ip: str | None
    now: datetime


def decide_key_use(rules: SigningRules, facts: KeyUseFacts) -> Decision:
    """Could this account sign with the key now, from this address (the key
    listing's question)? The rules of ``decide_signing`` that do not depend on
    the request, in the same order, with the same reasons."""
    signer = _decide_signer(rules, facts)
    if isinstance(signer, Denied):
        return signer
    return _decide_where_and_when(rules, facts)


def _decide_signer(rules: SigningRules, facts: KeyUseFacts) -> Decision:
    if rules.signers is not None or rules.signer_tsg_paths is not None:
        named = rules.signers is not None and facts.account_id in rules.signers
        in_tsg = rules.signer_tsg_paths is not None and any(
            in_subtree(facts.account_tsg_path, path) for path in rules.signer_tsg_paths
        )
        if not (named or in_tsg):
            return Denied(SignerNotAllowed.code, visible=True)
    return Allowed()


def _decide_where_and_when(rules: SigningRules, facts: KeyUseFacts) -> Decision:
    if rules.networks is not None and not _ip_allowed(facts.client_ip, rules.networks):
        return Denied(ClientIpNotAllowed.code, visible=True)
    if rules.windows is not None:
        local = facts.now.astimezone(rules.zone)
        if not any(w.contains(local) for w in rules.windows):
            return Denied(OutsideSigningWindow.code, visible=True)
    if rules.valid_from is not None and facts.now < rules.valid_from:
        return Denied(KeyNotYetValid.code, visible=True)
    if rules.valid_until is not None and facts.now >= rules.valid_until:
        return Denied(KeyValidityEnded.code, visible=True)
    return Allowed()
