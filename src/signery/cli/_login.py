"""``signery login`` and ``signery logout``: the profile a command connects with."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated

import typer

from signery import protocol as p
from signery.cli._common import (
    JsonOpt,
    connection,
    details,
    emit,
    out,
    print_json,
    read_secret_file,
)
from signery.cli._profiles import Profile
from signery.client import AccountCredentials, Client
from signery.errors import ClientError


def login(
    ctx: typer.Context,
    server: Annotated[str, typer.Option(help="Server URL, e.g. https://signery.example.")],
    client_id: Annotated[
        str | None, typer.Option(help="Built-in account client id (UUID).")
    ] = None,
    key_file: Annotated[Path | None, typer.Option(help="The account's private key (PEM).")] = None,
    api_token: Annotated[
        str | None, typer.Option(help="A personal API token (for management).")
    ] = None,
    api_token_file: Annotated[
        Path | None, typer.Option(help="Read the API token from a file (- for stdin).")
    ] = None,
    username: Annotated[
        str | None, typer.Option(help="Create an API token with this user's password.")
    ] = None,
    password_file: Annotated[
        Path | None, typer.Option(help="Read the password from a file (- for stdin).")
    ] = None,
    ca_bundle: Annotated[
        Path | None, typer.Option(help="CA certificates to trust for the server's TLS.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Remember a server and credentials in a profile (checked against the server first).

    Build machines log in with --client-id and --key-file; administrators with
    --api-token, --api-token-file or --username."""
    conn = connection(ctx)
    store = conn.store()
    profile = store.get(conn.profile_name) or Profile(server=server)
    if profile.server != server:
        profile = Profile(server=server)
    profile.ca_bundle = str(ca_bundle.resolve()) if ca_bundle else profile.ca_bundle
    verify: bool | str = profile.ca_bundle or True
    checked: list[tuple[str, str]] = [("server", server)]

    if client_id or key_file:
        if not (client_id and key_file):
            raise ClientError("--client-id and --key-file go together")
        creds = AccountCredentials.from_key_file(client_id, key_file)
        with Client(server, credentials=creds, verify=verify) as c:
            keys = c.keys()  # proves the key, the client id and the server
        profile.client_id, profile.key_file = client_id, str(key_file.resolve())
        checked.append(("account", f"{client_id} ({len(keys)} usable keys)"))

    token = api_token or (read_secret_file(api_token_file) if api_token_file else None)
    if username:
        import getpass

        password = (
            read_secret_file(password_file)
            if password_file
            else getpass.getpass(f"Password for {username}: ")
        )
        with Client(server, verify=verify) as c:
            created = c.call(
                "POST",
                f"{p.API_PREFIX}/users/me/tokens",
                p.ApiTokenCreated,
                # No lifetime asked for: the server's maximum (90 days by default).
                json={"name": f"cli@{socket.gethostname()}"[:64]},
                auth=(username, password),
            )
        token = created.token
    if token:
        with Client(server, api_token=token, verify=verify) as c:
            me = c.call("GET", f"{p.API_PREFIX}/users/me", p.User)
        profile.api_token = token
        checked.append(("user", me.username))
    if len(checked) == 1:
        raise ClientError("give --client-id/--key-file, --api-token(-file) or --username")
    store.put(conn.profile_name, profile)
    if as_json:
        print_json({"profile": conn.profile_name, **profile.redacted()})
    else:
        out.print(f"logged in; profile [bold]{conn.profile_name}[/] saved to {store.path}")
        details(checked)


def logout(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Forget the current profile (keys and tokens themselves are not revoked)."""
    conn = connection(ctx)
    removed = conn.store().remove(conn.profile_name)
    emit(
        {"profile": conn.profile_name, "removed": removed},
        as_json,
        lambda: out.print(f"profile {conn.profile_name}: {'removed' if removed else 'not found'}"),
    )
