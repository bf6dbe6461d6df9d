"""Approver commands: signing requests (`signery approval ...`) and grants (`signery grant ...`)."""

from __future__ import annotations

import math
from typing import Annotated, Any

import typer

from signery import protocol as p
from signery.cli._common import JsonOpt, connection, details, emit, out, parse_duration, table
from signery.errors import ClientError

approval_app = typer.Typer(
    help="Signing requests waiting for approval: list, show, approve, deny, pre-approve.",
    no_args_is_help=True,
)
grant_app = typer.Typer(
    help="Grants: what approvals allow an account to sign (uses and time).",
    no_args_is_help=True,
)

CommentOpt = Annotated[str | None, typer.Option("--comment", help="Why (kept in the audit).")]
UsesOpt = Annotated[int | None, typer.Option("--uses", min=1, help="At most this many signatures.")]
UnlimitedOpt = Annotated[
    bool, typer.Option("--unlimited", help="No use limit (needs --expires-in).")
]


def _hours(duration: str | None) -> int | None:
    """A duration option -> whole hours (rounded up: never shorter than asked)."""
    return None if duration is None else math.ceil(parse_duration(duration) / 3600)


def _uses(uses: int | None, unlimited: bool) -> None:
    if uses is not None and unlimited:
        raise ClientError("give --uses N or --unlimited, not both")


def _grant_terms(g: p.SigningGrant | None) -> str:
    if g is None:
        return ""
    if g.scope is p.GrantScope.DIGESTS:
        limit = "unlimited" if g.max_uses is None else str(g.max_uses)
        uses = f"{g.uses}/{_total(g)} uses ({limit} per digest, {_digests(len(g.digests))})"
    else:
        uses = f"{g.uses}/{_total(g)} uses of ANY digest"
    return f"{uses}, {g.status}, expires {g.expires_at:%Y-%m-%d %H:%M}Z"


def _total(g: p.SigningGrant) -> str:
    """All the uses a grant allows (each digest's, for a bound one)."""
    if g.max_uses is None:
        return "unlimited"
    return str(g.max_uses * len(g.digests) if g.scope is p.GrantScope.DIGESTS else g.max_uses)


def _covers(scope: p.GrantScope, digests: list[p.ApprovedDigest]) -> str:
    """What approving (or a grant) lets the account sign, in one cell."""
    if scope is p.GrantScope.ANY_DIGEST:
        return "ANY digest"
    return _digests(len(digests))


def _digests(n: int) -> str:
    return f"{n} digest{'' if n == 1 else 's'}"


def _digest_line(d: p.ApprovedDigest) -> str:
    return f"{d.digest_algorithm.value}:{d.digest} {d.scheme.value}"


def _request_details(r: p.ApprovalRequest) -> None:
    pairs: list[tuple[str, Any]] = [
        ("id", r.id),
        ("status", r.status.value),
        ("key", f"{r.key_name} ({r.key_id})"),
        ("account", f"{r.account_name} ({r.account_id})"),
        ("requested by", f"{r.requested_by.type.value} {r.requested_by.name or r.requested_by.id}"),
        ("approvals", f"{r.approvals}/{r.required_approvals}"),
        ("justification", r.justification),
        # What approving signs: every digest, or, for a pre-approval that said so, any.
        (
            "covers",
            "ANY digest (a pre-approval of the account, not of an artifact)"
            if r.scope is p.GrantScope.ANY_DIGEST
            else f"exactly the {_digests(len(r.digests))} below (approve with --expect-digests "
            f"{len(r.digests)} to approve only this set)",
        ),
        *[("digest", _digest_line(d)) for d in r.digests],
        ("client", " ".join(x for x in (r.client_machine, r.client_tool) if x) or None),
        (
            "grant terms",
            f"{'unlimited' if r.grant_max_uses is None else r.grant_max_uses} uses, "
            f"{r.grant_ttl_hours:g}h",
        ),
        ("expires", r.expires_at),
        ("grant", _grant_terms(r.grant) or None),
    ]
    for d in r.decisions:
        pairs.append(
            (d.decision, f"{d.approver_name or d.approver_id}: {d.comment or ''}".rstrip(": "))
        )
    details(pairs)


@approval_app.command("list")
def approval_list(
    ctx: typer.Context,
    status: Annotated[
        str, typer.Option(help="pending_approval, approved, denied, expired, or all.")
    ] = "pending_approval",
    as_json: JsonOpt = False,
) -> None:
    """Signing requests in the TSGs where you may approve."""
    with connection(ctx).admin() as c:
        found = c.approvals.list(status)
    emit(
        found,
        as_json,
        lambda: table(
            None,
            ["id", "status", "key", "account", "covers", "approvals", "justification", "expires"],
            [
                (
                    r.id,
                    r.status.value,
                    r.key_name,
                    r.account_name,
                    _covers(r.scope, r.digests),
                    f"{r.approvals}/{r.required_approvals}",
                    r.justification,
                    f"{r.expires_at:%Y-%m-%d %H:%M}Z",
                )
                for r in found
            ],
        ),
    )


@approval_app.command("show")
def approval_show(ctx: typer.Context, request_id: str, as_json: JsonOpt = False) -> None:
    """One signing request: every digest it covers (or ANY for an any_digest
    pre-approval), its decisions and grant."""
    with connection(ctx).admin() as c:
        r = c.approvals.get(request_id)
    emit(r, as_json, lambda: _request_details(r))


