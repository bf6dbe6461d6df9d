"""``signery tsg subject-policy ...``: which certificate subjects the built-in CA
issues in a TSG's subtree."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from signery import protocol as p
from signery.cli._common import JsonOpt, connection, emit, out, print_json, table
from signery.errors import ClientError

# (wire field, row label) per subject attribute, in certificate order.
ATTRIBUTES: tuple[tuple[str, str], ...] = (
    ("common_name", "CN"),
    ("organization", "O"),
    ("organizational_unit", "OU"),
    ("country", "C"),
    ("email", "emailAddress"),
)
_PATTERN_HELP = "Repeat for several; '*' any value or none, '?*' any value, '' none."

subject_policy_app = typer.Typer(
    help="Subject policies: the certificate subjects the built-in CA issues in a TSG's "
    "subtree (every policy from the root down applies). Set by a superuser at the root TSG.",
    no_args_is_help=True,
)

TsgArg = Annotated[str, typer.Argument(help="TSG id.")]


def _patterns(patterns: list[str]) -> str:
    if not patterns:
        return "(not allowed)"
    return ", ".join("(none)" if x == "" else repr(x) for x in patterns)


def _show(policy: p.SubjectPolicy) -> None:
    if policy.effect is p.SubjectPolicyEffect.ANY_SUBJECT:
        out.print(
            f"TSG [bold]{policy.tsg_id}[/] is the root TSG and has no subject policy: "
            "the built-in CA certifies any subject here"
        )
        return
    if policy.effect is p.SubjectPolicyEffect.REFUSED:
        out.print(
            f"no subject policy applies to TSG [bold]{policy.tsg_id}[/]: the built-in CA "
            "certifies no key here until a root superuser sets one"
        )
        return
    for level in policy.path:
        own = level.tsg_id == policy.tsg_id
        title = f"subject policy of TSG {level.tsg_id}" + ("" if own else " (inherited)")
        table(
            title,
            ["attribute", "allowed"],
            [(label, _patterns(getattr(level.rules, name))) for name, label in ATTRIBUTES],
        )
    if len(policy.path) > 1:
        out.print("a subject must satisfy every policy above")


def _read_rules_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ClientError(f"cannot read a JSON subject policy from {path}: {e}") from e
    if not isinstance(data, dict):
        raise ClientError(f"{path} must hold a JSON object (a SubjectPolicyRules)")
    return data


@subject_policy_app.command("show")
def subject_policy_show(ctx: typer.Context, tsg: TsgArg, as_json: JsonOpt = False) -> None:
    """The TSG's own subject policy, those it inherits, and what they allow."""
    with connection(ctx).admin() as c:
        policy = c.tsgs.subject_policy(tsg)
    emit(policy, as_json, lambda: _show(policy))


@subject_policy_app.command("set")
def subject_policy_set(
    ctx: typer.Context,
    tsg: TsgArg,
    file: Annotated[
        Path | None,
        typer.Option("--file", help="A SubjectPolicyRules JSON document; the flags override it."),
    ] = None,
    cn: Annotated[
        list[str] | None, typer.Option("--cn", help=f"Allowed common name. {_PATTERN_HELP}")
    ] = None,
    org: Annotated[
        list[str] | None, typer.Option("--org", help=f"Allowed organization. {_PATTERN_HELP}")
    ] = None,
    ou: Annotated[
        list[str] | None,
        typer.Option("--ou", help=f"Allowed organizational unit. {_PATTERN_HELP}"),
    ] = None,
    country: Annotated[
        list[str] | None,
        typer.Option("--country", help=f"Allowed country code. {_PATTERN_HELP}"),
    ] = None,
    email: Annotated[
        list[str] | None, typer.Option("--email", help=f"Allowed e-mail address. {_PATTERN_HELP}")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Replace the TSG's own subject policy. An attribute given no pattern may not
    appear in a subject; the policies of the TSGs above keep applying."""
    body: dict[str, Any] = _read_rules_file(file) if file is not None else {}
    flags = {
        "common_name": cn,
        "organization": org,
        "organizational_unit": ou,
        "country": country,
        "email": email,
    }
    body.update({k: v for k, v in flags.items() if v is not None})
    with connection(ctx).admin() as c:
        policy = c.tsgs.set_subject_policy(tsg, p.SubjectPolicyRules.model_validate(body))
    if as_json:
        print_json(policy)
    else:
        out.print(f"subject policy of TSG [bold]{tsg}[/] set")
        _show(policy)


@subject_policy_app.command("clear")
def subject_policy_clear(ctx: typer.Context, tsg: TsgArg, as_json: JsonOpt = False) -> None:
    """Remove the TSG's own subject policy (those of the TSGs above keep applying)."""
    with connection(ctx).admin() as c:
        c.tsgs.clear_subject_policy(tsg)
        policy = c.tsgs.subject_policy(tsg)
    if as_json:
        print_json(policy)
    else:
        out.print(f"subject policy of TSG [bold]{tsg}[/] cleared")
        _show(policy)
