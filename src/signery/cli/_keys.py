"""``signery key ...``: signing keys, their versions and their lifecycle.

The certificate commands of the group are in ``_key_certificates``, its policy
commands in ``_policy``, and how a key is printed in ``_key_views``."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Annotated

import typer

from signery import protocol as p
from signery.cli import _key_certificates as certificates
from signery.cli._common import (
    JsonOpt,
    KeyArg,
    KeyTsgOpt,
    OutputOpt,
    TsgOpt,
    connection,
    day,
    details,
    emit,
    out,
    parse_days,
    print_json,
    table,
    write_pem,
)
from signery.cli._key_views import key_details, key_lifecycle, request_note
from signery.cli._policy import key_policy_details, policy_app
from signery.client import Client


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
    rotation = (
        {"rotation_period_days": parse_days(rotate_every)} if rotate_every is not None else {}
    )
    request = p.KeyCreate(
        name=name,
        tsg_id=tsg,
        algorithm=algorithm,
        storage=storage,
        certificate_authority=(
            p.CertificateAuthority.CONNECTOR
            if connector and ca is p.CertificateAuthority.NONE
            else ca
        ),
        ca_connector=connector,
        subject=p.KeySubject(**{k: v for k, v in subject.items() if v is not None}),
        validity_days=validity_days,
        description=description,
        **rotation,
    )
    with connection(ctx).admin() as c:
        key = c.signing_keys.create(request)
    if as_json:
        print_json(key)
    else:
        out.print(f"created key [bold]{key.name}[/]")
        key_details(key)
        request_note(key)


def key_list(
    ctx: typer.Context,
    tsg: KeyTsgOpt = None,
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
    within = parse_days(expiring_within) if expiring_within is not None else None
    with connection(ctx).admin() as c:
        keys = c.signing_keys.list(tsg, expiring_within_days=within)

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
                    day(not_after(k)),
                )
                for k in keys
            ],
        ),
    )


def key_show(
    ctx: typer.Context,
    key: KeyArg,
    tsg: KeyTsgOpt = None,
    as_json: JsonOpt = False,
) -> None:
    with connection(ctx).admin() as c:
        found = c.signing_keys.get(key, tsg)

    def human() -> None:
        key_details(found)
        key_lifecycle(found)
        details(key_policy_details(found))

    emit(found, as_json, human)


def key_public_key(
    ctx: typer.Context,
    key: str,
    output: OutputOpt = None,
    tsg: KeyTsgOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The key's current public key (PEM)."""
    with connection(ctx).admin() as c:
        pem = c.signing_keys.public_key(key, tsg)
    write_pem(pem, output, as_json, "public_key_pem")


