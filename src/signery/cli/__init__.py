"""The ``signery`` command line: server administration and build-machine signing."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from signery import __version__
from signery.cli import (
    _accounts,
    _agent,
    _approvals,
    _audit,
    _ca,
    _client,
    _keys,
    _keystore,
    _login,
    _server,
    _sign,
    _tsg,
    _users,
)
from signery.cli._common import Connection, report_error
from signery.cli._profiles import DEFAULT_PROFILE, home_dir
from signery.errors import SigneryError, ValidationFailed

app = typer.Typer(
    name="signery",
    help="Signery: self-hosted remote code signing. "
    "Keys stay in their store; files never leave your machine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"signery {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    profile: Annotated[
        str, typer.Option(envvar="SIGNERY_PROFILE", help="Profile to use.")
    ] = DEFAULT_PROFILE,
    server: Annotated[
        str | None,
        typer.Option(envvar="SIGNERY_SERVER", help="Server URL (overrides the profile)."),
    ] = None,
    api_token: Annotated[
        str | None,
        typer.Option(
            envvar="SIGNERY_API_TOKEN",
            help="API token for management commands.",
            show_default=False,
        ),
    ] = None,
    client_id: Annotated[
        str | None, typer.Option(envvar="SIGNERY_CLIENT_ID", help="Account client id for signing.")
    ] = None,
    key_file: Annotated[
        Path | None,
        typer.Option(envvar="SIGNERY_KEY_FILE", help="Account private key for signing."),
    ] = None,
    ca_bundle: Annotated[
        str | None, typer.Option(envvar="SIGNERY_CA_BUNDLE", help="CA certificates for TLS.")
    ] = None,
    insecure: Annotated[
        bool, typer.Option(help="Do not verify TLS certificates (development only).")
    ] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    ctx.obj = Connection(
        home=home_dir(),
        profile_name=profile,
        server=server,
        api_token=api_token,
        client_id=client_id,
        key_file=key_file,
        ca_bundle=ca_bundle,
        insecure=insecure,
    )


app.command()(_server.init)
app.command()(_server.serve)
app.add_typer(_server.db_app, name="db")
app.command()(_login.login)
app.command()(_login.logout)
app.command()(_client.keys)
app.command()(_sign.sign)
app.command()(_sign.verify)
app.command()(_client.timestamp)
app.command()(_agent.agent)
app.command("exec")(_agent.exec_)
app.add_typer(_tsg.tsg_app, name="tsg")
app.add_typer(_users.user_app, name="user")
app.add_typer(_users.role_app, name="role")
app.add_typer(_accounts.account_app, name="account")
# `key export` signs (the OpenPGP self-signature): it uses the signing plane's
# account credentials, unlike the other `key` commands.
_keys.key_app.command("export")(_client.key_export)
app.add_typer(_keys.key_app, name="key")
app.add_typer(_audit.audit_app, name="audit")
app.add_typer(_ca.ca_app, name="ca")
app.add_typer(_ca.ca_connector_app, name="ca-connector")
_keystore.keystore_app.command("rotate-master-key")(_server.rotate_master_key)
app.add_typer(_keystore.keystore_app, name="keystore")
app.command()(_audit.usage)
app.add_typer(_approvals.approval_app, name="approval")
app.add_typer(_approvals.grant_app, name="grant")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit status.

    Usage errors are handled by the CLI framework itself (message and status 2);
    a SigneryError, or a request the wire models refuse, becomes a one-line
    message and status 1, never a traceback."""
    try:
        app(args=argv, prog_name="signery", standalone_mode=True)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except SigneryError as e:
        report_error(e)
        return 1
    except ValidationError as e:
        # A request the client refuses to send (a control character, a text too
        # long): said as the server would say it. The value is not repeated: it
        # may be a secret.
        report_error(
            ValidationFailed(
                "; ".join(
                    f"{'.'.join(str(x) for x in error['loc']) or 'value'}: {error['msg']}"
                    for error in e.errors()
                )
            )
        )
        return 1
    except KeyboardInterrupt:
        print("aborted", file=sys.stderr)
        return 130
    return 0


def entrypoint() -> None:
    sys.exit(main())


__all__ = ["app", "entrypoint", "main"]
