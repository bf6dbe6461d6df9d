"""``signery user ...`` and ``signery role ...``: administrators, their API tokens
and the roles they hold at TSGs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from signery import protocol as p
from signery.cli._common import JsonOpt, TsgOpt, connection, details, emit, out, table

user_app = typer.Typer(help="Users (administrators) and their API tokens.", no_args_is_help=True)
token_app = typer.Typer(help="Personal API tokens.", no_args_is_help=True)
user_app.add_typer(token_app, name="token")
role_app = typer.Typer(help="Role bindings of users at TSGs.", no_args_is_help=True)


@user_app.command("create")
def user_create(
    ctx: typer.Context,
    username: str,
    tsg: TsgOpt = None,
    password_file: Annotated[
        Path | None,
        typer.Option(help="Read the password from this file (- for stdin); generated if omitted."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a user. Give it roles with `signery role bind`."""
    from signery.cli._common import read_secret_file

    password = read_secret_file(password_file) if password_file else None
    with connection(ctx).admin() as c:
        user = c.users.create(p.UserCreate(username=username, tsg_id=tsg, password=password))

    def human() -> None:
        out.print(f"created user [bold]{user.username}[/] ({user.id}) in TSG {user.tsg_id}")
        if user.password:
            out.print(f"generated password (shown once): [bold]{user.password}[/]", highlight=False)

    emit(user, as_json, human)


@user_app.command("list")
def user_list(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    with connection(ctx).admin() as c:
        users = c.users.list()
    emit(
        users,
        as_json,
        lambda: table(
            None,
            ["id", "username", "tsg", "active", "created"],
            [(u.id, u.username, u.tsg_id, u.is_active, u.created_at) for u in users],
        ),
    )


@user_app.command("show")
def user_show(
    ctx: typer.Context,
    user: Annotated[str, typer.Argument(help="Username or id; `me` for yourself.")],
    as_json: JsonOpt = False,
) -> None:
    with connection(ctx).admin() as c:
        found = c.users.get(user)
    emit(found, as_json, lambda: details(list(found.model_dump().items())))


@token_app.command("create")
def token_create(
    ctx: typer.Context,
    name: Annotated[str, typer.Option(help="A label for the token.")],
    user: Annotated[str, typer.Option(help="Username or id (default: yourself).")] = "me",
    days: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Days until the token expires (default and maximum: the server's "
            "api_token_max_lifetime_days, 90 unless configured).",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a personal API token (printed once). For another user, every role it
    holds must be one you hold too, where it holds it."""
    request = (
        p.ApiTokenCreate(name=name, expires_in_days=days)
        if days is not None
        else p.ApiTokenCreate(name=name)
    )
    with connection(ctx).admin() as c:
        created = c.users.create_token(user, request)
    emit(
        created,
        as_json,
        lambda: out.print(
            f"token {created.id} (shown once): [bold]{created.token}[/]", highlight=False
        ),
    )


@token_app.command("list")
def token_list(
    ctx: typer.Context,
    user: Annotated[str, typer.Option(help="Username or id.")] = "me",
    as_json: JsonOpt = False,
) -> None:
    with connection(ctx).admin() as c:
        tokens = c.users.tokens(user)
    emit(
        tokens,
        as_json,
        lambda: table(
            None,
            ["id", "name", "created", "expires", "last used", "revoked"],
            [(t.id, t.name, t.created_at, t.expires_at, t.last_used_at, t.revoked) for t in tokens],
        ),
    )


@token_app.command("revoke")
def token_revoke(ctx: typer.Context, token_id: str, as_json: JsonOpt = False) -> None:
    with connection(ctx).admin() as c:
        token = c.users.revoke_token(token_id)
    emit(token, as_json, lambda: out.print(f"revoked token {token.id}"))


@role_app.command("bind")
def role_bind(
    ctx: typer.Context,
    user: Annotated[str, typer.Argument(help="Username or id.")],
    role: Annotated[
        p.Role,
        typer.Argument(
            help="superuser, key_admin, key_viewer, account_admin, auditor or approver."
        ),
    ],
    tsg: Annotated[str, typer.Option("--tsg", help="TSG id where the role applies (and below).")],
    as_json: JsonOpt = False,
) -> None:
    """Grant a role at a TSG; it applies to the TSG and all its descendants."""
    with connection(ctx).admin() as c:
        binding = c.roles.bind(p.RoleBindingCreate(principal_id=user, role=role, tsg_id=tsg))
    emit(
        binding,
        as_json,
        lambda: out.print(f"bound {binding.role.value} at TSG {binding.tsg_id} ({binding.id})"),
    )


@role_app.command("list")
def role_list(
    ctx: typer.Context,
    tsg: Annotated[str | None, typer.Option("--tsg")] = None,
    as_json: JsonOpt = False,
) -> None:
    with connection(ctx).admin() as c:
        bindings = c.roles.list(tsg)
    emit(
        bindings,
        as_json,
        lambda: table(
            None,
            ["id", "principal", "role", "tsg", "created"],
            [(b.id, b.principal_id, b.role.value, b.tsg_id, b.created_at) for b in bindings],
        ),
    )


@role_app.command("unbind")
def role_unbind(ctx: typer.Context, binding_id: str, as_json: JsonOpt = False) -> None:
    with connection(ctx).admin() as c:
        c.roles.unbind(binding_id)
    emit({"removed": binding_id}, as_json, lambda: out.print(f"removed role binding {binding_id}"))
