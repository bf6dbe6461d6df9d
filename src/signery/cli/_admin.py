"""Management commands: they call the REST API with a user's API token."""

from __future__ import annotations

import csv
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import typer

from signery import protocol as p
from signery.cli._common import (
    JsonOpt,
    connection,
    details,
    emit,
    err,
    out,
    parse_duration,
    print_json,
    table,
    write_private_file,
)
from signery.cli._policy import key_policy_details, policy_app
from signery.cli._subject_policy import subject_policy_app
from signery.errors import ClientError

API = p.API_PREFIX
TsgOpt = Annotated[str | None, typer.Option("--tsg", help="TSG id (default: your home TSG).")]

tsg_app = typer.Typer(help="Tenant Security Groups: the access boundaries.", no_args_is_help=True)
tsg_app.add_typer(subject_policy_app, name="subject-policy")
user_app = typer.Typer(help="Users (administrators) and their API tokens.", no_args_is_help=True)
token_app = typer.Typer(help="Personal API tokens.", no_args_is_help=True)
role_app = typer.Typer(help="Role bindings of users at TSGs.", no_args_is_help=True)
account_app = typer.Typer(
    help="Built-in accounts: the identities build machines sign as.", no_args_is_help=True
)
key_app = typer.Typer(help="Signing keys.", no_args_is_help=True)
key_app.add_typer(policy_app, name="policy")
audit_app = typer.Typer(help="Audit events.", no_args_is_help=True)
ca_app = typer.Typer(help="The built-in CA.", no_args_is_help=True)
keystore_app = typer.Typer(help="Key stores: where private keys live.", no_args_is_help=True)
ca_connector_app = typer.Typer(
    help="External CA connectors (csr, est), configured on a TSG for the keys below it.",
    no_args_is_help=True,
)
user_app.add_typer(token_app, name="token")


# ------------------------------------------------------------------ TSGs


def _tsg_rows(tsgs: list[p.Tsg]) -> None:
    table(
        None,
        ["id", "name", "parent", "depth", "created"],
        [(t.id, t.name, t.parent_id, t.depth, t.created_at) for t in tsgs],
    )


