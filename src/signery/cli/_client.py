"""Build-machine commands beside signing: keys, key export, timestamp."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated

import typer

from signery import __version__
from signery import protocol as p
from signery.cli._common import (
    JsonOpt,
    KeyArg,
    check_files,
    connection,
    details,
    emit,
    err,
    out,
    print_json,
    table,
)
from signery.client import request_timestamp
from signery.crypto import hash_file
from signery.errors import ClientError, SigneryError
from signery.formats import export_public_key, write_atomically


def keys(
    ctx: typer.Context,
    everything: Annotated[
        bool,
        typer.Option(
            "--all",
            help="Also the keys you cannot sign with now, each with the reason "
            "(their public keys still verify earlier signatures).",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Keys your built-in account can sign with now. A name means the nearest key:
    the one in your own TSG first, then below it ("distance")."""
    with connection(ctx).signing() as c:
        found = c.keys(everything=everything)
    columns = ["name", "id", "tsg", "distance", "algorithm", "version", "schemes", "certificate"]
    emit(
        found,
        as_json,
        lambda: table(
            None,
            [*columns, "usable"] if everything else columns,
            [
                (
                    k.name,
                    k.id,
                    k.tsg_id,
                    k.distance,
                    k.algorithm.value,
                    k.current_version,
                    ", ".join(s.value for s in k.schemes),
                    "yes" if k.certificate_chain else "no",
                    *([("yes" if k.usable else f"no: {k.unusable_reason}")] if everything else []),
                )
                for k in found
            ],
        ),
    )


def key_export(
    ctx: typer.Context,
    key: KeyArg,
    openpgp: Annotated[
        bool, typer.Option("--openpgp", help="Export as an OpenPGP public key (armored).")
    ] = False,
    uid: Annotated[
        str | None, typer.Option("--uid", help='OpenPGP User ID, e.g. "Release <rel@example.org>".')
    ] = None,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Write to a file instead of stdout.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Export a signing key for publication: with --openpgp, its OpenPGP public key.

    The OpenPGP self-signature is made by the key itself, through the signing plane:
    this command authenticates as a built-in account allowed to sign with the key
    (like `signery sign`: --client-id/--key-file or a `login --client-id` profile),
    not with an API token. The fingerprint is the same for every export of one key
    version; `gpg --import` the result to verify `signery sign --format openpgp`."""
    if not openpgp:
        raise ClientError("choose an export format: --openpgp")
    if uid is None:
        raise ClientError('--openpgp needs --uid "Name <email>"')
    client_info = p.ClientInfo(
        machine=socket.gethostname()[:256], tool=f"signery-cli/{__version__} openpgp-export"
    )
    with connection(ctx).signing() as c:
        exported = export_public_key(c.signer(key, client_info=client_info), uid)
    text = exported.armored()
    if output is not None:
        try:
            write_atomically(output, text.encode("ascii"))
        except OSError as e:
            raise ClientError(f"cannot write {output}: {e.strerror}") from None
    if as_json:
        print_json(
            {
                "key": key,
                "key_version": exported.key_version,
                "fingerprint": exported.fingerprint,
                "key_id": exported.key.key_id,
                "created_at": exported.key.created_at.isoformat(),
                "user_id": exported.user_id,
                "public_key": text,
                "file": str(output) if output else None,
            }
        )
    elif output is None:
        out.print(text, end="", highlight=False)
    else:
        out.print(f"OpenPGP public key written to {output}")
        details(
            [
                ("fingerprint", exported.fingerprint),
                ("user id", exported.user_id),
                ("created", exported.key.created_at.isoformat()),
                ("key version", exported.key_version),
            ]
        )


def timestamp(
    ctx: typer.Context,
    files: Annotated[list[Path], typer.Argument(help="Files (or signatures) to timestamp.")],
    tsa: Annotated[
        str | None,
        typer.Option(help="Any RFC 3161 TSA URL. Default: the Signery server's /api/v1/tsa."),
    ] = None,
    digest_algorithm: Annotated[
        p.DigestAlgorithm, typer.Option(help="Hash sent as the message imprint.")
    ] = p.DigestAlgorithm.SHA256,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Reply file (one input only).")
    ] = None,
    query_output: Annotated[
        Path | None,
        typer.Option(
            "--query-out",
            help="Also write the query (one input only), for `openssl ts -verify -queryfile`.",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Get an RFC 3161 timestamp for each file: FILE.tsr, the DER TimeStampResp.

    Only the file's hash leaves this machine. The reply is checked (granted, same
    hash, same nonce) before it is written; `openssl ts -verify -data FILE -in
    FILE.tsr -CAfile ROOT` verifies it. Every file is tried; the exit status is 1
    if any failed."""
    check_files(files)
    if (output is not None or query_output is not None) and len(files) != 1:
        raise ClientError("-o/--output and --query-out work with exactly one file")
    url, verify, headers = connection(ctx).timestamping(tsa)
    results: list[dict[str, object]] = []
    for f in files:
        target = output or f.with_name(f.name + ".tsr")
        try:
            query, stamp = request_timestamp(
                url, hash_file(f, digest_algorithm), headers=headers, verify=verify
            )
            write_atomically(target, stamp.reply)
            if query_output is not None:
                write_atomically(query_output, query.der)
        except SigneryError as e:
            results.append({"file": str(f), "ok": False, "code": e.code, "detail": e.detail})
            continue
        except OSError as e:  # the reply could not be written: nothing half-written is left
            detail = f"cannot write {target}: {e.strerror}"
            results.append({"file": str(f), "ok": False, "code": "client_error", "detail": detail})
            continue
        results.append(
            {
                "file": str(f),
                "ok": True,
                "output": str(target),
                "gen_time": stamp.gen_time.isoformat(),
                "serial": f"{stamp.serial:x}",
                "policy": stamp.policy,
                "digest_algorithm": digest_algorithm.value,
            }
        )
    if as_json:
        print_json(results)
    else:
        for r in results:
            if r["ok"]:
                out.print(
                    f"timestamped {r['file']} -> {r['output']} ({r['gen_time']}, "
                    f"serial {r['serial']}, policy {r['policy']})",
                    highlight=False,
                )
            else:
                err.print(
                    f"[red]failed[/] {r['file']}: {r['code']}: {r['detail']}", highlight=False
                )
    if not all(r["ok"] for r in results):
        raise typer.Exit(1)
