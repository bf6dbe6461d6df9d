"""Server-side commands: init, serve, db."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from signery.cli._common import JsonOpt, details, emit, err, out
from signery.errors import ConfigurationError

if TYPE_CHECKING:
    from fastapi import FastAPI

    from signery.server.config import Settings
    from signery.server.installation.bootstrap import InitResult
    from signery.server.runtime.supervisor import ClaimedPort

DataDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--data-dir", help="Data directory (SQLite file, master key). Env: SIGNERY_DATA_DIR."
    ),
]
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="TOML settings file. Env: SIGNERY_CONFIG.")
]
DbUrlOpt = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        help="SQLAlchemy URL, e.g. postgresql+psycopg://host/db. Env: SIGNERY_DATABASE_URL.",
    ),
]

db_app = typer.Typer(help="Database schema.", no_args_is_help=True)


def _settings(config: Path | None, **overrides: object) -> Settings:
    try:
        from signery.server.config import load_settings
    except ImportError as e:
        raise ConfigurationError(
            "the server is not installed: pip install 'signery[server]'"
        ) from e
    return load_settings(config, **overrides)


def init(
    data_dir: DataDirOpt = None,
    config: ConfigOpt = None,
    database_url: DbUrlOpt = None,
    admin_username: Annotated[str, typer.Option(help="Name of the bootstrap superuser.")] = "admin",
    issuer: Annotated[
        str | None, typer.Option(help="Issuer identifier (the `aud` of client assertions).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a new installation (database, master key, root TSG, built-in CA, superuser).

    The data directory is created 0700 and every file in it 0600; an existing
    directory that group or others may access is refused. Safe to run again: an
    initialized installation is left untouched."""
    from signery.server.installation.bootstrap import initialize
    from signery.server.installation.datadir import use_private_umask

    settings = _settings(config, data_dir=data_dir, database_url=database_url, issuer=issuer)
    use_private_umask()
    result = initialize(settings, admin_username=admin_username)
    emit(asdict(result), as_json, lambda: _print_init(result))


def _master_key_source(result: InitResult) -> str:
    where = result.master_key_file or "from SIGNERY_MASTER_KEY"
    return f"{where} (id {result.master_key_id})"


def _print_init(result: InitResult) -> None:
    if not result.created:
        out.print("[green]Already initialized[/]: nothing was changed.")
        details(
            [
                ("root TSG", result.root_tsg_id),
                ("issuer", result.issuer),
                ("database", result.database_url),
                (
                    "master key",
                    _master_key_source(result),
                ),
            ]
        )
        return
    out.print("[green]Signery initialized.[/]")
    details(
        [
            ("root TSG", result.root_tsg_id),
            ("issuer", result.issuer),
            ("database", result.database_url),
            (
                "master key",
                _master_key_source(result),
            ),
            ("built-in CA", result.ca_root_subject),
            ("superuser", result.admin_username),
            ("password", result.admin_password),
            ("API token", result.admin_token),
        ]
    )
    err.print(
        "[yellow]The password and API token are shown once and stored only as hashes. "
        "Keep the master key file safe: without it no key can be used.[/]"
    )


def serve(
    data_dir: DataDirOpt = None,
    config: ConfigOpt = None,
    database_url: DbUrlOpt = None,
    host: Annotated[str | None, typer.Option(help="Address to bind. Env: SIGNERY_HOST.")] = None,
    port: Annotated[
        int | None, typer.Option(help="Port (0 picks a free one). Env: SIGNERY_PORT.")
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(help="Worker processes (one per core for throughput). Env: SIGNERY_WORKERS."),
    ] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning, error.")] = None,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="Announce the listening URL as one JSON line on stdout."),
    ] = False,
) -> None:
    """Run the Signery server (FastAPI on uvicorn). Logs are JSON lines on stderr.

    Refuses to start from a data directory that group or others may access, and
    on a port that something else listens on (another installation's server
    included): only this command's workers share its port."""
    from signery.server.installation.datadir import require_private, use_private_umask
    from signery.server.runtime.logging import configure_logging
    from signery.server.runtime.supervisor import claim_port
    from signery.server.runtime.tls import uvicorn_tls_options

    flags: dict[str, object] = {
        "data_dir": data_dir,
        "database_url": database_url,
        "host": host,
        "port": port,
        "workers": workers,
        "log_level": log_level,
    }
    settings = _settings(config, **flags)
    configure_logging(settings.log_level)
    use_private_umask()  # inherited by the workers: the -wal and -shm files they create
    require_private(settings)
    tls = uvicorn_tls_options(settings)
    # Claim the port first (a busy one is refused at once), so that port 0 (any
    # free port) can be announced before serving, and so that no other server
    # shares it. With several workers this socket only holds the port: each
    # worker listens on a socket of its own (signery.server.runtime.supervisor).
    claimed = claim_port(settings.host, settings.port)
    try:
        status = _serve(settings, claimed, tls=tls, as_json=as_json, flags=flags, config=config)
    finally:
        claimed.close()
    if status:
        raise typer.Exit(status)


