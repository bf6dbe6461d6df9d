"""``signery audit ...`` and ``signery usage``: audit events, their hash chains,
exports, and the usage counters."""

from __future__ import annotations

import csv
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer

from signery import protocol as p
from signery.cli._common import (
    JsonOpt,
    connection,
    emit,
    err,
    out,
    parse_duration,
    print_json,
    table,
)
from signery.client import Client

audit_app = typer.Typer(help="Audit events.", no_args_is_help=True)


@audit_app.command("list")
def audit_list(
    ctx: typer.Context,
    tsg: Annotated[
        str | None, typer.Option("--tsg", help="Events of this TSG and its subtree.")
    ] = None,
    key: Annotated[str | None, typer.Option("--key", help="Key id.")] = None,
    account: Annotated[str | None, typer.Option("--account", help="Account id.")] = None,
    outcome: Annotated[
        p.AuditOutcome | None, typer.Option(help="succeeded, denied, invalid or error.")
    ] = None,
    kind: Annotated[str | None, typer.Option(help="Event kind prefix, e.g. signing.sign")] = None,
    since: Annotated[datetime | None, typer.Option(help="From this time (ISO 8601).")] = None,
    until: Annotated[datetime | None, typer.Option(help="Before this time (ISO 8601).")] = None,
    limit: Annotated[int, typer.Option(help="At most this many events (all pages).")] = 100,
    newest_first: Annotated[
        bool, typer.Option("--newest-first", help="Newest events first.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Audit events you may read, filtered."""
    events: list[p.AuditEvent] = []
    cursor: str | None = None
    with connection(ctx).admin() as c:
        while len(events) < limit:
            page = c.audit.events(
                tsg_id=tsg,
                key_id=key,
                account_id=account,
                outcome=outcome,
                kind=kind,
                since=since,
                until=until,
                limit=min(c.audit.PAGE_MAX, limit - len(events)),
                cursor=cursor,
                newest_first=newest_first,
            )
            events.extend(page.events)
            cursor = page.next_cursor
            if cursor is None:
                break
    emit(
        events,
        as_json,
        lambda: table(
            None,
            ["time", "kind", "outcome", "reason", "principal", "key", "ver", "digest", "client ip"],
            [
                (
                    e.time.isoformat(timespec="seconds"),
                    e.kind,
                    e.outcome.value,
                    e.reason,
                    f"{e.principal.type.value}:{e.principal.name or e.principal.id or '-'}",
                    (e.key_id or "")[:8],
                    e.key_version,
                    (e.digest or "")[:16],
                    e.client_ip,
                )
                for e in events
            ],
        ),
    )


@audit_app.command("verify")
def audit_verify(
    ctx: typer.Context,
    database_url: Annotated[
        str | None,
        typer.Option(
            "--database-url", help="Read this database (a live one or a copy) instead of the API."
        ),
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option("--data-dir", help="Read the SQLite database of this data directory."),
    ] = None,
    checkpoints: Annotated[
        Path | None,
        typer.Option("--checkpoints", help="Directory of exported checkpoints to check against."),
    ] = None,
    public_key: Annotated[
        Path | None,
        typer.Option(
            "--public-key", help="Trust only this audit public key (PEM) for checkpoints."
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Check the audit hash chains and checkpoints; exit 1 when anything is wrong.

    Reports, by event id: altered, deleted, inserted and reordered events, a
    truncated tail, and a database rolled back behind an exported checkpoint.
    Through the API (the default) it needs audit read access at the root TSG."""
    from signery.auditchain import read_exported

    exported = read_exported(checkpoints) if checkpoints else []
    pinned = _pinned_key(public_key) if public_key else None
    if database_url or data_dir:
        from signery.cli._server import _settings
        from signery.server.audit.offline import verify_database

        url = database_url or _settings(None, data_dir=data_dir).resolved_database_url
        report = verify_database(url, exported, pinned)
    else:
        report = _verify_through_api(ctx, exported, pinned)
    _print_report(report, as_json)
    if not report.clean:
        raise typer.Exit(1)


def _pinned_key(path: Path) -> dict[str, bytes]:
    from cryptography.hazmat.primitives import serialization

    from signery.auditchain import AUDIT_KEY_ID

    key = serialization.load_pem_public_key(path.read_bytes())
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return {AUDIT_KEY_ID: der}


def _verify_through_api(
    ctx: typer.Context, exported: list[Any], pinned: dict[str, bytes] | None
) -> Any:
    from cryptography.hazmat.primitives import serialization

    from signery.auditchain import Checkpoint, verify

    def events(c: Client) -> Iterator[dict[str, Any]]:
        for e in c.audit.all_events():
            row = e.model_dump(exclude={"principal"})
            row["outcome"] = e.outcome.value
            row["principal_type"] = e.principal.type.value
            row["principal_id"] = e.principal.id
            row["principal_name"] = e.principal.name
            yield row

    with connection(ctx).admin() as c:
        stored = c.audit.checkpoints()
        keys = pinned
        if keys is None:
            key = c.audit.public_key()
            der = serialization.load_pem_public_key(key.public_key_pem.encode()).public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            keys = {key.id: der}
        return verify(
            events(c),
            checkpoints=[
                Checkpoint(cp.payload.encode(), cp.signature, f"server checkpoint {cp.id}")
                for cp in stored.checkpoints
            ],
            exported=exported,
            public_keys=keys,
        )


def _print_report(report: Any, as_json: bool) -> None:
    if as_json:
        print_json(report.as_dict())
        return
    out.print(
        f"{report.events} events ({report.chained} chained, {report.unchained} written before "
        f"the chain), {len(report.nodes)} node chains, {report.checkpoints} checkpoints"
    )
    if report.clean:
        out.print("[green]audit trail intact[/]")
        return
    table(
        None,
        ["finding", "node", "#", "event ids", "what"],
        [
            (f.kind.value, f.node_id, f.node_seq, " ".join(f.event_ids), f.message)
            for f in report.findings
        ],
    )
    err.print(f"[red]{len(report.findings)} findings[/]")


@audit_app.command("checkpoint")
def audit_checkpoint(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Sign a checkpoint of every audit chain head that moved, now."""
    with connection(ctx).admin() as c:
        made = c.audit.checkpoint()
    emit(
        made,
        as_json,
        lambda: table(
            None,
            ["node", "seq", "head hash", "time"],
            [(cp.node_id, cp.seq, cp.head_hash[:16], cp.created_at) for cp in made.checkpoints],
        ),
    )


def _when(text: str) -> datetime:
    """An ISO 8601 date or time (UTC unless it says otherwise), or a time ago: 30d, 8h."""
    text = text.strip()
    if text[-1:].lower() in ("s", "m", "h", "d") and text[:-1].isdigit():
        return datetime.now(UTC) - timedelta(seconds=parse_duration(text))
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is not a date (2025-01-31), a time (2025-01-31T12:00:00Z) "
            "or a time ago (30d, 8h)"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _csv_cell(value: Any) -> Any:
    # OWASP CSV injection: a cell a spreadsheet would take for a formula gets a
    # leading quote (so does one starting with a quote: the escaping is reversible).
    if isinstance(value, str) and value.startswith(("=", "+", "-", "@", "\t", "\r", "'")):
        return "'" + value
    return value


_USAGE_COLUMNS = (
    "day",
    "subject_type",
    "name",
    "version",
    "subject_id",
    "tsg_id",
    "successes",
    "failures",
    "denied",
    "last_used_at",
)


def usage(
    ctx: typer.Context,
    scope: Annotated[
        p.UsageScope | None, typer.Option(help="key, key_version, account or tsa.")
    ] = None,
    tsg: Annotated[str | None, typer.Option("--tsg")] = None,
    since: Annotated[
        str | None, typer.Option(help="First day counted: 2025-01-31, or 30d for 30 days ago.")
    ] = None,
    until: Annotated[str | None, typer.Option(help="Last day counted (inclusive).")] = None,
    top: Annotated[
        int | None, typer.Option(help="Only the N keys and accounts with the most successes.")
    ] = None,
    by_day: Annotated[bool, typer.Option("--by-day", help="One row per day.")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="CSV with a header row.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Usage counters per key, key version and account: successes, failures (invalid
    requests, errors) and denied (refused by access, policy or limits). Without
    --since/--until: since the start; with them: the days (UTC) in between."""
    with connection(ctx).admin() as c:
        report = c.audit.usage(
            scope=scope,
            tsg_id=tsg,
            since=_when(since).date() if since else None,
            until=_when(until).date() if until else None,
            top=top,
            by_day=by_day,
        )
    rows: list[tuple[Any, ...]] = [
        (
            u.day,
            u.subject_type,
            u.name,
            u.version,
            u.subject_id,
            u.tsg_id,
            u.successes,
            u.failures,
            u.denied,
            u.last_used_at,
        )
        for u in report.counters
    ]
    if as_csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(_USAGE_COLUMNS)
        writer.writerows([_csv_cell("" if v is None else str(v)) for v in r] for r in rows)
        return
    columns = [
        "day",
        "type",
        "name",
        "ver",
        "id",
        "tsg",
        "successes",
        "failed",
        "denied",
        "last used",
    ]
    if not by_day:
        columns, rows = columns[1:], [r[1:] for r in rows]
    emit(report, as_json, lambda: table(None, columns, rows))


@audit_app.command("export")
def audit_export(
    ctx: typer.Context,
    since: Annotated[
        str | None,
        typer.Option(help="From this time: 2025-01-31, 2025-01-31T12:00:00Z, or 30d ago."),
    ] = None,
    until: Annotated[str | None, typer.Option(help="Before this time (same forms).")] = None,
    fmt: Annotated[
        p.ExportFormat, typer.Option("--format", help="jsonl (one event a line) or csv.")
    ] = p.ExportFormat.JSONL,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to this file (default: stdout).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Export the audit events you may read, oldest first, streamed (any size).

    The file appears only when the export is complete: a cut stream leaves none.
    --json: with -o, a summary (file, format, bytes) on stdout."""
    start = _when(since) if since else None
    end = _when(until) if until else None
    with (
        connection(ctx).admin() as c,
        c.audit.export(since=start, until=end, fmt=fmt) as chunks,
    ):
        if output is None:
            for chunk in chunks:
                sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
            return
        partial = output.with_name(f".{output.name}.partial")
        size = 0
        try:
            with partial.open("wb") as f:
                for chunk in chunks:
                    f.write(chunk)
                    size += len(chunk)
            partial.replace(output)
        finally:
            partial.unlink(missing_ok=True)
    emit(
        {"output": str(output), "format": fmt.value, "bytes": size},
        as_json,
        lambda: err.print(f"exported to {output} ({size} bytes)", highlight=False),
    )
