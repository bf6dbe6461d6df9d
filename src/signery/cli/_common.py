"""Shared CLI plumbing: connection settings, output (table or --json), errors."""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from signery import endpoints
from signery.cli._profiles import DEFAULT_PROFILE, Profile, ProfileStore
from signery.client import AccountCredentials, Client
from signery.errors import ClientError, SigneryError

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
TsgOpt = Annotated[str | None, typer.Option("--tsg", help="TSG id (default: your home TSG).")]
KeyArg = Annotated[str, typer.Argument(help="Key name or id.")]
KeyTsgOpt = Annotated[
    str | None,
    typer.Option("--tsg", help="TSG in which a key name is looked up (default: the nearest)."),
]
OutputOpt = Annotated[Path | None, typer.Option("-o", "--output", help="Write to this file.")]


@dataclass
class Connection:
    """Global options (``signery --profile/--server/...``) merged with the profile."""

    home: Path
    profile_name: str
    server: str | None = None
    api_token: str | None = None
    client_id: str | None = None
    key_file: Path | None = None
    ca_bundle: str | None = None
    insecure: bool = False

    def store(self) -> ProfileStore:
        return ProfileStore.load(self.home)

    def profile(self) -> Profile | None:
        store = self.store()
        found = store.get(self.profile_name)
        if found is None and self.profile_name != DEFAULT_PROFILE:
            # A named profile that does not exist is a typo, not "use the defaults".
            raise ClientError(
                f"no profile named {self.profile_name!r} in {store.path}; "
                f"create it with `signery --profile {self.profile_name} login ...`"
            )
        return found

    def _verify(self, profile: Profile | None) -> bool | str:
        if self.insecure:
            err.print("[yellow]warning: TLS certificate verification is disabled (--insecure)[/]")
            return False
        return self.ca_bundle or (profile.ca_bundle if profile else None) or True

    def admin(self) -> Client:
        profile = self.profile()
        server = self.server or (profile.server if profile else None)
        token = self.api_token or (profile.api_token if profile else None)
        if not server:
            raise ClientError("no server: pass --server or run `signery login`")
        if not token:
            raise ClientError(
                "no API token: pass --api-token, set SIGNERY_API_TOKEN or run `signery login`"
            )
        return Client(server, api_token=token, verify=self._verify(profile))

    def signing(self, interrupted: threading.Event | None = None) -> Client:
        """The account's client; ``interrupted`` stops it once set (Client)."""
        profile = self.profile()
        server = self.server or (profile.server if profile else None)
        client_id = self.client_id or (profile.client_id if profile else None)
        key_file = self.key_file or (
            Path(profile.key_file) if profile and profile.key_file else None
        )
        if not server:
            raise ClientError("no server: pass --server or run `signery login`")
        if not client_id or key_file is None:
            raise ClientError(
                "no account credentials: run "
                "`signery login --server URL --client-id ID --key-file FILE`"
            )
        creds = AccountCredentials.from_key_file(client_id, key_file)
        return Client(
            server, credentials=creds, verify=self._verify(profile), interrupted=interrupted
        )

    def tls_verify(self) -> bool | str:
        """TLS verification for connections beside the server's (a TSA)."""
        return self._verify(self.profile())

    def timestamping(self, tsa: str | None) -> tuple[str, bool | str, dict[str, str]]:
        """(TSA URL, TLS verification, headers) for ``signery timestamp``.

        Without ``--tsa`` the TSA is the profile's Signery server, and the profile's
        credentials go along (a server with ``tsa_access = "authenticated"`` wants
        them); an explicit ``--tsa`` URL is a third party and gets none of them."""
        profile = self.profile()
        verify = self._verify(profile)
        if tsa is not None:
            return tsa, verify, {}
        server = self.server or (profile.server if profile else None)
        if not server:
            raise ClientError("no TSA: pass --tsa URL, --server, or run `signery login`")
        url = server.rstrip("/") + endpoints.TSA.path()
        token = self.api_token or (profile.api_token if profile else None)
        if token:
            return url, verify, {"Authorization": f"Bearer {token}"}
        client_id = self.client_id or (profile.client_id if profile else None)
        if client_id and (self.key_file or (profile and profile.key_file)):
            with self.signing() as c:
                return url, verify, {"Authorization": f"Bearer {c.access_token()}"}
        return url, verify, {}