def _serve(
    settings: Settings,
    claimed: ClaimedPort,
    *,
    tls: dict[str, Any],
    as_json: bool,
    flags: dict[str, object],
    config: Path | None,
) -> int:
    """Open the app, announce the URL, serve on the claimed port until stopped;
    the exit status."""
    import os

    import uvicorn

    from signery.server.app import create_app
    from signery.server.runtime.supervisor import Supervisor

    # Opening the app refuses a bad setup before anything listens. With several
    # workers this is a dry run, so that a bad configuration (a wrong HSM PIN!)
    # is refused once here instead of being tried by every worker.
    opened = create_app(settings)
    app: FastAPI | None = opened
    if settings.workers > 1:
        opened.state.services.stop()
        app = None
    bound_port = claimed.port
    shown_host = f"[{settings.host}]" if ":" in settings.host else settings.host
    url = f"{'https' if tls else 'http'}://{shown_host}:{bound_port}"
    if as_json:
        print(json.dumps({"url": url, "pid": os.getpid(), "workers": settings.workers}), flush=True)
    else:
        err.print(f"Signery listening on {url} ({settings.workers} worker(s))", highlight=False)
    options: dict[str, Any] = {
        "log_config": None,
        "access_log": False,
        "server_header": False,
        "proxy_headers": False,  # client addresses come from trusted_proxies only
        "timeout_graceful_shutdown": 10,
        **tls,
    }
    if app is not None:
        # The TCP socket itself, as uvicorn.run would pass it after binding (a bare
        # fd would be taken for a UNIX socket: no TCP_NODELAY, no client address).
        server_config = uvicorn.Config(app, host=settings.host, port=bound_port, **options)
        uvicorn.Server(server_config).run(sockets=[claimed.listening])
        return 0
    # Each worker reads the same environment and config file; only the flags of
    # this command are handed down (as the environment variables they stand for).
    for key, value in flags.items():
        if value is not None:
            os.environ[f"SIGNERY_{key.upper()}"] = str(value)
    if config is not None:
        os.environ["SIGNERY_CONFIG"] = str(config)
    return Supervisor(
        host=settings.host, port=bound_port, workers=settings.workers, uvicorn_options=options
    ).run()


def rotate_master_key(
    data_dir: DataDirOpt = None,
    config: ConfigOpt = None,
    database_url: DbUrlOpt = None,
    rate: Annotated[
        float | None,
        typer.Option(help="At most this many data keys re-wrapped per second (default: no limit)."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Re-wrap every data key under a new master key, while servers keep signing.

    Safe to interrupt: every key stays usable, and running the command again
    finishes the rotation it finds in progress. With several hosts, every host
    must see the same master key file."""
    from signery.server.installation.datadir import use_private_umask
    from signery.server.installation.masterkey import rotate_master_key as rotate

    settings = _settings(config, data_dir=data_dir, database_url=database_url)
    use_private_umask()  # the new master key file
    show = not as_json and err.is_terminal

    def progress(done: int, total: int) -> None:
        if show:
            err.print(f"\rre-wrapped {done}/{total}", end="")

    report = rotate(settings, rate=rate, progress=progress)
    if show:
        err.print()
    emit(
        asdict(report),
        as_json,
        lambda: out.print(
            f"master key {report.new_key_id} is now the only key "
            f"({report.rewrapped} data keys re-wrapped"
            f"{', finishing an interrupted rotation' if report.resumed else ''}; "
            f"retired: {', '.join(report.previous_key_ids) or 'none'})"
        ),
    )


@db_app.command("upgrade")
def db_upgrade(
    data_dir: DataDirOpt = None,
    config: ConfigOpt = None,
    database_url: DbUrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Apply pending schema migrations (safe to run at any time)."""
    from signery.server.installation.datadir import use_private_umask
    from signery.server.persistence import migrate
    from signery.server.persistence.db import make_engine

    settings = _settings(config, data_dir=data_dir, database_url=database_url)
    use_private_umask()  # the database file, if this creates it
    engine = make_engine(settings.resolved_database_url, pool_size=1)
    try:
        before = migrate.current_revision(engine)
        migrate.upgrade(engine)
        after = migrate.current_revision(engine)
    finally:
        engine.dispose()
    emit(
        {"from": before, "to": after},
        as_json,
        lambda: out.print(f"schema: {before or 'empty'} -> {after}"),
    )


@db_app.command("current")
def db_current(
    data_dir: DataDirOpt = None,
    config: ConfigOpt = None,
    database_url: DbUrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show the schema revision of the database and the newest one this version knows."""
    from signery.server.persistence import migrate
    from signery.server.persistence.db import make_engine

    settings = _settings(config, data_dir=data_dir, database_url=database_url)
    engine = make_engine(settings.resolved_database_url, pool_size=1)
    try:
        current = migrate.current_revision(engine)
    finally:
        engine.dispose()
    head = migrate.head_revision()
    emit(
        {"current": current, "head": head},
        as_json,
        lambda: out.print(f"current: {current or 'empty'}  head: {head}"),
    )
