"""``signery key policy ...``: a signing key's policy (who, how, where, when, how much)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any

import typer

from signery import protocol as p
from signery.cli._common import JsonOpt, KeyArg, KeyTsgOpt, connection, emit, out, print_json, table
from signery.errors import ClientError

DAYS: tuple[str, ...] = tuple(d.value for d in p.Weekday)
HOUR_UNITS = {"h": 1, "d": 24, "w": 24 * 7}
WINDOW_RE = re.compile(
    r"^\s*(?:(?P<days>[a-z,\-]+)\s*)?(?:(?P<start>\d{1,2}:\d{2})\s*-\s*(?P<end>\d{1,2}:\d{2}))?\s*$"
)

policy_app = typer.Typer(
    help="A key's signing policy: signers, schemes, digests, limits, IPs, time windows, "
    "validity, approvals.",
    no_args_is_help=True,
)


def parse_days(text: str) -> list[str]:
    """``mon-fri``, ``mon,wed,fri``, ``fri-mon`` (wraps), ``sat``."""
    days: list[str] = []
    for part in text.split(","):
        part = part.strip()
        first, _, last = part.partition("-")
        if first not in DAYS or (last and last not in DAYS):
            raise typer.BadParameter(f"{part!r} is not a day or a day range such as mon-fri")
        if not last:
            days.append(first)
            continue
        i, j = DAYS.index(first), DAYS.index(last)
        span = (j - i) % 7
        days.extend(DAYS[(i + k) % 7] for k in range(span + 1))
    return [d for d in DAYS if d in days]


def _hhmm(value: str) -> str:
    hours, minutes = value.split(":")
    return f"{int(hours):02d}:{minutes}"


def parse_window(text: str) -> dict[str, Any]:
    """``"mon-fri 09:00-17:00"``, ``"sat,sun"`` (whole days), ``"22:00-02:00"`` (every day)."""
    match = WINDOW_RE.match(text.lower())
    if not match or not (match["days"] or match["start"]):
        raise typer.BadParameter(
            f"{text!r} is not a time window such as 'mon-fri 09:00-17:00' or 'sat,sun'"
        )
    window: dict[str, Any] = {}
    if match["days"]:
        window["days"] = parse_days(match["days"])
    if match["start"]:
        window["start"], window["end"] = _hhmm(match["start"]), _hhmm(match["end"])
    return window


def parse_hours(value: str) -> int:
    """``24h``, ``3d``, ``2w`` or a bare number of hours."""
    text = value.strip().lower()
    unit = text[-1:] if text[-1:] in HOUR_UNITS else "h"
    number = text[:-1] if text[-1:] in HOUR_UNITS else text
    if not number.isdigit():
        raise typer.BadParameter(f"{value!r} is not a duration such as 24h, 3d or 1w")
    return int(number) * HOUR_UNITS[unit]


def _read_policy_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ClientError(f"cannot read a JSON policy from {path}: {e}") from e
    if not isinstance(data, dict):
        raise ClientError(f"{path} must hold a JSON object (a KeyPolicy)")
    return data


def policy_lines(policy: p.KeyPolicy | None) -> list[tuple[str, str]]:
    """One (rule, value) line per rule the policy sets, in words."""
    if policy is None:
        return []
    lines: list[tuple[str, str]] = []
    if policy.signers is not None:
        lines.append(("signers", ", ".join(policy.signers)))
    if policy.signer_tsgs is not None:
        lines.append(("signer TSGs", ", ".join(policy.signer_tsgs)))
    if policy.allowed_schemes is not None:
        lines.append(("schemes", ", ".join(s.value for s in policy.allowed_schemes)))
    if policy.allowed_digests is not None:
        lines.append(("digests", ", ".join(d.value for d in policy.allowed_digests)))
    if policy.max_signatures_total is not None:
        lines.append(("max signatures", f"{policy.max_signatures_total} in total"))
    if policy.max_signatures_per_day is not None:
        lines.append(("max per day", f"{policy.max_signatures_per_day} ({policy.timezone})"))
    if policy.client_ips is not None:
        lines.append(("client IPs", ", ".join(policy.client_ips)))
    for w in policy.time_windows or []:
        days = ",".join(d.value for d in w.days) if len(w.days) < 7 else "every day"
        lines.append(("time window", f"{days} {w.start}-{w.end} {policy.timezone}"))
    if policy.valid_from is not None:
        lines.append(("valid from", policy.valid_from.isoformat()))
    if policy.valid_until is not None:
        lines.append(("valid until", policy.valid_until.isoformat()))
    if policy.min_signing_version is not None:
        lines.append(("min version", str(policy.min_signing_version)))
    if policy.approval is not None:
        a = policy.approval
        who = ", ".join(a.approvers) if a.approvers else "holders of the approver role"
        uses = "unlimited uses" if a.grant_max_uses is None else f"{a.grant_max_uses} use(s)"
        lines.append(
            (
                "approval",
                f"{a.required} of {who}; grant: {uses}, {a.grant_ttl_hours}h; "
                f"requests wait {a.request_ttl_hours}h",
            )
        )
    return lines


def usage_line(key: p.SigningKey) -> str | None:
    if key.usage is None:
        return None
    policy = key.policy
    total = f"{key.usage.total}"
    if policy is not None and policy.max_signatures_total is not None:
        total += f"/{policy.max_signatures_total}"
    today = f"{key.usage.today}"
    if policy is not None and policy.max_signatures_per_day is not None:
        today += f"/{policy.max_signatures_per_day}"
    return f"{total} in total, {today} on {key.usage.day}"


def _show(key: p.SigningKey) -> None:
    lines = policy_lines(key.policy)
    if not lines:
        out.print(f"key [bold]{key.name}[/] has no policy: every account that can reach it signs")
        return
    rows = [*lines]
    usage = usage_line(key)
    if usage is not None:
        rows.append(("usage", usage))
    table(f"policy of {key.name}", ["rule", "value"], rows)


@policy_app.command("show")
def policy_show(
    ctx: typer.Context,
    key: KeyArg,
    tsg: KeyTsgOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The key's policy, one rule a line, and its usage against the limits."""
    with connection(ctx).admin() as c:
        found = c.signing_keys.get(key, tsg)
    emit(
        {"policy": found.policy, "usage": found.usage},
        as_json,
        lambda: _show(found),
    )


