"""``signery ca ...`` and ``signery ca-connector ...``: the built-in CA and the
external CAs configured on TSGs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from signery import protocol as p
from signery.cli._common import (
    JsonOpt,
    OutputOpt,
    TsgOpt,
    connection,
    day,
    details,
    emit,
    out,
    print_json,
    table,
    write_pem,
)
from signery.errors import ClientError

ca_app = typer.Typer(help="The built-in CA.", no_args_is_help=True)
ca_connector_app = typer.Typer(
    help="External CA connectors (csr, est), configured on a TSG for the keys below it.",
    no_args_is_help=True,
)


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

    est: dict[str, Any] = {}
    if kind is p.ConnectorKind.EST:
        if not est_url:
            raise ClientError("an est connector needs --est-url")
        est["est"] = p.EstSettings(
            url=est_url,
            username=est_username,
            password=read_secret_file(est_password_file) if est_password_file else None,
            tls_ca_pem=_read_text(tls_ca, "TLS CA bundle"),
            client_certificate_pem=_read_text(client_cert, "client certificate"),
            client_key_pem=_read_text(client_key, "client key"),
            timeout_seconds=timeout,
        )
    request = p.CaConnectorCreate(
        name=name,
        tsg_id=tsg,
        kind=kind,
        public=public,
        roots_pem=_read_text(roots, "roots") or "",
        **est,
    )
    with connection(ctx).admin() as c:
        created = c.ca_connectors.create(request)

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
        found = c.ca_connectors.list(tsg)
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
        found = c.ca_connectors.get(connector, tsg)
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
        c.ca_connectors.delete(connector, tsg)
    emit({"deleted": connector}, as_json, lambda: out.print(f"deleted CA connector {connector}"))


@ca_app.command("chain")
def ca_chain(
    ctx: typer.Context,
    output: OutputOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The built-in CA's issuing and root certificates (PEM)."""
    with connection(ctx).admin() as c:
        pem = c.ca.chain()
    write_pem(pem, output, as_json, "chain_pem")


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
        der = c.ca.crl()
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
            f"CRL #{number} ({len(crl)} revoked, next update {day(crl.next_update_utc)}) "
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
        record = c.ca.revoke(serial, p.CaCertificateRevoke(reason=reason))
    if as_json:
        print_json(record)
    else:
        held = f" of key {record.key_id} v{record.key_version}" if record.key_id else ""
        out.print(
            f"revoked certificate [bold]{record.serial}[/]{held} ({record.revocation_reason}): "
            f"{record.subject}",
            highlight=False,
        )
