"""``signery sign`` and ``signery verify``: options and printing.

The work is the library's: :func:`signery.client.sign_files` signs (concurrency,
approvals, interrupts), the formats verify. This module turns options into those
calls and their results into lines, JSON and exit statuses; and it owns the one
thing only a command has, the signal handlers (Ctrl-C, SIGTERM).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TransferSpeedColumn,
)

from signery import __version__
from signery import protocol as p
from signery.cli._common import (
    JsonOpt,
    check_files,
    connection,
    err,
    out,
    parse_duration,
    print_json,
)
from signery.client import (
    DEFAULT_JOBS,
    ApprovalPending,
    FileResult,
    SignFilesObserver,
    request_timestamp,
    sign_files,
)
from signery.crypto import Hashed, PublicKey, hash_file, load_public_key_pem
from signery.errors import ClientError, SignatureInvalid, SigneryError
from signery.formats import (
    FORMATS,
    SignOptions,
    SignResult,
    Timestamper,
    VerifyResult,
    get_format,
)

LARGE_FILE = 64 * 1024 * 1024  # show a progress bar above this size (on a terminal)
# `signery sign` exits with this status when signing waits for approval (without
# --wait, or when --wait-timeout ran out): distinct from 1 (failed), so scripts
# can tell "ask an approver" from "broken".
EXIT_APPROVAL_PENDING = 3
# A run stopped by signal N exits with 128 + N (130 for Ctrl-C, 143 for SIGTERM),
# the status a shell reports for a process that signal ended.
EXIT_SIGNAL_BASE = 128
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
FORMAT_NAMES = "|".join(FORMATS)


def sign(
    ctx: typer.Context,
    files: Annotated[list[Path], typer.Argument(help="Files to sign.")],
    key: Annotated[str, typer.Option(help="Key name or id.")],
    fmt: Annotated[
        str, typer.Option("--format", help=f"Signature format: {FORMAT_NAMES}.")
    ] = "raw",
    digest_algorithm: Annotated[
        p.DigestAlgorithm | None, typer.Option(help="Default: matches the key.")
    ] = None,
    scheme: Annotated[
        p.SignatureScheme | None, typer.Option(help="Default: rsa-pkcs1v15 or ecdsa.")
    ] = None,
    timestamp_url: Annotated[
        str | None,
        typer.Option(
            "--timestamp", help="RFC 3161 TSA URL: add a timestamp (cms, authenticode, jar)."
        ),
    ] = None,
    pem: Annotated[bool, typer.Option("--pem", help="cms: write PEM instead of DER.")] = False,
    append: Annotated[
        bool, typer.Option("--append", help="authenticode: add a nested signature.")
    ] = False,
    binary: Annotated[
        bool, typer.Option("--binary", help="openpgp: the binary packet, not armor.")
    ] = False,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Output file (one input only).")
    ] = None,
    jobs: Annotated[
        int, typer.Option("--jobs", min=1, max=64, help="Files signed at once.")
    ] = DEFAULT_JOBS,
    digest_only: Annotated[
        bool, typer.Option("--digest-only", help="Print the digests; sign nothing.")
    ] = False,
    wait: Annotated[
        bool,
        typer.Option("--wait", help="When the key requires approval, wait for it, then sign."),
    ] = False,
    wait_timeout: Annotated[
        str, typer.Option("--wait-timeout", help="How long --wait waits (e.g. 90s, 30m, 2h).")
    ] = "30m",
    justification: Annotated[
        str | None,
        typer.Option(help="Why you sign: shown to approvers when the key requires approval."),
    ] = None,
    signing_time: Annotated[
        str | None,
        typer.Option(
            "--signing-time",
            help="The time the signature states (ISO 8601; default: now). To sign again "
            "after an approval, give the one the pending run printed: cms, authenticode, "
            "jar and openpgp sign it, so it is part of the approved digests.",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Hash each file locally and write its signature in the chosen format.

    Only the digest leaves this machine; the file never does. Many files share
    one access token and are signed concurrently; every file's result is
    reported, one failure does not stop the others, and the exit status is 1 if
    any file failed.

    A key whose policy requires approval signs only with a grant: without one the
    server records a signing request for approvers (all files of one run share
    it; it lists each file's digest, and approving it signs exactly those) and
    the command prints its id and the signing time to sign again with
    (--signing-time), and exits with status 3. With --wait it
    polls until the request is approved (then signs), denied (status 1, with the
    approver's comment) or --wait-timeout passes (status 3, request id printed).

    Ctrl-C or SIGTERM stops the run at once: no signing request is sent after
    it, temporary files are removed, files signed in place are left as they were,
    and stderr lists what was and was not signed (status 130 or 143)."""
    timeout_seconds = parse_duration(wait_timeout)
    # One signing time for the run: a file signed again after its approval (--wait,
    # or a later run with --signing-time) sends the same digest as the first time,
    # the one approved.
    stated = _signing_time(signing_time)
    check_files(files)
    if output is not None and len(files) != 1:
        raise ClientError("-o/--output works with exactly one file")
    signature_format = get_format(fmt)
    if digest_only:
        _print_digests(files, digest_algorithm or p.DigestAlgorithm.SHA256, as_json)
        return
    conn = connection(ctx)
    interruption = _Interruption()
    options = SignOptions(
        digest_algorithm=digest_algorithm,
        scheme=scheme,
        timestamper=(
            _timestamper(timestamp_url, conn.tls_verify()) if timestamp_url is not None else None
        ),
        pem=pem,
        append=append,
        binary=binary,
        interrupted=interruption.event,
        signing_time=stated,
    )
    with interruption.catching(), conn.signing(interruption.event) as c:
        results = sign_files(
            c,
            key,
            files,
            signature_format,
            options=options,
            output=output,
            jobs=jobs,
            client_info=p.ClientInfo(
                machine=socket.gethostname()[:256], tool=f"signery-cli/{__version__} {fmt}"
            ),
            justification=justification,
            wait_for_approval=timeout_seconds if wait else None,
            observer=_Display(None if as_json else _progress(files)),
        )
    if interruption.signum is not None:
        _report_results(files, results, stated, as_json, failures=False)
        _report_interrupted(files, results, interruption.signum)
        raise typer.Exit(EXIT_SIGNAL_BASE + interruption.signum)
    _report_results(files, results, stated, as_json, failures=True)
    pending = [r for r in results if isinstance(r, ApprovalPending)]
    if pending:
        again = f"sign again with --signing-time {stated:%Y-%m-%dT%H:%M:%SZ} once approved"
        for request_id in dict.fromkeys(r.request_id for r in pending):
            err.print(
                f"approval pending: signing request {request_id}; "
                + ("--wait-timeout ran out" if wait else f"{again}, or use --wait"),
                highlight=False,
            )
        raise typer.Exit(EXIT_APPROVAL_PENDING)
    failed = [r for r in results if isinstance(r, SigneryError)]
    if failed:
        if len(files) == 1:
            raise failed[0]  # one file: its error is the command's error
        raise typer.Exit(1)


