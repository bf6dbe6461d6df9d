"""The one authorization place: subtree semantics, deny by default (property-based)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from signery.protocol import PrincipalType, Role
from signery.server.access.authz import (
    ROLE_PERMISSIONS,
    Allowed,
    Authorizer,
    Binding,
    Denied,
    Permission,
    Principal,
    covers,
    uncovered,
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


# ------------------------------------------------------------------ acting on another's credentials

BINDINGS = st.lists(
    st.tuples(st.sampled_from(list(Role)), st.sampled_from(sorted(PATHS))), max_size=4
)


def subtree(tsg: str) -> list[str]:
    return [path for path in PATHS.values() if path.startswith(PATHS[tsg])]


@given(caller=BINDINGS, role=st.sampled_from(list(Role)), at=st.sampled_from(sorted(PATHS)))
def test_a_role_is_covered_exactly_when_the_caller_could_exercise_it_everywhere_it_reaches(
    caller: list[tuple[Role, str]], role: Role, at: str
) -> None:
    """The oracle is `decide` itself: every permission of the role, on every TSG of
    the subtree the binding reaches, must be allowed to the caller."""
    principal = user(*caller)
    expected = all(
        isinstance(Authorizer().decide(principal, permission, path), Allowed)
        for path in subtree(at)
        for permission in ROLE_PERMISSIONS[role]
    )
    assert covers(principal, role, PATHS[at]) == expected
    decision = Authorizer().decide_binding(principal, role, PATHS[at])
    assert isinstance(decision, Allowed) == expected
    if isinstance(decision, Denied):
        assert decision.reason == "privilege_escalation"


@given(caller=BINDINGS, target=BINDINGS)
def test_acting_on_a_principal_needs_every_one_of_its_bindings_covered(
    caller: list[tuple[Role, str]], target: list[tuple[Role, str]]
) -> None:
    principal, other = user(*caller), user(*target)
    decision = Authorizer().decide_over(principal, other.bindings)
    missing = uncovered(principal, other.bindings)
    assert set(missing) == {b for b in other.bindings if not covers(principal, b.role, b.tsg_path)}
    assert isinstance(decision, Allowed) == (not missing)
    if isinstance(decision, Denied):
        assert decision.reason == "privilege_escalation"
        assert decision.visible, "the target was visible: refused as forbidden, not missing"


@given(target=BINDINGS)
def test_a_superuser_at_the_root_covers_everyone(target: list[tuple[Role, str]]) -> None:
    root = user((Role.SUPERUSER, "1"))
    assert isinstance(Authorizer().decide_over(root, user(*target).bindings), Allowed)


@given(caller=BINDINGS)
def test_everyone_covers_their_own_bindings_and_nobody_covers_more_without_grants(
    caller: list[tuple[Role, str]],
) -> None:
    principal = user(*caller)
    assert isinstance(Authorizer().decide_over(principal, principal.bindings), Allowed)
    nobody = user()
    assert isinstance(Authorizer().decide_over(nobody, principal.bindings), Allowed) == (
        not principal.bindings
    )


@given(a=BINDINGS, b=BINDINGS, c=BINDINGS)
def test_covering_is_transitive(
    a: list[tuple[Role, str]], b: list[tuple[Role, str]], c: list[tuple[Role, str]]
) -> None:
    """Nobody gains reach through a chain of delegations: if A may act on B and B
    on C, then A may act on C."""
    pa, pb, pc = user(*a), user(*b), user(*c)
    authz = Authorizer()
    if isinstance(authz.decide_over(pa, pb.bindings), Allowed) and isinstance(
        authz.decide_over(pb, pc.bindings), Allowed
    ):
        assert isinstance(authz.decide_over(pa, pc.bindings), Allowed)


@given(caller=BINDINGS, extra=BINDINGS, target=BINDINGS)
def test_more_grants_never_cover_less(
    caller: list[tuple[Role, str]], extra: list[tuple[Role, str]], target: list[tuple[Role, str]]
) -> None:
    authz = Authorizer()
    other = user(*target).bindings
    if isinstance(authz.decide_over(user(*caller), other), Allowed):
        assert isinstance(authz.decide_over(user(*caller, *extra), other), Allowed)


def test_the_reported_case_a_subtree_superuser_over_a_root_auditor_and_sibling_key_admin() -> None:
    """Issue 12 item 1: a superuser at 2 does not cover a user who is auditor at the
    root and key_admin at the sibling 3, though that user is homed in 2."""
    local = user((Role.SUPERUSER, "2"))
    target = user((Role.AUDITOR, "1"), (Role.KEY_ADMIN, "3"))
    decision = Authorizer().decide_over(local, target.bindings)
    assert isinstance(decision, Denied)
    assert {b.role for b in uncovered(local, target.bindings)} == {Role.AUDITOR, Role.KEY_ADMIN}
    # Roles the caller could exercise itself, here or below, are covered.
    assert isinstance(
        Authorizer().decide_over(local, user((Role.KEY_ADMIN, "2"), (Role.AUDITOR, "4")).bindings),
        Allowed,
    )
    # A narrower role is covered by a wider one, only where the wider one reaches.
    assert covers(user((Role.KEY_ADMIN, "2")), Role.KEY_VIEWER, "/1/2/5/")
    assert not covers(user((Role.KEY_ADMIN, "2")), Role.KEY_VIEWER, "/1/")
    assert not covers(user((Role.KEY_ADMIN, "2")), Role.AUDITOR, "/1/2/")


@given(caller=BINDINGS, keys=st.lists(st.sampled_from(sorted(PATHS)), max_size=3))
def test_a_key_on_a_named_signer_needs_key_management_of_every_naming_key(
    caller: list[tuple[Role, str]], keys: list[str]
) -> None:
    principal = user(*caller)
    decision = Authorizer().decide_account_key(principal, [PATHS[k] for k in keys])
    expected = all(
        isinstance(Authorizer().decide(principal, Permission.KEY_MANAGE, PATHS[k]), Allowed)
        for k in keys
    )
    assert isinstance(decision, Allowed) == expected
    if isinstance(decision, Denied):
        assert decision.reason == "signer_key_admin_required"


def test_an_account_admin_alone_may_not_re_key_a_named_signer() -> None:
    assert isinstance(Authorizer().decide_account_key(user((Role.ACCOUNT_ADMIN, "2")), []), Allowed)
    denied = Authorizer().decide_account_key(user((Role.ACCOUNT_ADMIN, "2")), ["/1/2/4/"])
    assert isinstance(denied, Denied)
    both = user((Role.ACCOUNT_ADMIN, "2"), (Role.KEY_ADMIN, "4"))
    assert isinstance(Authorizer().decide_account_key(both, ["/1/2/4/"]), Allowed)
    assert isinstance(Authorizer().decide_account_key(both, ["/1/2/4/", "/1/2/5/"]), Denied)
