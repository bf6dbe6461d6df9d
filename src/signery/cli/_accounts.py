"""``signery account ...``: built-in accounts, the identities build machines sign as."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from signery import protocol as p
from signery.cli._common import (
    JsonOpt,
    TsgOpt,
    connection,
    details,
    emit,
    err,
    out,
    print_json,
    table,
    write_private_file,
)
from signery.errors import ClientError

account_app = typer.Typer(
    help="Built-in accounts: the identities build machines sign as.", no_args_is_help=True
)


def _account_details(a: p.Account) -> None:
    details(
        [
            ("id", a.id),
            ("client_id", a.client_id),
            ("name", a.name),
            ("tsg", a.tsg_id),
            ("status", a.status.value),
            ("valid until", a.valid_until),
            # One line per public key, with the id `account remove-key` takes.
            *(("key", f"{k.id} {k.algorithm} {k.fingerprint[:16]}") for k in a.keys),
        ]
    )


@account_app.command("create")
def account_create(
    ctx: typer.Context,
    name: str,
    tsg: TsgOpt = None,
    public_key: Annotated[
        Path | None,
        typer.Option(help="Register this PEM public key instead of generating a key pair."),
    ] = None,
    key_out: Annotated[
        Path | None, typer.Option(help="Write the generated private key here (mode 0600).")
    ] = None,
    key_algorithm: Annotated[
        str, typer.Option(help="EC_P256, EC_P384, RSA_3072 or ED25519.")
    ] = "EC_P256",
    validity_days: Annotated[int, typer.Option(help="Days the account stays valid.")] = 365,
    as_json: JsonOpt = False,
) -> None:
    """Create a built-in account. Without --public-key the server generates the key
    pair and returns the private key once: save it with --key-out."""
    if public_key is not None and key_out is not None:
        raise ClientError("--key-out only applies to a generated key pair; drop it or --public-key")
    pem: str | None = None
    if public_key is not None:
        try:
            pem = public_key.read_text("ascii")
        except (OSError, UnicodeDecodeError) as e:
            raise ClientError(f"cannot read public key {public_key}") from e
    request = p.AccountCreate(
        name=name,
        tsg_id=tsg,
        validity_days=validity_days,
        key_algorithm=key_algorithm,
        **({"public_key_pem": pem} if pem is not None else {}),
    )
    if key_out is not None and key_out.exists():
        raise ClientError(f"{key_out} already exists; refusing to overwrite a key file")
    with connection(ctx).admin() as c:
        account = c.accounts.create(request)
    if key_out is not None and account.private_key_pem:
        write_private_file(key_out, account.private_key_pem)
    if as_json:
        data = account.model_dump(mode="json")
        if key_out is not None:
            data["private_key_pem"] = None
            data["private_key_file"] = str(key_out)
        print_json(data)
        return
    out.print(f"created account [bold]{account.name}[/]")
    _account_details(account)
    if key_out is not None:
        out.print(f"private key written to {key_out} (mode 0600); it is not stored on the server")
    elif account.private_key_pem:
        err.print("[yellow]The private key below is shown once and not stored on the server:[/]")
        out.print(account.private_key_pem, highlight=False)


@account_app.command("list")
def account_list(
    ctx: typer.Context,
    tsg: Annotated[str | None, typer.Option("--tsg")] = None,
    as_json: JsonOpt = False,
) -> None:
    with connection(ctx).admin() as c:
        accounts = c.accounts.list(tsg)
    emit(
        accounts,
        as_json,
        lambda: table(
            None,
            ["name", "client_id", "tsg", "status", "valid until"],
            [(a.name, a.client_id, a.tsg_id, a.status.value, a.valid_until) for a in accounts],
        ),
    )


@account_app.command("show")
def account_show(
    ctx: typer.Context,
    account: Annotated[str, typer.Argument(help="Account id or client id.")],
    as_json: JsonOpt = False,
) -> None:
    with connection(ctx).admin() as c:
        found = c.accounts.get(account)
    emit(found, as_json, lambda: _account_details(found))


def _set_enabled(ctx: typer.Context, account: str, enabled: bool, as_json: bool) -> None:
    with connection(ctx).admin() as c:
        found = c.accounts.enable(account) if enabled else c.accounts.disable(account)
    emit(found, as_json, lambda: out.print(f"account {found.name}: {found.status.value}"))


@account_app.command("disable")
def account_disable(ctx: typer.Context, account: str, as_json: JsonOpt = False) -> None:
    """Disable an account: its tokens stop working at once."""
    _set_enabled(ctx, account, False, as_json)


@account_app.command("enable")
def account_enable(ctx: typer.Context, account: str, as_json: JsonOpt = False) -> None:
    _set_enabled(ctx, account, True, as_json)


@account_app.command("add-key")
def account_add_key(
    ctx: typer.Context,
    account: str,
    public_key: Annotated[Path, typer.Option(help="PEM public key file.")],
    as_json: JsonOpt = False,
) -> None:
    """Register another public key for an account (e.g. to rotate its credentials).

    On an account that a signing key's policy names as a signer, this needs
    key_admin on that key too: whoever holds the key can sign as the account."""
    try:
        pem = public_key.read_text("ascii")
    except (OSError, UnicodeDecodeError) as e:
        raise ClientError(f"cannot read public key {public_key}") from e
    with connection(ctx).admin() as c:
        found = c.accounts.add_key(account, p.AccountKeyAdd(public_key_pem=pem))
    emit(found, as_json, lambda: _account_details(found))


@account_app.command("remove-key")
def account_remove_key(
    ctx: typer.Context,
    account: Annotated[str, typer.Argument(help="Account id or client id.")],
    key_id: Annotated[str, typer.Argument(help="Id of the public key (see `account show`).")],
    as_json: JsonOpt = False,
) -> None:
    """Remove a public key from an account (never its last one: add the replacement
    first). Assertions signed with it are refused from now on, and the account's
    access tokens issued before end; holders of its other keys get new ones."""
    with connection(ctx).admin() as c:
        found = c.accounts.remove_key(account, key_id)

    def human() -> None:
        out.print(f"removed key {key_id} from account [bold]{found.name}[/]")
        _account_details(found)

    emit(found, as_json, human)