def _print_digests(files: list[Path], algorithm: p.DigestAlgorithm, as_json: bool) -> None:
    """--digest-only: each file's digest, nothing signed."""
    digests = [
        {"file": str(f), "digest_algorithm": algorithm.value, "digest": hash_file(f, algorithm).hex}
        for f in files
    ]
    if as_json:
        print_json(digests)
    for d in [] if as_json else digests:
        out.print(f"{d['digest']}  {d['file']}", highlight=False)


def _report_results(
    files: list[Path],
    results: list[FileResult],
    stated: datetime,
    as_json: bool,
    *,
    failures: bool,
) -> None:
    """Each file's result: JSON on stdout, or a line (signed on stdout; with
    ``failures``, pending and failed on stderr)."""
    if as_json:
        print_json(
            [
                _sign_json(r) if isinstance(r, SignResult) else _failure_json(f, r, stated)
                for f, r in zip(files, results, strict=True)
            ]
        )
        return
    for f, r in zip(files, results, strict=True):
        if isinstance(r, SignResult):
            _print_signed(r)
        elif not failures:
            continue
        elif isinstance(r, ApprovalPending):
            err.print(f"[yellow]pending[/] {f}: {r.detail}", highlight=False)
        else:
            err.print(f"[red]failed[/] {f}: {r.code}: {r.detail}", highlight=False)


