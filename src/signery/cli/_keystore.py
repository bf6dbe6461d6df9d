"""``signery keystore ...``: the key stores where private keys live."""

from __future__ import annotations

import typer

from signery.cli._common import JsonOpt, connection, emit, table

keystore_app = typer.Typer(help="Key stores: where private keys live.", no_args_is_help=True)


@keystore_app.command("list")
def keystore_list(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """The key stores of the server, with their health."""
    with connection(ctx).admin() as c:
        stores = c.keystores.list()
    emit(
        stores,
        as_json,
        lambda: table(
            None,
            ["name", "kind", "healthy", "detail", "algorithms"],
            [
                (s.name, s.kind, s.healthy, s.detail, ", ".join(a.value for a in s.algorithms))
                for s in stores
            ],
        ),
    )