@approval_app.command("approve")
def approval_approve(
    ctx: typer.Context,
    request_id: str,
    comment: CommentOpt = None,
    uses: UsesOpt = None,
    unlimited: UnlimitedOpt = False,
    expires_in: Annotated[
        str | None, typer.Option("--expires-in", help="Grant lifetime, e.g. 8h (narrows).")
    ] = None,
    expect_digests: Annotated[
        int | None,
        typer.Option(
            "--expect-digests",
            min=0,
            help="The number of digests `approval show` listed: refused if the request "
            "changed since (approval_request_changed).",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Approve a signing request: the grant signs exactly the digests it lists.
    --uses (per digest) and --expires-in can only narrow the grant the key's policy
    allows (the most restrictive terms of everyone win)."""
    _uses(uses, unlimited)
    body = p.ApprovalDecide(
        comment=comment,
        max_uses=uses,
        unlimited=unlimited,
        expires_in_hours=_hours(expires_in),
        digest_count=expect_digests,
    )
    _decide(ctx, request_id, True, body, as_json)


@approval_app.command("deny")
def approval_deny(
    ctx: typer.Context,
    request_id: str,
    comment: Annotated[str, typer.Option("--comment", help="Why (shown to the requester).")],
    as_json: JsonOpt = False,
) -> None:
    """Deny a signing request (one deny is enough)."""
    _decide(ctx, request_id, False, p.ApprovalDecide(comment=comment), as_json)


def _decide(
    ctx: typer.Context, request_id: str, approve: bool, body: p.ApprovalDecide, as_json: bool
) -> None:
    with connection(ctx).admin() as c:
        decide = c.approvals.approve if approve else c.approvals.deny
        r = decide(request_id, body)
    emit(r, as_json, lambda: _request_details(r))


@approval_app.command("pre-approve")
def approval_pre_approve(
    ctx: typer.Context,
    key: Annotated[str, typer.Option("--key", help="Key name or id.")],
    account: Annotated[str, typer.Option("--account", help="Account name or id.")],
    expires_in: Annotated[
        str, typer.Option("--expires-in", help="Grant lifetime, e.g. 7d (bounded by the policy).")
    ],
    uses: UsesOpt = None,
    unlimited: UnlimitedOpt = False,
    digest: Annotated[
        list[str] | None,
        typer.Option(
            "--digest",
            help="ALGORITHM:HEX the account may sign, e.g. sha256:9f86d0... (repeat for "
            "several; needs --scheme).",
        ),
    ] = None,
    scheme: Annotated[
        p.SignatureScheme | None, typer.Option(help="The scheme of the --digest signatures.")
    ] = None,
    any_digest: Annotated[
        bool,
        typer.Option(
            "--any-digest",
            help="Approve ANY digest the account sends (within uses and time) instead of "
            "listed ones: say so on purpose.",
        ),
    ] = False,
    key_tsg: Annotated[str | None, typer.Option("--key-tsg", help="The key's TSG id.")] = None,
    comment: CommentOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Approve an account's signing with a key ahead of a release (counts as your
    approval; with M-of-N approval, others must still approve). Say what it covers:
    the artifacts' digests (--digest, --scheme), or --any-digest."""
    _uses(uses, unlimited)
    hours = _hours(expires_in)
    assert hours is not None
    body = p.PreApprovalCreate(
        key=key,
        key_tsg_id=key_tsg,
        account=account,
        max_uses=None if unlimited else (uses or 1),
        unlimited=unlimited,
        expires_in_hours=hours,
        comment=comment,
        **_pre_approval_scope(digest or [], scheme, any_digest),
    )
    with connection(ctx).admin() as c:
        r = c.approvals.pre_approve(body)
    emit(r, as_json, lambda: _request_details(r))


def _pre_approval_scope(
    digests: list[str], scheme: p.SignatureScheme | None, any_digest: bool
) -> dict[str, Any]:
    """The scope fields of a pre-approval: never a silent default to any digest."""
    if any_digest:
        if digests or scheme is not None:
            raise ClientError("--any-digest approves any digest: give no --digest or --scheme")
        return {"scope": p.GrantScope.ANY_DIGEST}
    if not digests:
        raise ClientError("say what the pre-approval covers: --digest ALG:HEX, or --any-digest")
    if scheme is None:
        raise ClientError("--digest needs --scheme (the signatures' scheme, e.g. ecdsa)")
    items = []
    for text in digests:
        algorithm, _, hex_digest = text.partition(":")
        try:
            items.append(
                p.DigestToSign(
                    digest=hex_digest, digest_algorithm=p.DigestAlgorithm(algorithm), scheme=scheme
                )
            )
        except ValueError:
            raise ClientError(
                f"--digest {text!r}: expected ALGORITHM:HEX, such as sha256:9f86d081..."
            ) from None
    return {"scope": p.GrantScope.DIGESTS, "digests": items}


@grant_app.command("list")
def grant_list(
    ctx: typer.Context,
    key: Annotated[str | None, typer.Option("--key", help="Key name or id.")] = None,
    account: Annotated[str | None, typer.Option("--account", help="Account name or id.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Grants in the TSGs where you may approve."""
    with connection(ctx).admin() as c:
        found = c.grants.list(key=key, account=account)
    emit(
        found,
        as_json,
        lambda: table(
            None,
            ["id", "key", "account", "covers", "uses", "status", "expires"],
            [
                (
                    g.id,
                    g.key_name,
                    g.account_name,
                    _covers(g.scope, g.digests),
                    f"{g.uses}/{_total(g)}",
                    g.status,
                    f"{g.expires_at:%Y-%m-%d %H:%M}Z",
                )
                for g in found
            ],
        ),
    )


@grant_app.command("revoke")
def grant_revoke(ctx: typer.Context, grant_id: str, as_json: JsonOpt = False) -> None:
    """Revoke a grant: the account's next signing needs a new approval."""
    with connection(ctx).admin() as c:
        g = c.grants.revoke(grant_id)
    emit(g, as_json, lambda: out.print(f"revoked grant {g.id} ({_grant_terms(g)})"))