class _Display(SignFilesObserver):
    """What a run shows on stderr: a progress bar for each large file (on a
    terminal), and the waits for approval."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress

    def round_started(self, files: Sequence[Path]) -> None:
        if self.progress is not None:
            self.progress.start()

    def file_progress(self, file: Path) -> Callable[[int], None] | None:
        progress = self.progress
        if progress is None or file.stat().st_size < LARGE_FILE:
            return None
        task = progress.add_task(file.name, total=file.stat().st_size)
        return lambda n: progress.advance(task, n)

    def round_finished(self) -> None:
        if self.progress is not None:
            self.progress.stop()

    def waiting(self, request_id: str, seconds_left: float) -> None:
        err.print(
            f"waiting for approval of signing request {request_id} (up to {int(seconds_left)}s)",
            highlight=False,
        )

    def approved(self, files: Sequence[Path]) -> None:
        err.print("approved; signing", highlight=False)


def _progress(files: list[Path]) -> Progress | None:
    """A progress display when one of the files is large and stderr is a terminal."""
    if not err.is_terminal or not any(f.stat().st_size >= LARGE_FILE for f in files):
        return None
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=err,
        transient=True,
    )


@dataclasses.dataclass
class _Interruption:
    """Ctrl-C (SIGINT) or SIGTERM while files are signed.

    The first signal sets ``event``, shared by the client and the formats: from
    then on no request leaves (Client), every file stops at its next chunk and
    removes its temporary file (SignOptions), and no output replaces an input.
    The run then reports what was and was not signed. A second signal ends the
    process at once (the default action), for a server that stopped answering."""

    event: threading.Event = dataclasses.field(default_factory=threading.Event)
    signum: int | None = None

    @contextlib.contextmanager
    def catching(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # Python runs signal handlers in the main thread only
            return
        previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}

        def stop(signum: int, frame: FrameType | None) -> None:
            if self.signum is None:
                self.signum = signum
            self.event.set()
            for s in STOP_SIGNALS:
                signal.signal(s, signal.SIG_DFL)
            # os.write: no lock to wait for (the console may be drawing a bar).
            os.write(2, b"interrupted: stopping, nothing more is sent (again: quit at once)\n")

        for s in STOP_SIGNALS:
            signal.signal(s, stop)
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def _report_interrupted(files: list[Path], results: list[FileResult], signum: int) -> None:
    """On stderr, whatever stdout is: which files were signed and which were not."""
    signed = sum(isinstance(r, SignResult) for r in results)
    name = signal.Signals(signum).name
    err.print(f"interrupted by {name}: {signed} of {len(files)} files signed", markup=False)
    for f, r in zip(files, results, strict=True):
        if isinstance(r, SignResult):
            err.print(f"  signed      {f} -> {r.output}", markup=False, highlight=False)
        else:
            err.print(f"  not signed  {f}: {r.code}: {r.detail}", markup=False, highlight=False)


def _timestamper(url: str, verify: bool | str) -> Timestamper:
    """The --timestamp TSA as formats see it: imprint in, checked token out."""

    def timestamp(imprint: Hashed) -> bytes:
        return request_timestamp(url, imprint, verify=verify)[1].token

    return timestamp


def _print_signed(r: SignResult) -> None:
    stamp = ", timestamped" if r.timestamped else ""
    out.print(
        f"signed {r.file} -> {r.output} (key {r.key_name} v{r.key_version}, "
        f"{r.scheme.value}, {r.digest_algorithm.value}{stamp})",
        highlight=False,
    )


def _failure_json(file: Path, error: SigneryError, signing_time: datetime) -> dict[str, object]:
    failure: dict[str, object] = {
        "file": str(file),
        "ok": False,
        "code": error.code,
        "detail": error.detail,
    }
    if "request_id" in error.extra:
        failure["request_id"] = error.extra["request_id"]
    if isinstance(error, ApprovalPending):
        # What to pass as --signing-time to sign the approved digests later.
        failure["signing_time"] = signing_time.strftime("%Y-%m-%dT%H:%M:%SZ")
    return failure


def _signing_time(text: str | None) -> datetime:
    """--signing-time (ISO 8601, UTC when it names no offset), or now; whole seconds
    (what CMS and OpenPGP state)."""
    if text is None:
        return datetime.now(UTC).replace(microsecond=0)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ClientError(
            f"--signing-time {text!r}: expected ISO 8601, such as 2026-12-07T09:30:00Z"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).replace(microsecond=0)


def _sign_json(r: SignResult) -> dict[str, object]:
    return {
        "file": str(r.file),
        "ok": True,
        "format": r.output.suffix.lstrip(".") or None,
        "output": str(r.output),
        "timestamped": r.timestamped,
        "signature": str(r.output),
        "key": r.key_name,
        "key_version": r.key_version,
        "digest_algorithm": r.digest_algorithm.value,
        "digest": r.digest,
        "scheme": r.scheme.value,
    }


def verify(
    ctx: typer.Context,
    files: Annotated[list[Path], typer.Argument(help="Signed files.")],
    key: Annotated[
        str | None, typer.Option(help="Key name or id (public key fetched from the server).")
    ] = None,
    public_key: Annotated[
        Path | None, typer.Option(help="Verify offline against this PEM public key.")
    ] = None,
    fmt: Annotated[
        str, typer.Option("--format", help=f"Signature format: {FORMAT_NAMES}.")
    ] = "raw",
    signature: Annotated[
        Path | None, typer.Option(help="Signature file (one input only; default FILE.sig).")
    ] = None,
    digest_algorithm: Annotated[
        p.DigestAlgorithm | None, typer.Option(help="Default: matches the key.")
    ] = None,
    scheme: Annotated[
        p.SignatureScheme | None, typer.Option(help="Default: rsa-pkcs1v15 or ecdsa.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Check signatures. Exits 1 if any does not verify."""
    check_files(files)
    if (key is None) == (public_key is None):
        raise ClientError("give exactly one of --key or --public-key")
    if signature is not None and len(files) != 1:
        raise ClientError("--signature works with exactly one file")
    signature_format = get_format(fmt)
    keys: list[PublicKey]
    if public_key is not None:
        try:
            keys = [load_public_key_pem(public_key.read_bytes())]
        except (OSError, ValueError) as e:
            raise ClientError(f"cannot load public key {public_key}") from e
    else:
        assert key is not None
        with connection(ctx).signing() as c:
            # Also a key that cannot sign any more (disabled, certificate revoked):
            # what it signed before still verifies with its public keys.
            found = c.key(key, usable=False)
        # The current version first, then the earlier ones: a signature made before
        # a rotation verifies with the version that made it.
        keys = [load_public_key_pem(found.public_key_pem)] + [
            load_public_key_pem(v.public_key_pem) for v in reversed(found.previous_versions)
        ]
    options = SignOptions(digest_algorithm=digest_algorithm, scheme=scheme)
    results: list[VerifyResult] = [
        signature_format.verify(
            f, signature or signature_format.default_output(f, options), keys, options
        )
        for f in files
    ]
    if as_json:
        print_json(
            [
                {
                    "file": str(r.file),
                    "signature": str(r.signature),
                    "valid": r.valid,
                    "detail": r.detail,
                }
                for r in results
            ]
        )
    else:
        for r in results:
            mark = "[green]OK[/]" if r.valid else "[red]BAD[/]"
            out.print(f"{mark}  {r.file}: {r.detail}", highlight=False)
    bad = [r for r in results if not r.valid]
    if bad:
        raise SignatureInvalid(f"{len(bad)} of {len(results)} signatures do not verify")
