"""Authorization: the one place that decides, denying by default.

A role bound to a principal at a TSG grants its permissions on that TSG and
every descendant, never on ancestors or siblings. A built-in account may sign
with keys in its own TSG's subtree. Everything not granted is denied.

Objects outside everything a principal can see are reported as missing (404),
never as forbidden, so that their existence does not leak across tenants.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from signery.errors import NotFound, PermissionDenied
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
    # hold. Only superusers have it (no narrower role grants it).
    CA_ENROLL = "signery.ca.enroll"
    # Revoking any certificate the built-in CA issued, by serial: an act of the CA
    # itself, so it is checked at the root TSG. Only superusers have it.
    CA_REVOKE = "signery.ca.revoke"
    AUDIT_READ = "signery.audit.read"
    USAGE_READ = "signery.usage.read"
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

    def scopes(self, principal: Principal, permission: Permission) -> list[str]:
        """Subtree paths where ``permission`` is granted, minimal (no path inside another)."""
        paths = sorted({scope for perms, scope in principal.grants() if permission in perms})
        minimal: list[str] = []
        for p in paths:
            if not any(in_subtree(p, m) for m in minimal):
                minimal.append(p)
        return minimal