def key_chain(
    ctx: typer.Context,
    key: str,
    output: OutputOpt = None,
    tsg: KeyTsgOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The key's certificate chain (PEM, leaf first and root last)."""
    with connection(ctx).admin() as c:
        pem = c.signing_keys.chain(key, tsg)
    write_pem(pem, output, as_json, "chain_pem")


def _key_action(
    ctx: typer.Context,
    action: Callable[[Client], p.SigningKey],
    as_json: bool,
    message: str,
) -> None:
    """Run a lifecycle action and print the key's lifecycle after it."""
    with connection(ctx).admin() as c:
        changed = action(c)
    if as_json:
        print_json(changed)
    else:
        out.print(message.format(name=changed.name, key=changed), highlight=False)
        key_lifecycle(changed)


def key_rotate(
    ctx: typer.Context,
    key: KeyArg,
    validity_days: Annotated[
        int | None,
        typer.Option(help="Validity of the new version's certificate (default: the key's)."),
    ] = None,
    tsg: KeyTsgOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A new key version (and certificate) becomes current; clients use it at once.
    The previous version is archived and stays listed for verification. With an
    external CA connector, the new version waits for its certificate (key csr,
    key upload-certificate; EST: at once or key enroll) and the current one signs."""
    request = (
        p.KeyRotate(validity_days=validity_days) if validity_days is not None else p.KeyRotate()
    )
    with connection(ctx).admin() as c:
        changed = c.signing_keys.rotate(key, request, tsg)
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
    key_lifecycle(changed)


def key_cancel_rotation(
    ctx: typer.Context,
    key: KeyArg,
    tsg: KeyTsgOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Abandon a rotation waiting for its certificate from an external CA: the new
    version's key pair is destroyed; the current version signs on."""
    _key_action(
        ctx,
        lambda c: c.signing_keys.cancel_rotation(key, tsg),
        as_json,
        "rotation of [bold]{name}[/] cancelled: version {key.current_version} signs on",
    )


def key_rotation(
    ctx: typer.Context,
    key: KeyArg,
    every: Annotated[
        str | None, typer.Option("--every", help="Rotate every so long (90d, 12w, 1y).")
    ] = None,
    never: Annotated[bool, typer.Option("--never", help="Stop scheduled rotation.")] = False,
    tsg: KeyTsgOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Schedule the key's rotation (done by the server), or stop it."""
    if (every is None) == (not never):
        raise typer.BadParameter("give either --every DURATION or --never")
    period = parse_days(every) if every is not None else None
    if period == 0:
        raise typer.BadParameter("--every must be at least one day")
    schedule = p.KeyRotationSchedule(rotation_period_days=period)
    _key_action(
        ctx,
        lambda c: c.signing_keys.set_rotation(key, schedule, tsg),
        as_json,
        "rotation of [bold]{name}[/] updated",
    )


def key_disable(
    ctx: typer.Context,
    key: KeyArg,
    tsg: KeyTsgOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Refuse every signing with the key, on every replica, from the next request on."""
    _key_action(
        ctx, lambda c: c.signing_keys.disable(key, tsg), as_json, "disabled key [bold]{name}[/]"
    )


def key_enable(
    ctx: typer.Context,
    key: KeyArg,
    tsg: KeyTsgOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Let the key sign again."""
    _key_action(
        ctx, lambda c: c.signing_keys.enable(key, tsg), as_json, "enabled key [bold]{name}[/]"
    )


DESTROY_AFTER_DAYS = (7, 30)


def key_destroy(
    ctx: typer.Context,
    key: KeyArg,
    after: Annotated[
        str,
        typer.Option("--after", help="Waiting period before the material is erased: 7d to 30d."),
    ] = "30d",
    tsg: KeyTsgOpt = None,
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
    request = p.KeyDestroy(after_days=days)
    _key_action(
        ctx,
        lambda c: c.signing_keys.destroy(key, request, tsg),
        as_json,
        "key [bold]{name}[/] is disabled and will be destroyed at {key.destroy_at}",
    )


def key_cancel_destroy(
    ctx: typer.Context,
    key: KeyArg,
    tsg: KeyTsgOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Cancel a scheduled destruction: the key gets its previous status back."""
    _key_action(
        ctx,
        lambda c: c.signing_keys.cancel_destroy(key, tsg),
        as_json,
        "destruction of [bold]{name}[/] cancelled; it is {key.status.value} again",
    )


key_app = typer.Typer(help="Signing keys.", no_args_is_help=True)
# In the order `signery key --help` lists them.
for _name, _command in (
    ("create", key_create),
    ("list", key_list),
    ("show", key_show),
    ("public-key", key_public_key),
    ("chain", key_chain),
    ("renew", certificates.key_renew),
    ("reissue", certificates.key_reissue),
    ("certificates", certificates.key_certificates),
    ("revoke-certificate", certificates.key_revoke_certificate),
    ("rotate", key_rotate),
    ("cancel-rotation", key_cancel_rotation),
    ("rotation", key_rotation),
    ("disable", key_disable),
    ("enable", key_enable),
    ("destroy", key_destroy),
    ("cancel-destroy", key_cancel_destroy),
    ("csr", certificates.key_csr),
    ("upload-certificate", certificates.key_upload_certificate),
    ("enroll", certificates.key_enroll),
):
    key_app.command(_name)(_command)
key_app.add_typer(policy_app, name="policy")
