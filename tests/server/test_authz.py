"""The one authorization place: subtree semantics, deny by default (property-based)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from signery.protocol import PrincipalType, Role
from signery.server.authz import (
    ROLE_PERMISSIONS,
    Allowed,
    Authorizer,
    Binding,
    Denied,
    Permission,
    Principal,
)

# A fixed tree: 1 -> {2 -> {4, 5}, 3 -> {6}}
PATHS = {
    "1": "/1/",
    "2": "/1/2/",
    "3": "/1/3/",
    "4": "/1/2/4/",
    "5": "/1/2/5/",
    "6": "/1/3/6/",
}


def user(*bindings: tuple[Role, str]) -> Principal:
    return Principal(
        PrincipalType.USER,
        "u",
        "u",
        "1",
        "/1/",
        tuple(Binding(role, tsg, PATHS[tsg]) for role, tsg in bindings),
    )


@given(
    role=st.sampled_from(list(Role)),
    at=st.sampled_from(sorted(PATHS)),
    target=st.sampled_from(sorted(PATHS)),
    permission=st.sampled_from(list(Permission)),
)
def test_a_role_grants_exactly_its_permissions_on_its_subtree(
    role: Role, at: str, target: str, permission: Permission
) -> None:
    decision = Authorizer().decide(user((role, at)), permission, PATHS[target])
    in_subtree = PATHS[target].startswith(PATHS[at])
    expected = in_subtree and permission in ROLE_PERMISSIONS[role]
    assert isinstance(decision, Allowed) == expected
    if isinstance(decision, Denied):
        assert decision.visible == in_subtree
        assert decision.reason == ("permission_denied" if in_subtree else "tsg_not_visible")


@given(target=st.sampled_from(sorted(PATHS)), permission=st.sampled_from(list(Permission)))
def test_no_binding_denies_everything(target: str, permission: Permission) -> None:
    assert isinstance(Authorizer().decide(user(), permission, PATHS[target]), Denied)


def test_accounts_only_sign_and_only_in_their_subtree() -> None:
    account = Principal(PrincipalType.ACCOUNT, "a", "a", "2", "/1/2/")
    authz = Authorizer()
    assert isinstance(authz.decide(account, Permission.SIGN, "/1/2/4/"), Allowed)
    assert isinstance(authz.decide(account, Permission.SIGN, "/1/"), Denied)
    assert isinstance(authz.decide(account, Permission.SIGN, "/1/3/"), Denied)
    assert isinstance(authz.decide(account, Permission.KEY_READ, "/1/2/"), Denied)


def test_no_user_role_may_sign() -> None:
    assert all(Permission.SIGN not in perms for perms in ROLE_PERMISSIONS.values())


def test_scopes_are_minimal() -> None:
    principal = user((Role.KEY_VIEWER, "2"), (Role.KEY_ADMIN, "4"), (Role.KEY_VIEWER, "6"))
    assert Authorizer().scopes(principal, Permission.KEY_READ) == ["/1/2/", "/1/3/6/"]
    assert Authorizer().scopes(principal, Permission.KEY_CREATE) == ["/1/2/4/"]


def test_sibling_paths_with_common_prefixes_do_not_leak() -> None:
    """/1/2/ must not match /1/23/ (paths end with a slash for this reason)."""
    principal = Principal(
        PrincipalType.USER, "u", "u", "2", "/1/2/", (Binding(Role.SUPERUSER, "2", "/1/2/"),)
    )
    assert isinstance(Authorizer().decide(principal, Permission.KEY_READ, "/1/23/"), Denied)