def connection(ctx: typer.Context) -> Connection:
    obj = ctx.find_root().obj
    if not isinstance(obj, Connection):  # pragma: no cover - the root callback always sets it
        return Connection(home=Path.home() / ".config" / "signery", profile_name=DEFAULT_PROFILE)
    return obj


def to_jsonable(data: Any) -> Any:
    if isinstance(data, BaseModel):
        return data.model_dump(mode="json")
    if isinstance(data, list | tuple):
        return [to_jsonable(d) for d in data]
    if isinstance(data, dict):
        return {k: to_jsonable(v) for k, v in data.items()}
    if isinstance(data, Path):
        return str(data)
    return data


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(to_jsonable(data), indent=2, sort_keys=False) + "\n")


def table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    t = Table(title=title, show_lines=False, header_style="bold")
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*["" if v is None else str(v) for v in r])
    out.print(t)


def emit(data: Any, as_json: bool, human: Callable[[], None]) -> None:
    if as_json:
        print_json(data)
    else:
        human()


def details(pairs: Sequence[tuple[str, Any]]) -> None:
    width = max(len(k) for k, _ in pairs)
    for k, v in pairs:
        out.print(f"[bold]{k.ljust(width)}[/]  {'' if v is None else v}", highlight=False)


def report_error(e: SigneryError) -> None:
    err.print(f"[red]error[/] [bold]{e.code}[/]: {e.detail}", highlight=False)
    candidates = e.extra.get("candidates")
    if isinstance(candidates, list):
        for c in candidates:
            err.print(f"  candidate: {c}", highlight=False)


def check_files(files: Sequence[Path]) -> None:
    """Refuse, before anything is hashed or sent, a path that is not a readable file."""
    for f in files:
        if not f.is_file():
            raise ClientError(f"{f} is not a readable file")


def read_secret_file(path: Path) -> str:
    """Read a secret from a file (``-`` for standard input), stripped of whitespace."""
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text("utf-8")
    except OSError as e:
        raise ClientError(f"cannot read {path}: {e.strerror}") from None
    value = text.strip()
    if not value:
        raise ClientError(f"{path} is empty")
    return value


def write_private_file(path: Path, data: str) -> None:
    """Create a file readable by its owner only; never overwrite one."""
    import os

    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ClientError(f"{path} already exists; refusing to overwrite a key file") from None
    except OSError as e:
        raise ClientError(f"cannot create {path}: {e.strerror}") from None
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(data)


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """``90s``, ``30m``, ``8h``, ``7d`` -> seconds (a unit is required: no guessing)."""
    value, unit = text.strip()[:-1], text.strip()[-1:].lower()
    if unit not in _DURATION_UNITS or not value.isdigit() or int(value) <= 0:
        raise typer.BadParameter(f"{text!r} is not a duration like 90s, 30m, 8h or 7d")
    return int(value) * _DURATION_UNITS[unit]


DURATION_UNITS = {"d": 1, "w": 7, "y": 365}


def parse_days(value: str) -> int:
    """``30d``, ``4w``, ``1y`` or a bare number of days."""
    text = value.strip().lower()
    unit = text[-1:] if text[-1:] in DURATION_UNITS else "d"
    number = text[:-1] if text[-1:] in DURATION_UNITS else text
    if not number.isdigit() or int(number) > 100 * 365:
        raise typer.BadParameter(f"{value!r} is not a duration such as 30d, 4w or 1y")
    return int(number) * DURATION_UNITS[unit]


def day(moment: datetime | None) -> str:
    """A time to the minute, for a table cell."""
    return moment.strftime("%Y-%m-%d %H:%M") if moment else ""


def write_pem(pem: str, output: Path | None, as_json: bool, what: str) -> None:
    """Print a PEM document the server sent, or write it to ``output``."""
    if output is not None:
        output.write_text(pem, "ascii")
    if as_json:
        print_json({what: pem, "file": str(output) if output else None})
    elif output is None:
        out.print(pem, end="", highlight=False)
    else:
        label = {"public_key_pem": "public key", "chain_pem": "certificate chain"}.get(what, what)
        out.print(f"{label} written to {output}")
