"""Build-machine commands: login, keys, sign, verify, timestamp."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TransferSpeedColumn,
)

from signery import __version__
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
    read_secret_file,
    table,
)
from signery.cli._profiles import Profile
from signery.client import (
    AccountCredentials,
    ApprovalDenied,
    ApprovalExpired,
    ApprovalPending,
    Client,
    request_timestamp,
)
from signery.crypto import Hashed, PublicKey, check_scheme, hash_file, load_public_key_pem
from signery.errors import ClientError, Interrupted, SignatureInvalid, SigneryError
from signery.formats import (
    FORMATS,
    SignOptions,
    SignResult,
    Timestamper,
    VerifyResult,
    export_public_key,
    get_format,
    write_atomically,
)

LARGE_FILE = 64 * 1024 * 1024  # show a progress bar above this size (on a terminal)
DEFAULT_JOBS = 8  # files signed at once: bounded, so a large batch cannot flood the server
# `signery sign` exits with this status when signing waits for approval (without
# --wait, or when --wait-timeout ran out): distinct from 1 (failed), so scripts
# can tell "ask an approver" from "broken".
EXIT_APPROVAL_PENDING = 3
# A run stopped by signal N exits with 128 + N (130 for Ctrl-C, 143 for SIGTERM),
# the status a shell reports for a process that signal ended.
EXIT_SIGNAL_BASE = 128
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
APPROVAL_POLL_SECONDS = 2.0
FORMAT_NAMES = "|".join(FORMATS)


def login(
    ctx: typer.Context,
    server: Annotated[str, typer.Option(help="Server URL, e.g. https://signery.example.")],
    client_id: Annotated[
        str | None, typer.Option(help="Built-in account client id (UUID).")
    ] = None,
    key_file: Annotated[Path | None, typer.Option(help="The account's private key (PEM).")] = None,
    api_token: Annotated[
        str | None, typer.Option(help="A personal API token (for management).")
    ] = None,
    api_token_file: Annotated[
        Path | None, typer.Option(help="Read the API token from a file (- for stdin).")
    ] = None,
    username: Annotated[
        str | None, typer.Option(help="Create an API token with this user's password.")
    ] = None,
    password_file: Annotated[
        Path | None, typer.Option(help="Read the password from a file (- for stdin).")
    ] = None,
    ca_bundle: Annotated[
        Path | None, typer.Option(help="CA certificates to trust for the server's TLS.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Remember a server and credentials in a profile (checked against the server first).

    Build machines log in with --client-id and --key-file; administrators with
    --api-token, --api-token-file or --username."""
    conn = connection(ctx)
    store = conn.store()
    profile = store.get(conn.profile_name) or Profile(server=server)
    if profile.server != server:
        profile = Profile(server=server)
    profile.ca_bundle = str(ca_bundle.resolve()) if ca_bundle else profile.ca_bundle
    verify: bool | str = profile.ca_bundle or True
    checked: list[tuple[str, str]] = [("server", server)]

    if client_id or key_file:
        if not (client_id and key_file):
            raise ClientError("--client-id and --key-file go together")
        creds = AccountCredentials.from_key_file(client_id, key_file)
        with Client(server, credentials=creds, verify=verify) as c:
            keys = c.keys()  # proves the key, the client id and the server
        profile.client_id, profile.key_file = client_id, str(key_file.resolve())
        checked.append(("account", f"{client_id} ({len(keys)} usable keys)"))

    token = api_token or (read_secret_file(api_token_file) if api_token_file else None)
    if username:
        import getpass

        password = (
            read_secret_file(password_file)
            if password_file
            else getpass.getpass(f"Password for {username}: ")
        )
        with Client(server, verify=verify) as c:
            created = c.call(
                "POST",
                f"{p.API_PREFIX}/users/me/tokens",
                p.ApiTokenCreated,
                # No lifetime asked for: the server's maximum (90 days by default).
                json={"name": f"cli@{socket.gethostname()}"[:64]},
                auth=(username, password),
            )
        token = created.token
    if token:
        with Client(server, api_token=token, verify=verify) as c:
            me = c.call("GET", f"{p.API_PREFIX}/users/me", p.User)
        profile.api_token = token
        checked.append(("user", me.username))
    if len(checked) == 1:
        raise ClientError("give --client-id/--key-file, --api-token(-file) or --username")
    store.put(conn.profile_name, profile)
    if as_json:
        print_json({"profile": conn.profile_name, **profile.redacted()})
    else:
        out.print(f"logged in; profile [bold]{conn.profile_name}[/] saved to {store.path}")
        details(checked)