@tsg_app.command("create")
def tsg_create(
    ctx: typer.Context,
    name: str,
    parent: Annotated[
        str | None, typer.Option("--parent", help="Parent TSG id (default: your home TSG).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a child TSG."""
    with connection(ctx).admin() as c:
        tsg = c.call("POST", f"{API}/tsgs", p.Tsg, json={"name": name, "parent_id": parent})
    emit(
        tsg,
        as_json,
        lambda: out.print(f"created TSG [bold]{tsg.id}[/] ({tsg.name}) under {tsg.parent_id}"),
    )


@tsg_app.command("list")
def tsg_list(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """TSGs you can see."""
    with connection(ctx).admin() as c:
        tsgs = c.call("GET", f"{API}/tsgs", list[p.Tsg])
    emit(tsgs, as_json, lambda: _tsg_rows(tsgs))


@tsg_app.command("show")
def tsg_show(ctx: typer.Context, tsg_id: str, as_json: JsonOpt = False) -> None:
    with connection(ctx).admin() as c:
        tsg = c.call("GET", f"{API}/tsgs/{tsg_id}", p.Tsg)
    emit(tsg, as_json, lambda: details([(k, v) for k, v in tsg.model_dump().items()]))


@tsg_app.command("tree")
def tsg_tree(
    ctx: typer.Context,
    root: Annotated[str | None, typer.Option(help="Show only the subtree of this TSG.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """The TSG hierarchy you can see."""
    from rich.tree import Tree

    with connection(ctx).admin() as c:
        forest = c.call("GET", f"{API}/tsgs/tree", list[p.TsgTree], params={"root": root})

    def human() -> None:
        for node in forest:
            tree = Tree(f"[bold]{node.name}[/] {node.id}")
            _grow(tree, node)
            out.print(tree)

    emit(forest, as_json, human)


def _grow(tree: Any, node: p.TsgTree) -> None:
    for child in node.children:
        _grow(tree.add(f"[bold]{child.name}[/] {child.id}"), child)


# ------------------------------------------------------------------ users and tokens


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
        user = c.call(
            "POST",
            f"{API}/users",
            p.UserCreated,
            json={"username": username, "tsg_id": tsg, "password": password},
        )

    def human() -> None:
        out.print(f"created user [bold]{user.username}[/] ({user.id}) in TSG {user.tsg_id}")
        if user.password:
            out.print(f"generated password (shown once): [bold]{user.password}[/]", highlight=False)

    emit(user, as_json, human)


@user_app.command("list")
def user_list(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    with connection(ctx).admin() as c:
        users = c.call("GET", f"{API}/users", list[p.User])
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
        found = c.call("GET", f"{API}/users/{user}", p.User)
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
    body: dict[str, Any] = {"name": name}
    if days is not None:
        body["expires_in_days"] = days
    with connection(ctx).admin() as c:
        created = c.call("POST", f"{API}/users/{user}/tokens", p.ApiTokenCreated, json=body)
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
        tokens = c.call("GET", f"{API}/users/{user}/tokens", list[p.ApiToken])
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
        token = c.call("DELETE", f"{API}/tokens/{token_id}", p.ApiToken)
    emit(token, as_json, lambda: out.print(f"revoked token {token.id}"))


# ------------------------------------------------------------------ roles


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
        binding = c.call(
            "POST",
            f"{API}/role-bindings",
            p.RoleBinding,
            json={"principal_id": user, "role": role.value, "tsg_id": tsg},
        )
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
        bindings = c.call(
            "GET", f"{API}/role-bindings", list[p.RoleBinding], params={"tsg_id": tsg}
        )
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
        c.call_empty("DELETE", f"{API}/role-bindings/{binding_id}")
    emit({"removed": binding_id}, as_json, lambda: out.print(f"removed role binding {binding_id}"))


# ------------------------------------------------------------------ accounts


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
    body: dict[str, Any] = {
        "name": name,
        "tsg_id": tsg,
        "validity_days": validity_days,
        "key_algorithm": key_algorithm,
    }
    if public_key is not None:
        try:
            body["public_key_pem"] = public_key.read_text("ascii")
        except (OSError, UnicodeDecodeError) as e:
            raise ClientError(f"cannot read public key {public_key}") from e
    if key_out is not None and key_out.exists():
        raise ClientError(f"{key_out} already exists; refusing to overwrite a key file")
    with connection(ctx).admin() as c:
        account = c.call("POST", f"{API}/accounts", p.AccountCreated, json=body)
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
        accounts = c.call("GET", f"{API}/accounts", list[p.Account], params={"tsg_id": tsg})
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
        found = c.call("GET", f"{API}/accounts/{account}", p.Account)
    emit(found, as_json, lambda: _account_details(found))


def _set_enabled(ctx: typer.Context, account: str, action: str, as_json: bool) -> None:
    with connection(ctx).admin() as c:
        found = c.call("POST", f"{API}/accounts/{account}/{action}", p.Account)
    emit(found, as_json, lambda: out.print(f"account {found.name}: {found.status.value}"))


@account_app.command("disable")
def account_disable(ctx: typer.Context, account: str, as_json: JsonOpt = False) -> None:
    """Disable an account: its tokens stop working at once."""
    _set_enabled(ctx, account, "disable", as_json)


@account_app.command("enable")
def account_enable(ctx: typer.Context, account: str, as_json: JsonOpt = False) -> None:
    _set_enabled(ctx, account, "enable", as_json)


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
        found = c.call(
            "POST", f"{API}/accounts/{account}/keys", p.Account, json={"public_key_pem": pem}
        )
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
        found = c.call(
            "DELETE",
            f"{API}/accounts/{quote(account, safe='')}/keys/{quote(key_id, safe='')}",
            p.Account,
        )

    def human() -> None:
        out.print(f"removed key {key_id} from account [bold]{found.name}[/]")
        _account_details(found)

    emit(found, as_json, human)


# ------------------------------------------------------------------ keys


def _key_details(k: p.SigningKey) -> None:
    current = next((v for v in k.versions if v.version == k.current_version), None)
    cert = current.certificate if current else None
    details(
        [
            ("id", k.id),
            ("name", k.name),
            ("tsg", k.tsg_id),
            ("algorithm", k.algorithm.value),
            ("storage", k.storage),
            ("status", k.status.value),
            ("version", k.current_version),
            ("schemes", ", ".join(s.value for s in k.schemes)),
            ("CA", k.certificate_authority.value),
            (
                "certificate",
                f"{cert.subject} (serial {cert.serial}, until {cert.not_after})"
                if cert
                else "none",
            ),
        ]
    )


@key_app.command("create")
def key_create(
    ctx: typer.Context,
    name: str,
    algorithm: Annotated[p.Algorithm, typer.Option(help="Key algorithm.")],
    tsg: TsgOpt = None,
    ca: Annotated[
        p.CertificateAuthority,
        typer.Option("--ca", help="Who certifies the key: builtin, connector or none."),
    ] = p.CertificateAuthority.NONE,
    connector: Annotated[
        str | None,
        typer.Option(
            "--connector", help="CA connector (name or id) for --ca connector; implies it."
        ),
    ] = None,
    storage: Annotated[
        str,
        typer.Option(help="Key store: builtin, aws-kms or pkcs11 (see `signery keystore list`)."),
    ] = "builtin",
    cn: Annotated[
        str | None, typer.Option("--cn", help="Certificate common name (default: the key name).")
    ] = None,
    org: Annotated[str | None, typer.Option("--org", help="Certificate organization (O).")] = None,
    ou: Annotated[
        str | None, typer.Option("--ou", help="Certificate organizational unit (OU).")
    ] = None,
    country: Annotated[str | None, typer.Option(help="Two-letter country code (C).")] = None,
    email: Annotated[str | None, typer.Option(help="E-mail address (subjectAltName).")] = None,
    validity_days: Annotated[int, typer.Option(help="Certificate validity in days.")] = 365,
    description: Annotated[str | None, typer.Option(help="Free text.")] = None,
    rotate_every: Annotated[
        str | None,
        typer.Option("--rotate-every", help="Rotate the key every so long (90d, 12w, 1y)."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a signing key (generated inside its key store)."""
    subject = {
        "common_name": cn,
        "organization": org,
        "organizational_unit": ou,
        "country": country,
        "email": email,
    }
    body = {
        "name": name,
        "tsg_id": tsg,
        "algorithm": algorithm.value,
        "storage": storage,
        "certificate_authority": (
            p.CertificateAuthority.CONNECTOR
            if connector and ca is p.CertificateAuthority.NONE
            else ca
        ).value,
        "ca_connector": connector,
        "subject": {k: v for k, v in subject.items() if v is not None},
        "validity_days": validity_days,
        "description": description,
    }
    if rotate_every is not None:
        body["rotation_period_days"] = parse_days(rotate_every)
    with connection(ctx).admin() as c:
        key = c.call("POST", f"{API}/keys", p.SigningKey, json=body)
    if as_json:
        print_json(key)
    else:
        out.print(f"created key [bold]{key.name}[/]")
        _key_details(key)
        _request_note(key)


DURATION_UNITS = {"d": 1, "w": 7, "y": 365}


def parse_days(value: str) -> int:
    """``30d``, ``4w``, ``1y`` or a bare number of days."""
    text = value.strip().lower()
    unit = text[-1:] if text[-1:] in DURATION_UNITS else "d"
    number = text[:-1] if text[-1:] in DURATION_UNITS else text
    if not number.isdigit() or int(number) > 100 * 365:
        raise typer.BadParameter(f"{value!r} is not a duration such as 30d, 4w or 1y")
    return int(number) * DURATION_UNITS[unit]


@key_app.command("list")
def key_list(
    ctx: typer.Context,
    tsg: Annotated[str | None, typer.Option("--tsg")] = None,
    expiring_within: Annotated[
        str | None,
        typer.Option(
            "--expiring-within",
            help="Only keys whose current certificate ends within this time (30d, 4w, 1y); "
            "expired ones included.",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    params: dict[str, Any] = {"tsg_id": tsg}
    if expiring_within is not None:
        params["expiring_within_days"] = parse_days(expiring_within)
    with connection(ctx).admin() as c:
        keys = c.call("GET", f"{API}/keys", list[p.SigningKey], params=params)

    def not_after(k: p.SigningKey) -> datetime | None:
        current = next((v for v in k.versions if v.version == k.current_version), None)
        return current.certificate.not_after if current and current.certificate else None

    emit(
        keys,
        as_json,
        lambda: table(
            None,
            ["name", "id", "tsg", "algorithm", "storage", "status", "version", "CA", "until"],
            [
                (
                    k.name,
                    k.id,
                    k.tsg_id,
                    k.algorithm.value,
                    k.storage,
                    k.status.value,
                    k.current_version,
                    k.certificate_authority.value,
                    _day(not_after(k)),
                )
                for k in keys
            ],
        ),
    )


@key_app.command("show")
def key_show(
    ctx: typer.Context,
    key: Annotated[str, typer.Argument(help="Key name or id.")],
    tsg: Annotated[str | None, typer.Option("--tsg")] = None,
    as_json: JsonOpt = False,
) -> None:
    with connection(ctx).admin() as c:
        found = c.call("GET", f"{API}/keys/{key}", p.SigningKey, params={"tsg_id": tsg})

    def human() -> None:
        _key_details(found)
        _key_lifecycle(found)
        details(key_policy_details(found))

    emit(found, as_json, human)


def _key_lifecycle(k: p.SigningKey) -> None:
    """The rotation and destruction schedule, and every version with its status."""
    if k.rotation_period_days:
        rotation = f"every {k.rotation_period_days} days, next {k.next_rotation_at}"
    else:
        rotation = "manual only"
    if k.destroyed_at is not None:
        destruction = f"destroyed at {k.destroyed_at}"
    elif k.destroy_at is not None:
        destruction = f"scheduled for {k.destroy_at} (cancel: signery key cancel-destroy)"
    else:
        destruction = "not scheduled"
    details([("rotation", rotation), ("destruction", destruction)])

    def since(v: p.KeyVersion) -> datetime | None:
        return v.destroyed_at or v.archived_at or v.created_at

    table(
        "versions",
        ["version", "status", "since", "certificate serial", "not after"],
        [
            (
                v.version,
                v.status.value + (" (current)" if v.version == k.current_version else ""),
                since(v),
                v.certificate.serial if v.certificate else None,
                _day(v.certificate.not_after) if v.certificate else None,
            )
            for v in k.versions
        ],
    )


def _pem_command(
    ctx: typer.Context, path: str, output: Path | None, tsg: str | None, as_json: bool, what: str
) -> None:
    with connection(ctx).admin() as c:
        pem = c.call_text(path, params={"tsg_id": tsg})
    if output is not None:
        output.write_text(pem, "ascii")
    if as_json:
        print_json({what: pem, "file": str(output) if output else None})
    elif output is None:
        out.print(pem, end="", highlight=False)
    else:
        label = {"public_key_pem": "public key", "chain_pem": "certificate chain"}.get(what, what)
        out.print(f"{label} written to {output}")


@key_app.command("public-key")
def key_public_key(
    ctx: typer.Context,
    key: str,
    output: Annotated[Path | None, typer.Option("-o", "--output")] = None,
    tsg: Annotated[str | None, typer.Option("--tsg")] = None,
    as_json: JsonOpt = False,
) -> None:
    """The key's current public key (PEM)."""
    _pem_command(ctx, f"{API}/keys/{key}/public-key", output, tsg, as_json, "public_key_pem")


@key_app.command("chain")
def key_chain(
    ctx: typer.Context,
    key: str,
    output: Annotated[Path | None, typer.Option("-o", "--output")] = None,
    tsg: Annotated[str | None, typer.Option("--tsg")] = None,
    as_json: JsonOpt = False,
) -> None:
    """The key's certificate chain (PEM, leaf first and root last)."""
    _pem_command(ctx, f"{API}/keys/{key}/chain", output, tsg, as_json, "chain_pem")


def _day(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M") if moment else ""


def _subject(
    cn: str | None, org: str | None, ou: str | None, country: str | None, email: str | None
) -> dict[str, str]:
    subject = {
        "common_name": cn,
        "organization": org,
        "organizational_unit": ou,
        "country": country,
        "email": email,
    }
    return {k: v for k, v in subject.items() if v is not None}


SUBJECT_KEYS = {
    "cn": "common_name",
    "o": "organization",
    "ou": "organizational_unit",
    "c": "country",
    "email": "email",
    "emailaddress": "email",
}


def parse_subject(text: str) -> dict[str, str]:
    """``CN=Example Release,O=Example Inc,OU=Build,C=DE,email=rel@example.com``.

    A comma inside a value is written ``\\,`` (as in RFC 4514)."""
    subject: dict[str, str] = {}
    parts, current, escaped = [], "", False
    for ch in text:
        if escaped:
            current += ch
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ",":
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    for part in parts:
        name, sep, value = part.partition("=")
        field = SUBJECT_KEYS.get(name.strip().lower())
        if not sep or field is None or not value.strip():
            raise typer.BadParameter(
                f"{part.strip()!r}: expected NAME=value with NAME one of CN, O, OU, C, email"
            )
        if field in subject:
            raise typer.BadParameter(f"{name.strip()} is given twice")
        subject[field] = value.strip()
    return subject


@key_app.command("renew")
def key_renew(
    ctx: typer.Context,
    key: Annotated[str, typer.Argument(help="Key name or id.")],
    validity_days: Annotated[
        int | None, typer.Option(help="Validity of the new certificate (default: the key's).")
    ] = None,
    tsg: Annotated[str | None, typer.Option("--tsg")] = None,
    as_json: JsonOpt = False,
) -> None:
    """A new certificate for the same key pair and subject; the old one stays listed."""
    body = {"validity_days": validity_days} if validity_days is not None else {}
    with connection(ctx).admin() as c:
        renewed = c.call(
            "POST", f"{API}/keys/{key}/renew", p.SigningKey, json=body, params={"tsg_id": tsg}
        )
    if as_json:
        print_json(renewed)
    else:
        out.print(f"renewed the certificate of [bold]{renewed.name}[/]")
        _key_details(renewed)


@key_app.command("reissue")
def key_reissue(
    ctx: typer.Context,
    key: Annotated[str, typer.Argument(help="Key name or id.")],
    subject: Annotated[
        str | None,
        typer.Option(help="New subject, e.g. 'CN=Example Release,O=Example Inc,C=DE'."),
    ] = None,
    cn: Annotated[str | None, typer.Option("--cn", help="Common name (CN).")] = None,
    org: Annotated[str | None, typer.Option("--org", help="Organization (O).")] = None,
    ou: Annotated[str | None, typer.Option("--ou", help="Organizational unit (OU).")] = None,
    country: Annotated[str | None, typer.Option(help="Two-letter country code (C).")] = None,
    email: Annotated[str | None, typer.Option(help="E-mail address (subjectAltName).")] = None,
    validity_days: Annotated[int | None, typer.Option(help="Validity in days.")] = None,
    tsg: Annotated[str | None, typer.Option("--tsg")] = None,
    as_json: JsonOpt = False,
) -> None:
    """A new certificate for the same key pair with a changed subject."""
    fields = parse_subject(subject) if subject else {}
    for name, value in _subject(cn, org, ou, country, email).items():
        if name in fields:
            raise typer.BadParameter(f"{name} is given both in --subject and as an option")
        fields[name] = value
    if not fields:
        raise typer.BadParameter("give the new subject: --subject 'CN=...,O=...' or --cn/--org/...")
    body: dict[str, Any] = {"subject": fields}
    if validity_days is not None:
        body["validity_days"] = validity_days
    with connection(ctx).admin() as c:
        reissued = c.call(
            "POST", f"{API}/keys/{key}/reissue", p.SigningKey, json=body, params={"tsg_id": tsg}
        )
    if as_json:
        print_json(reissued)
    else:
        out.print(f"reissued the certificate of [bold]{reissued.name}[/]")
        _key_details(reissued)


@key_app.command("certificates")
def key_certificates(
    ctx: typer.Context,
    key: Annotated[str, typer.Argument(help="Key name or id.")],
    tsg: Annotated[str | None, typer.Option("--tsg")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Every certificate the key has had, newest first."""
    with connection(ctx).admin() as c:
        records = c.call(
            "GET",
            f"{API}/keys/{key}/certificates",
            list[p.CertificateRecord],
            params={"tsg_id": tsg},
        )
    emit(
        records,
        as_json,
        lambda: table(
            None,
            ["serial", "status", "version", "subject", "not after", "source"],
            [
                (r.serial, r.status, r.key_version, r.subject, _day(r.not_after), r.source)
                for r in records
            ],
        ),
    )


@key_app.command("revoke-certificate")
def key_revoke_certificate(
    ctx: typer.Context,
    key: Annotated[str, typer.Argument(help="Key name or id.")],
    serial: Annotated[
        str | None, typer.Option(help="Hex serial (default: the current certificate).")
    ] = None,
    reason: Annotated[
        str,
        typer.Option(
            help="RFC 5280 reason: unspecified, keyCompromise, superseded, "
            "cessationOfOperation, affiliationChanged, privilegeWithdrawn..."
        ),
    ] = "unspecified",
    tsg: Annotated[str | None, typer.Option("--tsg")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Revoke a certificate of the key; the built-in CA's CRL lists it at once."""
    body: dict[str, Any] = {"reason": reason}
    if serial is not None:
        body["serial"] = serial
    with connection(ctx).admin() as c:
        record = c.call(
            "POST",
            f"{API}/keys/{key}/revoke-certificate",
            p.CertificateRecord,
            json=body,
            params={"tsg_id": tsg},
        )
    if as_json:
        print_json(record)
    else:
        out.print(f"revoked certificate [bold]{record.serial}[/] ({record.revocation_reason})")


def _key_action(
    ctx: typer.Context,
    key: str,
    action: str,
    tsg: str | None,
    as_json: bool,
    message: str,
    body: dict[str, Any] | None = None,
    method: str = "POST",
) -> None:
    with connection(ctx).admin() as c:
        changed = c.call(
            method,
            f"{API}/keys/{quote(key, safe='')}/{action}",
            p.SigningKey,
            json=body or {},
            params={"tsg_id": tsg},
        )
    if as_json:
        print_json(changed)
    else:
        out.print(message.format(name=changed.name, key=changed), highlight=False)
        _key_lifecycle(changed)


@key_app.command("rotate")
def key_rotate(
    ctx: typer.Context,
    key: Annotated[str, typer.Argument(help="Key name or id.")],
    validity_days: Annotated[
        int | None,
        typer.Option(help="Validity of the new version's certificate (default: the key's)."),
    ] = None,
    tsg: Annotated[str | None, typer.Option("--tsg")] = None,
    as_json: JsonOpt = False,
) -> None:
    """A new key version (and certificate) becomes current; clients use it at once.
    The previous version is archived and stays listed for verification. With an
    external CA connector, the new version waits for its certificate (key csr,
    key upload-certificate; EST: at once or key enroll) and the current one signs."""
    body = {"validity_days": validity_days} if validity_days is not None else {}
    with connection(ctx).admin() as c:
        changed = c.call(
            "POST",
            f"{API}/keys/{quote(key, safe='')}/rotate",
            p.SigningKey,
            json=body,
            params={"tsg_id": tsg},
        )
    if as_json:
        print_json(changed)
        return
    waiting = [v.version for v in changed.versions if v.version > changed.current_version]
    if waiting:
        out.print(
            f"rotating [bold]{changed.name}[/]: version {waiting[-1]} waits for its certificate "
            f"(signery key csr / upload-certificate); version {changed.current_version} "
            "signs meanwhile",
            highlight=False,
        )
    else:
        out.print(
            f"rotated [bold]{changed.name}[/]: version {changed.current_version} is current",
            highlight=False,
        )
    _key_lifecycle(changed)


@key_app.command("cancel-rotation")
def key_cancel_rotation(
    ctx: typer.Context,
    key: Annotated[str, typer.Argument(help="Key name or id.")],
    tsg: Annotated[str | None, typer.Option("--tsg")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Abandon a rotation waiting for its certificate from an external CA: the new
    version's key pair is destroyed; the current version signs on."""
    _key_action(
        ctx,
        key,
        "cancel-rotation",
        tsg,
        as_json,
        "rotation of [bold]{name}[/] cancelled: version {key.current_version} signs on",
    )


@key_app.command("rotation")
def key_rotation(
    ctx: typer.Context,
    key: Annotated[str, typer.Argument(help="Key name or id.")],
    every: Annotated[
        str | None, typer.Option("--every", help="Rotate every so long (90d, 12w, 1y).")
    ] = None,
    never: Annotated[bool, typer.Option("--never", help="Stop scheduled rotation.")] = False,
    tsg: Annotated[str | None, typer.Option("--tsg")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Schedule the key's rotation (done by the server), or stop it."""
    if (every is None) == (not never):
        raise typer.BadParameter("give either --every DURATION or --never")
    period = parse_days(every) if every is not None else None
    if period == 0:
        raise typer.BadParameter("--every must be at least one day")
    _key_action(
        ctx,
        key,
        "rotation",
        tsg,
        as_json,
        "rotation of [bold]{name}[/] updated",
        {"rotation_period_days": period},
        method="PUT",
    )


@key_app.command("disable")
def key_disable(
    ctx: typer.Context,
    key: Annotated[str, typer.Argument(help="Key name or id.")],
    tsg: Annotated[str | None, typer.Option("--tsg")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Refuse every signing with the key, on every replica, from the next request on."""
    _key_action(ctx, key, "disable", tsg, as_json, "disabled key [bold]{name}[/]")


@key_app.command("enable")
def key_enable(
    ctx: typer.Context,
    key: Annotated[str, typer.Argument(help="Key name or id.")],
    tsg: Annotated[str | None, typer.Option("--tsg")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Let the key sign again."""
    _key_action(ctx, key, "enable", tsg, as_json, "enabled key [bold]{name}[/]")


DESTROY_AFTER_DAYS = (7, 30)


@key_app.command("destroy")
def key_destroy(
    ctx: typer.Context,
    key: Annotated[str, typer.Argument(help="Key name or id.")],
    after: Annotated[
        str,
        typer.Option("--after", help="Waiting period before the material is erased: 7d to 30d."),
    ] = "30d",
    tsg: Annotated[str | None, typer.Option("--tsg")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Disable the key now and destroy its key material (every version, in its
    store) when the waiting period ends. Final once done; cancel before with
    `signery key cancel-destroy`."""
    days = parse_days(after)
    low, high = DESTROY_AFTER_DAYS
    if not low <= days <= high:
        raise typer.BadParameter(
            f"--after must be between {low}d and {high}d (got {days} days)", param_hint="--after"
        )
    _key_action(
        ctx,
        key,
        "destroy",
        tsg,
        as_json,
        "key [bold]{name}[/] is disabled and will be destroyed at {key.destroy_at}",
        {"after_days": days},
    )


@key_app.command("cancel-destroy")
def key_cancel_destroy(
    ctx: typer.Context,
    key: Annotated[str, typer.Argument(help="Key name or id.")],
    tsg: Annotated[str | None, typer.Option("--tsg")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Cancel a scheduled destruction: the key gets its previous status back."""
    _key_action(
        ctx,
        key,
        "cancel-destroy",
        tsg,
        as_json,
        "destruction of [bold]{name}[/] cancelled; it is {key.status.value} again",
    )


def _request_note(key: p.SigningKey) -> None:
    """What an administrator should do about a key waiting for its CA connector."""
    request = key.certificate_request
    if request is None or request.status is not p.CertificateRequestStatus.PENDING:
        return
    if request.error:
        err.print(f"[yellow]certificate request {request.id}: {request.error}[/]", highlight=False)
        err.print(f"retry with: signery key enroll {key.name}", highlight=False)
    else:
        err.print(
            f"[yellow]waiting for the CA ({request.purpose}): get the CSR with "
            f"`signery key csr {key.name} -o {key.name}.csr`, then "
            f"`signery key upload-certificate {key.name} chain.pem`[/]",
            highlight=False,
        )


@key_app.command("csr")
def key_csr(
    ctx: typer.Context,
    key: str,
    output: Annotated[Path | None, typer.Option("-o", "--output")] = None,
    tsg: Annotated[str | None, typer.Option("--tsg")] = None,
    as_json: JsonOpt = False,
) -> None:
    """The CSR of the key's pending certificate request (PEM), for the CA."""
    _pem_command(ctx, f"{API}/keys/{key}/csr", output, tsg, as_json, "csr_pem")


@key_app.command("upload-certificate")
def key_upload_certificate(
    ctx: typer.Context,
    key: str,
    chain: Annotated[Path, typer.Argument(help="PEM file: the issued certificate and its chain.")],
    tsg: Annotated[str | None, typer.Option("--tsg")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Install the certificate a CA issued for the key's CSR. It must certify the key,
    carry the codeSigning EKU and reach the connector's roots."""
    try:
        pem = chain.read_text("ascii")
    except (OSError, UnicodeDecodeError) as e:
        raise ClientError(f"cannot read {chain}") from e
    with connection(ctx).admin() as c:
        found = c.call(
            "POST",
            f"{API}/keys/{key}/certificate",
            p.SigningKey,
            json={"chain_pem": pem},
            params={"tsg_id": tsg},
        )

    def human() -> None:
        out.print(f"key {found.name}: {found.status.value}")
        _key_details(found)

    emit(found, as_json, human)


@key_app.command("enroll")
def key_enroll(
    ctx: typer.Context,
    key: str,
    tsg: Annotated[str | None, typer.Option("--tsg")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Send the key's pending request to its EST connector again."""
    with connection(ctx).admin() as c:
        found = c.call("POST", f"{API}/keys/{key}/enroll", p.SigningKey, params={"tsg_id": tsg})

    def human() -> None:
        out.print(f"key {found.name}: {found.status.value}")
        _key_details(found)
        _request_note(found)

    emit(found, as_json, human)


# ------------------------------------------------------------------ CA connectors


def _read_text(path: Path | None, what: str) -> str | None:
    if path is None:
        return None
    try:
        return path.read_text("ascii")
    except (OSError, UnicodeDecodeError) as e:
        raise ClientError(f"cannot read {what} {path}") from e


def _connector_details(c: p.CaConnector) -> None:
    rows: list[tuple[str, Any]] = [
        ("id", c.id),
        ("name", c.name),
        ("tsg", c.tsg_id),
        ("kind", c.kind.value),
        ("public", c.public),
        ("roots", "; ".join(f"{r.subject} ({r.fingerprint_sha256[:16]})" for r in c.roots)),
    ]
    if c.est is not None:
        rows += [
            ("EST URL", c.est.url),
            ("EST user", c.est.username or "-"),
            ("password", "set" if c.est.has_password else "none"),
            ("TLS CA", "configured" if c.est.tls_ca_pem else "system trust store"),
            ("client cert", "set" if c.est.has_client_key else "none"),
        ]
    details(rows)


@ca_connector_app.command("create")
def ca_connector_create(
    ctx: typer.Context,
    name: str,
    kind: Annotated[p.ConnectorKind, typer.Option("--kind", help="csr or est.")],
    roots: Annotated[
        Path, typer.Option(help="PEM file: the trust anchors issued chains must reach.")
    ],
    tsg: TsgOpt = None,
    public: Annotated[
        bool, typer.Option("--public", help="A public CA: only hardware-store keys may use it.")
    ] = False,
    est_url: Annotated[
        str | None,
        typer.Option(help="EST base URL: https://host/.well-known/est (or .../est/LABEL)."),
    ] = None,
    est_username: Annotated[str | None, typer.Option(help="EST HTTP basic auth user.")] = None,
    est_password_file: Annotated[
        Path | None, typer.Option(help="File holding the EST password (- for stdin).")
    ] = None,
    tls_ca: Annotated[
        Path | None, typer.Option(help="PEM CA bundle for the EST server's TLS certificate.")
    ] = None,
    client_cert: Annotated[
        Path | None, typer.Option(help="PEM TLS client certificate for the EST server.")
    ] = None,
    client_key: Annotated[Path | None, typer.Option(help="Its PEM private key.")] = None,
    timeout: Annotated[float, typer.Option(help="EST request timeout in seconds.")] = 30,
    as_json: JsonOpt = False,
) -> None:
    """Configure an external CA on a TSG. Secrets are stored encrypted, never shown."""
    from signery.cli._common import read_secret_file

    body: dict[str, Any] = {
        "name": name,
        "tsg_id": tsg,
        "kind": kind.value,
        "public": public,
        "roots_pem": _read_text(roots, "roots"),
    }
    if kind is p.ConnectorKind.EST:
        if not est_url:
            raise ClientError("an est connector needs --est-url")
        body["est"] = {
            "url": est_url,
            "username": est_username,
            "password": read_secret_file(est_password_file) if est_password_file else None,
            "tls_ca_pem": _read_text(tls_ca, "TLS CA bundle"),
            "client_certificate_pem": _read_text(client_cert, "client certificate"),
            "client_key_pem": _read_text(client_key, "client key"),
            "timeout_seconds": timeout,
        }
    with connection(ctx).admin() as c:
        created = c.call("POST", f"{API}/ca-connectors", p.CaConnector, json=body)

    def human() -> None:
        out.print(f"created CA connector [bold]{created.name}[/]")
        _connector_details(created)

    emit(created, as_json, human)


@ca_connector_app.command("list")
def ca_connector_list(
    ctx: typer.Context,
    tsg: Annotated[str | None, typer.Option("--tsg")] = None,
    as_json: JsonOpt = False,
) -> None:
    """CA connectors you can see."""
    with connection(ctx).admin() as c:
        found = c.call("GET", f"{API}/ca-connectors", list[p.CaConnector], params={"tsg_id": tsg})
    emit(
        found,
        as_json,
        lambda: table(
            None,
            ["name", "id", "tsg", "kind", "public", "EST URL"],
            [
                (x.name, x.id, x.tsg_id, x.kind.value, x.public, x.est.url if x.est else "")
                for x in found
            ],
        ),
    )


@ca_connector_app.command("show")
def ca_connector_show(
    ctx: typer.Context,
    connector: str,
    tsg: Annotated[str | None, typer.Option("--tsg")] = None,
    as_json: JsonOpt = False,
) -> None:
    with connection(ctx).admin() as c:
        found = c.call(
            "GET", f"{API}/ca-connectors/{connector}", p.CaConnector, params={"tsg_id": tsg}
        )
    emit(found, as_json, lambda: _connector_details(found))


@ca_connector_app.command("delete")
def ca_connector_delete(
    ctx: typer.Context,
    connector: str,
    tsg: Annotated[str | None, typer.Option("--tsg")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Remove a connector that no key uses."""
    with connection(ctx).admin() as c:
        c.call_empty("DELETE", f"{API}/ca-connectors/{connector}", params={"tsg_id": tsg})
    emit({"deleted": connector}, as_json, lambda: out.print(f"deleted CA connector {connector}"))


@keystore_app.command("list")
def keystore_list(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """The key stores of the server, with their health."""
    with connection(ctx).admin() as c:
        stores = c.call("GET", f"{API}/keystores", list[p.KeyStoreInfo])
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


@ca_app.command("chain")
def ca_chain(
    ctx: typer.Context,
    output: Annotated[Path | None, typer.Option("-o", "--output")] = None,
    as_json: JsonOpt = False,
) -> None:
    """The built-in CA's issuing and root certificates (PEM)."""
    _pem_command(ctx, f"{API}/ca/chain", output, None, as_json, "chain_pem")


@ca_app.command("crl")
def ca_crl(
    ctx: typer.Context,
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the CRL.")],
    pem: Annotated[bool, typer.Option("--pem", help="PEM instead of DER.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """The built-in CA's current certificate revocation list."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    with connection(ctx).admin() as c:
        der = c.call_bytes(f"{API}/ca/crl")
    try:
        crl = x509.load_der_x509_crl(der)
    except ValueError as e:
        raise ClientError("the server's answer is not a DER CRL") from e
    output.write_bytes(crl.public_bytes(serialization.Encoding.PEM) if pem else der)
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    summary = {
        "file": str(output),
        "number": number,
        "revoked": len(crl),
        "this_update": crl.last_update_utc.isoformat(),
        "next_update": crl.next_update_utc.isoformat() if crl.next_update_utc else None,
    }
    if as_json:
        print_json(summary)
    else:
        out.print(
            f"CRL #{number} ({len(crl)} revoked, next update {_day(crl.next_update_utc)}) "
            f"written to {output}"
        )


@ca_app.command("revoke")
def ca_revoke(
    ctx: typer.Context,
    serial: Annotated[
        str, typer.Argument(help="Hex serial, as `openssl x509 -serial -noout` prints it.")
    ],
    reason: Annotated[
        str,
        typer.Option(
            help="RFC 5280 reason: unspecified, keyCompromise, superseded, "
            "cessationOfOperation, affiliationChanged, privilegeWithdrawn..."
        ),
    ] = "unspecified",
    as_json: JsonOpt = False,
) -> None:
    """Revoke a certificate the built-in CA issued (over EST or for a key), by serial;
    the CRL lists it at once. Needs signery.ca.revoke at the root TSG."""
    with connection(ctx).admin() as c:
        record = c.call(
            "POST",
            f"{API}/ca/certificates/{quote(serial, safe=':')}/revoke",
            p.CaCertificate,
            json={"reason": reason},
        )
    if as_json:
        print_json(record)
    else:
        held = f" of key {record.key_id} v{record.key_version}" if record.key_id else ""
        out.print(
            f"revoked certificate [bold]{record.serial}[/]{held} ({record.revocation_reason}): "
            f"{record.subject}",
            highlight=False,
        )


# ------------------------------------------------------------------ audit and usage


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
            page = c.call(
                "GET",
                f"{API}/audit/events",
                p.AuditEventPage,
                params={
                    "tsg_id": tsg,
                    "key_id": key,
                    "account_id": account,
                    "outcome": outcome.value if outcome else None,
                    "kind": kind,
                    "since": since.isoformat() if since else None,
                    "until": until.isoformat() if until else None,
                    "limit": min(1000, limit - len(events)),
                    "cursor": cursor,
                    "order": "desc" if newest_first else "asc",
                },
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

    def events(c: Any) -> Any:
        cursor: str | None = None
        while True:
            page = c.call(
                "GET",
                f"{API}/audit/events",
                p.AuditEventPage,
                params={"limit": 1000, "cursor": cursor},
            )
            for e in page.events:
                row = e.model_dump(exclude={"principal"})
                row["outcome"] = e.outcome.value
                row["principal_type"] = e.principal.type.value
                row["principal_id"] = e.principal.id
                row["principal_name"] = e.principal.name
                yield row
            cursor = page.next_cursor
            if cursor is None:
                return

    with connection(ctx).admin() as c:
        stored = c.call("GET", f"{API}/audit/checkpoints", p.AuditCheckpointList)
        keys = pinned
        if keys is None:
            key = c.call("GET", f"{API}/audit/checkpoints/public-key", p.AuditSigningKey)
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
        made = c.call("POST", f"{API}/audit/checkpoints", p.AuditCheckpointList)
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
        report = c.call(
            "GET",
            f"{API}/usage",
            p.UsageReport,
            params={
                "scope": scope.value if scope else None,
                "tsg_id": tsg,
                "since": _when(since).date().isoformat() if since else None,
                "until": _when(until).date().isoformat() if until else None,
                "top": top,
                "group_by": "day" if by_day else None,
            },
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
    params = {
        "since": _when(since).isoformat() if since else None,
        "until": _when(until).isoformat() if until else None,
        "format": fmt.value,
    }
    with connection(ctx).admin() as c, c.call_stream(f"{API}/audit/export", params) as chunks:
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
