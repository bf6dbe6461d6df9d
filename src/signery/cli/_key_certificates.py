"""``signery key ...``: the certificate commands of signing keys (renew, reissue,
revoke, and the CSR round trip of an external CA); ``_keys`` registers them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from signery import protocol as p
from signery.cli._common import (
    JsonOpt,
    KeyArg,
    KeyTsgOpt,
    OutputOpt,
    connection,
    day,
    emit,
    out,
    print_json,
    table,
    write_pem,
)
from signery.cli._key_views import key_details, request_note
from signery.errors import ClientError


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


def key_renew(
    ctx: typer.Context,
    key: KeyArg,
    validity_days: Annotated[
        int | None, typer.Option(help="Validity of the new certificate (default: the key's).")
    ] = None,
    tsg: KeyTsgOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A new certificate for the same key pair and subject; the old one stays listed."""
    request = (
        p.CertificateRenew(validity_days=validity_days)
        if validity_days is not None
        else p.CertificateRenew()
    )
    with connection(ctx).admin() as c:
        renewed = c.signing_keys.renew(key, request, tsg)
    if as_json:
        print_json(renewed)
    else:
        out.print(f"renewed the certificate of [bold]{renewed.name}[/]")
        key_details(renewed)


def key_reissue(
    ctx: typer.Context,
    key: KeyArg,
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
    tsg: KeyTsgOpt = None,
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
    request = p.CertificateReissue(
        subject=p.KeySubject(**fields),
        **({"validity_days": validity_days} if validity_days is not None else {}),
    )
    with connection(ctx).admin() as c:
        reissued = c.signing_keys.reissue(key, request, tsg)
    if as_json:
        print_json(reissued)
    else:
        out.print(f"reissued the certificate of [bold]{reissued.name}[/]")
        key_details(reissued)


def key_certificates(
    ctx: typer.Context,
    key: KeyArg,
    tsg: KeyTsgOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Every certificate the key has had, newest first."""
    with connection(ctx).admin() as c:
        records = c.signing_keys.certificates(key, tsg)
    emit(
        records,
        as_json,
        lambda: table(
            None,
            ["serial", "status", "version", "subject", "not after", "source"],
            [
                (r.serial, r.status, r.key_version, r.subject, day(r.not_after), r.source)
                for r in records
            ],
        ),
    )


def key_revoke_certificate(
    ctx: typer.Context,
    key: KeyArg,
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
    tsg: KeyTsgOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Revoke a certificate of the key; the built-in CA's CRL lists it at once."""
    request = p.CertificateRevoke(
        reason=reason, **({"serial": serial} if serial is not None else {})
    )
    with connection(ctx).admin() as c:
        record = c.signing_keys.revoke_certificate(key, request, tsg)
    if as_json:
        print_json(record)
    else:
        out.print(f"revoked certificate [bold]{record.serial}[/] ({record.revocation_reason})")


def key_csr(
    ctx: typer.Context,
    key: str,
    output: OutputOpt = None,
    tsg: KeyTsgOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The CSR of the key's pending certificate request (PEM), for the CA."""
    with connection(ctx).admin() as c:
        pem = c.signing_keys.csr(key, tsg)
    write_pem(pem, output, as_json, "csr_pem")


def key_upload_certificate(
    ctx: typer.Context,
    key: str,
    chain: Annotated[Path, typer.Argument(help="PEM file: the issued certificate and its chain.")],
    tsg: KeyTsgOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Install the certificate a CA issued for the key's CSR. It must certify the key,
    carry the codeSigning EKU and reach the connector's roots."""
    try:
        pem = chain.read_text("ascii")
    except (OSError, UnicodeDecodeError) as e:
        raise ClientError(f"cannot read {chain}") from e
    with connection(ctx).admin() as c:
        found = c.signing_keys.upload_certificate(key, p.CertificateUpload(chain_pem=pem), tsg)

    def human() -> None:
        out.print(f"key {found.name}: {found.status.value}")
        key_details(found)

    emit(found, as_json, human)


def key_enroll(
    ctx: typer.Context,
    key: str,
    tsg: KeyTsgOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Send the key's pending request to its EST connector again."""
    with connection(ctx).admin() as c:
        found = c.signing_keys.enroll(key, tsg)

    def human() -> None:
        out.print(f"key {found.name}: {found.status.value}")
        key_details(found)
        request_note(found)

    emit(found, as_json, human)