def logout(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Forget the current profile (keys and tokens themselves are not revoked)."""
    conn = connection(ctx)
    removed = conn.store().remove(conn.profile_name)
    emit(
        {"profile": conn.profile_name, "removed": removed},
        as_json,
        lambda: out.print(f"profile {conn.profile_name}: {'removed' if removed else 'not found'}"),
    )


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
    key: Annotated[str, typer.Argument(help="Key name or id.")],
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


def _check_files(files: list[Path]) -> None:
    for f in files:
        if not f.is_file():
            raise ClientError(f"{f} is not a readable file")


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


def _report_interrupted(
    files: list[Path], results: list[SignResult | SigneryError], signum: int
) -> None:
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
    _check_files(files)
    if output is not None and len(files) != 1:
        raise ClientError("-o/--output works with exactly one file")
    signature_format = get_format(fmt)
    if digest_only:
        algorithm = digest_algorithm or p.DigestAlgorithm.SHA256
        digests = [
            {
                "file": str(f),
                "digest_algorithm": algorithm.value,
                "digest": hash_file(f, algorithm).hex,
            }
            for f in files
        ]
        if as_json:
            print_json(digests)
        for d in [] if as_json else digests:
            out.print(f"{d['digest']}  {d['file']}", highlight=False)
        return
    client_info = p.ClientInfo(
        machine=socket.gethostname()[:256], tool=f"signery-cli/{__version__} {fmt}"
    )
    conn = connection(ctx)
    timestamper = (
        _timestamper(timestamp_url, conn.tls_verify()) if timestamp_url is not None else None
    )
    interruption = _Interruption()
    base = SignOptions(
        digest_algorithm=digest_algorithm,
        scheme=scheme,
        timestamper=timestamper,
        pem=pem,
        append=append,
        binary=binary,
        interrupted=interruption.event,
        signing_time=stated,
    )
    progress = None if as_json else _progress(files)
    not_started = Interrupted("stopped before it was started")
    results: list[SignResult | SigneryError] = [not_started for _ in files]
    # Interrupted escapes only before the files start (token, key listing).
    with (
        interruption.catching(),
        contextlib.suppress(Interrupted),
        conn.signing(interruption.event) as c,
    ):
        signer = c.signer(key, client_info=client_info, justification=justification)
        if scheme is not None:
            # Before any file is hashed: the key's algorithm says which schemes it makes.
            check_scheme(signer.algorithm, scheme)

        def sign_one(f: Path) -> SignResult | SigneryError:
            if interruption.event.is_set():
                return not_started
            options = base
            if progress is not None and f.stat().st_size >= LARGE_FILE:
                task = progress.add_task(f.name, total=f.stat().st_size)
                options = dataclasses.replace(base, progress=_advance(progress, task))
            try:
                return signature_format.sign(
                    signer, f, output or signature_format.default_output(f, options), options
                )
            except SigneryError as e:
                return e
            except OSError as e:
                return ClientError(f"{f}: {e.strerror or e}")

        def sign_all(todo: list[Path]) -> list[SignResult | SigneryError]:
            if progress is not None:
                progress.start()
            try:
                with ThreadPoolExecutor(max_workers=min(jobs, len(todo))) as pool:
                    return list(pool.map(sign_one, todo))
            finally:
                if progress is not None:
                    progress.stop()

        results = sign_all(files)
        if wait:
            results = _wait_and_sign(c, files, results, sign_all, timeout_seconds)
    if interruption.signum is not None:
        if as_json:
            print_json(
                [
                    _sign_json(r) if isinstance(r, SignResult) else _failure_json(f, r, stated)
                    for f, r in zip(files, results, strict=True)
                ]
            )
        else:
            for r in results:
                if isinstance(r, SignResult):
                    _print_signed(r)
        _report_interrupted(files, results, interruption.signum)
        raise typer.Exit(EXIT_SIGNAL_BASE + interruption.signum)
    pending = [r for r in results if isinstance(r, ApprovalPending)]
    failed = [r for r in results if isinstance(r, SigneryError)]
    if as_json:
        print_json(
            [
                _sign_json(r) if isinstance(r, SignResult) else _failure_json(f, r, stated)
                for f, r in zip(files, results, strict=True)
            ]
        )
    else:
        for f, r in zip(files, results, strict=True):
            if isinstance(r, SignResult):
                _print_signed(r)
            elif isinstance(r, ApprovalPending):
                err.print(f"[yellow]pending[/] {f}: {r.detail}", highlight=False)
            else:
                err.print(f"[red]failed[/] {f}: {r.code}: {r.detail}", highlight=False)
    if pending:
        again = f"sign again with --signing-time {stated:%Y-%m-%dT%H:%M:%SZ} once approved"
        for request_id in dict.fromkeys(r.request_id for r in pending):
            err.print(
                f"approval pending: signing request {request_id}; "
                + ("--wait-timeout ran out" if wait else f"{again}, or use --wait"),
                highlight=False,
            )
        raise typer.Exit(EXIT_APPROVAL_PENDING)
    if failed:
        if len(files) == 1:
            raise failed[0]  # one file: its error is the command's error
        raise typer.Exit(1)


def _wait_and_sign(
    client: Client,
    files: list[Path],
    results: list[SignResult | SigneryError],
    sign_all: Callable[[list[Path]], list[SignResult | SigneryError]],
    timeout: float,
) -> list[SignResult | SigneryError]:
    """Wait for the approval of every pending file's signing request, then sign
    those files again (the grant is used), until none waits or the time is up.

    The files of one run share one signing request, which lists each file's
    digest (the server adds them to the account's open request for the key), and
    its grant signs exactly those digests: each file is signed again with the same
    options and signing time, so it sends the digest that was approved. A file
    whose digest the grant does not cover (a batch larger than one request holds,
    or one that joined after an approver decided) makes a new request, waited for
    in turn."""
    deadline = time.monotonic() + timeout
    results = list(results)
    with contextlib.suppress(Interrupted):  # Ctrl-C: the files still waiting stay pending
        _wait_and_sign_rounds(client, files, results, sign_all, deadline)
    return results


def _wait_and_sign_rounds(
    client: Client,
    files: list[Path],
    results: list[SignResult | SigneryError],
    sign_all: Callable[[list[Path]], list[SignResult | SigneryError]],
    deadline: float,
) -> None:
    """_wait_and_sign's rounds, updating ``results`` in place as files are decided."""
    while True:
        waiting = [i for i, r in enumerate(results) if isinstance(r, ApprovalPending)]
        left = deadline - time.monotonic()
        if not waiting or left <= 0:
            return
        outcome: dict[str, SigneryError | None] = {}
        for i in waiting:
            pending = results[i]
            assert isinstance(pending, ApprovalPending)
            request_id = pending.request_id
            if request_id in outcome:
                continue
            err.print(
                f"waiting for approval of signing request {request_id} (up to {int(left)}s)",
                highlight=False,
            )
            state = client.wait_for_approval(
                request_id, max(deadline - time.monotonic(), 0), APPROVAL_POLL_SECONDS
            )
            outcome[request_id] = _decided(state)
            if isinstance(outcome[request_id], ApprovalPending):
                return  # timed out: the request is still pending
        retry = []
        for i in waiting:
            pending = results[i]
            assert isinstance(pending, ApprovalPending)
            decided = outcome[pending.request_id]
            if decided is None:
                retry.append(i)
            else:
                results[i] = decided
        if not retry:
            return
        err.print("approved; signing", highlight=False)
        for i, r in zip(retry, sign_all([files[i] for i in retry]), strict=True):
            results[i] = r


def _print_signed(r: SignResult) -> None:
    stamp = ", timestamped" if r.timestamped else ""
    out.print(
        f"signed {r.file} -> {r.output} (key {r.key_name} v{r.key_version}, "
        f"{r.scheme.value}, {r.digest_algorithm.value}{stamp})",
        highlight=False,
    )


def _decided(state: p.SigningPending) -> SigneryError | None:
    """None when approved; else the error the waiting files end with."""
    if state.status is p.ApprovalStatus.APPROVED:
        return None
    if state.status is p.ApprovalStatus.PENDING_APPROVAL:
        return ApprovalPending.of(state)
    if state.status is p.ApprovalStatus.DENIED:
        return ApprovalDenied(
            f"signing request {state.request_id} was denied: {state.comment or '(no comment)'}",
            request_id=state.request_id,
        )
    return ApprovalExpired(
        f"signing request {state.request_id} is {state.status.value}",
        request_id=state.request_id,
    )


def _advance(progress: Progress, task: TaskID) -> Callable[[int], None]:
    return lambda n: progress.advance(task, n)


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
    _check_files(files)
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
    _check_files(files)
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
