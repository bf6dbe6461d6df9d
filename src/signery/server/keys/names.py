"""How a key name resolves on the signing plane, and which names a TSG may take.

An account sees the keys of its TSG's whole subtree, and a key's name is unique
only within its TSG, so one name can mean several keys. It resolves to the
**nearest** one: a key in the account's own TSG first, then in its children,
then grandchildren... Only keys at the same depth are ambiguous (409
``key_name_ambiguous``: the account names the key by id).

So that an administrator below can never silently redirect the signing of an
account above, a key named N is refused in TSG T (409 ``key_name_shadows``) when
some TSG A on the path from the root down to T (T included) has keys named N in
its subtree and every one of them is deeper than T: A's accounts resolve N to
one of those keys today, and would resolve it to the new key instead. A key
below or beside the nearest one changes nothing for anyone above (a key at the
same depth as theirs makes the name ambiguous for their common ancestor, which
is an explicit refusal, never a different key), and sibling TSGs stay free to
choose their names.

The refusal tells the creator that a key of that name exists somewhere in the
subtree of a TSG above, without saying where or which: the price of never
redirecting a signing. TSGs never move and keys are never renamed, so creation
is the only place a name can appear.

The management plane does not pick: a name that matches several keys the caller
can see is ambiguous there whatever their depth (``--tsg`` or the key id
chooses), because an administrator acts on one precise key (disable, destroy),
and a guess is worse than a question.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

T = TypeVar("T")


def path_depth(path: str) -> int:
    """The depth of a TSG from its materialized path (``/<root id>/`` is 0)."""
    return path.count("/") - 2


def distance(account_path: str, key_path: str) -> int:
    """TSG levels from an account's TSG down to a key's in its subtree."""
    return path_depth(key_path) - path_depth(account_path)


def nearest(rows: Sequence[T], path_of: Callable[[T], str]) -> list[T]:
    """The candidates for a name (keys in one account's subtree) in the shallowest
    TSG: more than one is an ambiguous name."""
    if not rows:
        return []
    best = min(path_depth(path_of(r)) for r in rows)
    return [r for r in rows if path_depth(path_of(r)) == best]


def shadows(tsg_path: str, existing: Iterable[str]) -> bool:
    """Would a new key in the TSG at ``tsg_path`` take over its name from a deeper
    key for a TSG above (or for itself)? ``existing`` are the TSG paths of every key
    that already has the name."""
    depth = path_depth(tsg_path)
    paths = list(existing)
    parts = tsg_path.strip("/").split("/")
    for i in range(1, len(parts) + 1):
        above = "/" + "/".join(parts[:i]) + "/"
        seen = [path_depth(p) for p in paths if p.startswith(above)]
        if seen and min(seen) > depth:
            return True
    return False