@policy_app.command("set")
def policy_set(
    ctx: typer.Context,
    key: KeyArg,
    file: Annotated[
        Path | None,
        typer.Option("--file", help="A KeyPolicy JSON document; the flags below override it."),
    ] = None,
    signer: Annotated[
        list[str] | None, typer.Option("--signer", help="Account (name or id) that may sign.")
    ] = None,
    signer_tsg: Annotated[
        list[str] | None,
        typer.Option("--signer-tsg", help="TSG id whose accounts may sign (the key's or above)."),
    ] = None,
    scheme: Annotated[
        list[p.SignatureScheme] | None, typer.Option("--scheme", help="Allowed scheme.")
    ] = None,
    digest: Annotated[
        list[p.DigestAlgorithm] | None, typer.Option("--digest", help="Allowed digest.")
    ] = None,
    max_total: Annotated[
        int | None, typer.Option("--max-total", help="At most N signatures in total.")
    ] = None,
    max_per_day: Annotated[
        int | None, typer.Option("--max-per-day", help="At most N signatures a day.")
    ] = None,
    allow_ip: Annotated[
        list[str] | None, typer.Option("--allow-ip", help="Allowed client CIDR range.")
    ] = None,
    window: Annotated[
        list[str] | None,
        typer.Option("--window", help="Time window, e.g. 'mon-fri 09:00-17:00' or 'sat,sun'."),
    ] = None,
    timezone: Annotated[
        str | None,
        typer.Option("--timezone", help="IANA zone of the windows and of the per-day limit."),
    ] = None,
    valid_from: Annotated[
        str | None, typer.Option("--valid-from", help="ISO 8601 with an offset.")
    ] = None,
    valid_until: Annotated[
        str | None, typer.Option("--valid-until", help="ISO 8601 with an offset.")
    ] = None,
    min_signing_version: Annotated[
        int | None, typer.Option("--min-signing-version", help="Oldest version that may sign.")
    ] = None,
    approvals: Annotated[
        int | None, typer.Option("--approvals", help="Approvals required (M of N).")
    ] = None,
    approver: Annotated[
        list[str] | None, typer.Option("--approver", help="User (name or id) who may approve.")
    ] = None,
    grant_uses: Annotated[
        int | None, typer.Option("--grant-uses", help="Uses of the grant an approval creates.")
    ] = None,
    grant_unlimited: Annotated[
        bool,
        typer.Option("--grant-unlimited", help="Grants with unlimited uses (until --grant-ttl)."),
    ] = False,
    grant_ttl: Annotated[
        str | None, typer.Option("--grant-ttl", help="Lifetime of a grant (24h, 3d).")
    ] = None,
    request_ttl: Annotated[
        str | None, typer.Option("--request-ttl", help="How long requests wait (72h).")
    ] = None,
    tsg: KeyTsgOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Replace the key's whole policy (rules not given are removed)."""
    body: dict[str, Any] = _read_policy_file(file) if file is not None else {}
    flags: dict[str, Any] = {
        "signers": signer,
        "signer_tsgs": signer_tsg,
        "allowed_schemes": [s.value for s in scheme] if scheme else None,
        "allowed_digests": [d.value for d in digest] if digest else None,
        "max_signatures_total": max_total,
        "max_signatures_per_day": max_per_day,
        "client_ips": allow_ip,
        "time_windows": [parse_window(w) for w in window] if window else None,
        "timezone": timezone,
        "valid_from": valid_from,
        "valid_until": valid_until,
        "min_signing_version": min_signing_version,
    }
    body.update({k: v for k, v in flags.items() if v})
    if grant_unlimited and grant_uses is not None:
        raise typer.BadParameter("--grant-uses and --grant-unlimited exclude each other")
    approval: dict[str, Any] = dict(body.get("approval") or {})
    approval_flags: dict[str, Any] = {
        "required": approvals,
        "approvers": approver,
        "grant_max_uses": grant_uses,
        "grant_ttl_hours": parse_hours(grant_ttl) if grant_ttl else None,
        "request_ttl_hours": parse_hours(request_ttl) if request_ttl else None,
    }
    approval.update({k: v for k, v in approval_flags.items() if v is not None})
    if grant_unlimited:
        approval["grant_max_uses"] = None
    if approval:
        body["approval"] = approval
    policy = p.KeyPolicy.model_validate(body)
    with connection(ctx).admin() as c:
        c.signing_keys.set_policy(key, policy, tsg)
        found = c.signing_keys.get(key, tsg)
    if as_json:
        print_json({"policy": found.policy, "usage": found.usage})
    else:
        out.print(f"policy of key [bold]{found.name}[/] set")
        _show(found)


@policy_app.command("clear")
def policy_clear(
    ctx: typer.Context,
    key: KeyArg,
    tsg: KeyTsgOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Remove the key's policy: only the TSG boundary remains."""
    with connection(ctx).admin() as c:
        c.signing_keys.clear_policy(key, tsg)
    if as_json:
        print_json({"key": key, "policy": None})
    else:
        out.print(f"policy of key [bold]{key}[/] cleared")


def key_policy_details(key: p.SigningKey) -> list[tuple[str, str]]:
    """The policy and usage lines of ``signery key show``."""
    lines = [(f"policy: {rule}", value) for rule, value in policy_lines(key.policy)]
    usage = usage_line(key)
    if usage is not None:
        lines.append(("usage", usage))
    if not lines:
        lines.append(("policy", "none"))
    return lines
