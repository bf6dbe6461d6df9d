"""sign_files: many files, one key, one format, as ``signery sign`` signs them.

The order of a run: the key is resolved (a key this account cannot sign with,
or a scheme its algorithm cannot make, is refused before any file is hashed);
the files are signed concurrently, at most ``jobs`` at once, each hashed
locally so that only its digest leaves the machine; one file's failure never
stops the others. A key that requires approval answers with a signing request
instead of a signature (:class:`~signery.client.ApprovalPending`): with
``wait_for_approval`` the run polls that request and, once approved, signs the
waiting files again with the same options, so each sends the digest that was
approved.

A run stops when its interrupt event is set (``options.interrupted``, by default
the client's own, set by :meth:`~signery.client.Client.interrupt`): no request
leaves after it, a file being signed stops at its next chunk and leaves nothing
behind, and a file not yet started ends as :class:`~signery.errors.Interrupted`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

from signery import protocol as p
from signery.client._client import ApprovalDenied, ApprovalExpired, ApprovalPending, Client
from signery.client._signer import RemoteSigner
from signery.crypto import check_scheme
from signery.errors import ClientError, Interrupted, SigneryError
from signery.formats import SignatureFormat, SignOptions, SignResult, get_format

DEFAULT_JOBS = 8
"""Files signed at once: bounded, so that a large batch cannot flood the server."""
APPROVAL_POLL_SECONDS = 2.0
"""How often a run waiting for approval asks for its signing request's state."""

FileResult = SignResult | SigneryError
"""What became of one file: its SignResult, or the error that stopped it
(:class:`~signery.client.ApprovalPending` when it waits for approval)."""


class SignFilesObserver:
    """What :func:`sign_files` tells its caller while it works: progress bars and
    messages are the caller's business. Every method does nothing here;
    override the ones you show.

    ``file_progress`` runs on the worker threads (one per file being signed);
    the others on the thread that called ``sign_files``."""

    def round_started(self, files: Sequence[Path]) -> None:
        """A round of signing begins: all the files, then those signed again
        after an approval."""

    def file_progress(self, file: Path) -> Callable[[int], None] | None:
        """Called as ``file`` starts: a callable to receive the size of each chunk
        hashed, or None."""
        return None

    def round_finished(self) -> None:
        """The round begun by the last ``round_started`` is over."""

    def waiting(self, request_id: str, seconds_left: float) -> None:
        """The run starts waiting (at most ``seconds_left``) for the approval of
        signing request ``request_id``."""

    def approved(self, files: Sequence[Path]) -> None:
        """The requests of ``files`` were approved: they are signed again."""


def sign_files(
    client: Client,
    key: str,
    files: Sequence[Path],
    signature_format: SignatureFormat | str = "raw",
    *,
    options: SignOptions | None = None,
    output: Path | None = None,
    jobs: int = DEFAULT_JOBS,
    client_info: p.ClientInfo | None = None,
    justification: str | None = None,
    wait_for_approval: float | None = None,
    observer: SignFilesObserver | None = None,
) -> list[FileResult]:
    """Sign each of ``files`` with ``key`` (a name or an id) in ``signature_format``.

    Returns one result per file, in the order of ``files``: its
    :class:`~signery.formats.SignResult`, or the
    :class:`~signery.errors.SigneryError` that stopped it. Raises (nothing signed,
    nothing sent but the key lookup) for a file that is not a readable file,
    ``output`` with several files, an unknown format, a key this account cannot
    sign with, or a scheme the key cannot make.

    ``output`` is where the one file's signature goes (default: the format's, such
    as ``FILE.sig`` or the file itself). ``options.signing_time`` is fixed for the
    run (now, when not given): the formats that sign it (cms, authenticode, jar,
    openpgp) then send the same digest when a file is signed again after its
    approval; to sign again in a later run, pass the same time. With
    ``wait_for_approval`` (seconds), files that wait for approval are signed once
    their request is approved, until that time is up; without, they end as
    ApprovalPending (``request_id`` names the request to approve).
    ``client_info`` and ``justification`` go with each signing request (the
    audit trail, and what approvers read)."""
    if jobs < 1:
        raise ClientError("jobs must be at least 1")
    if output is not None and len(files) != 1:
        raise ClientError("an output path works with exactly one file")
    for f in files:
        if not f.is_file():
            raise ClientError(f"{f} is not a readable file")
    fmt = get_format(signature_format) if isinstance(signature_format, str) else signature_format
    options = options or SignOptions()
    options = dataclasses.replace(
        options,
        interrupted=options.interrupted or client.interrupted,
        signing_time=options.signing_time or datetime.now(UTC).replace(microsecond=0),
    )
    batch = _Batch(fmt, options, output, jobs, observer or SignFilesObserver())
    try:
        signer = client.signer(key, client_info=client_info, justification=justification)
    except Interrupted:  # stopped while the key was looked up: no file started
        return [batch.not_started for _ in files]
    if options.scheme is not None:
        # Before any file is hashed: the key's algorithm says which schemes it makes.
        check_scheme(signer.algorithm, options.scheme)
    results = batch.sign_all(signer, files)
    if wait_for_approval is not None:
        deadline = time.monotonic() + wait_for_approval
        with contextlib.suppress(Interrupted):  # stopped: the files still waiting stay pending
            batch.wait_and_sign(client, signer, files, results, deadline)
    return results


@dataclasses.dataclass(frozen=True)
class _Batch:
    """One run's settings, shared by its rounds."""

    fmt: SignatureFormat
    options: SignOptions
    output: Path | None
    jobs: int
    observer: SignFilesObserver
    not_started: Interrupted = dataclasses.field(
        default_factory=lambda: Interrupted("stopped before it was started")
    )

    def sign_all(self, signer: RemoteSigner, files: Sequence[Path]) -> list[FileResult]:
        """One round: every file of ``files``, at most ``jobs`` at once."""
        self.observer.round_started(files)
        try:
            with ThreadPoolExecutor(max_workers=min(self.jobs, len(files))) as pool:
                return list(pool.map(lambda f: self.sign_one(signer, f), files))
        finally:
            self.observer.round_finished()

    def sign_one(self, signer: RemoteSigner, file: Path) -> FileResult:
        if self.options.interrupted is not None and self.options.interrupted.is_set():
            return self.not_started
        try:
            options = self.options
            progress = self.observer.file_progress(file)
            if progress is not None:
                options = dataclasses.replace(options, progress=progress)
            target = self.output or self.fmt.default_output(file, options)
            return self.fmt.sign(signer, file, target, options)
        except SigneryError as e:
            return e
        except OSError as e:
            return ClientError(f"{file}: {e.strerror or e}")

    def wait_and_sign(
        self,
        client: Client,
        signer: RemoteSigner,
        files: Sequence[Path],
        results: list[FileResult],
        deadline: float,
    ) -> None:
        """Wait for the approval of every pending file's signing request, then sign
        those files again (the grant is used), until none waits or the time is up;
        ``results`` is updated in place as files are decided.

        The files of one run share one signing request, which lists each file's
        digest (the server adds them to the account's open request for the key),
        and its grant signs exactly those digests: each file is signed again with
        the same options and signing time, so it sends the digest that was
        approved. A file whose digest the grant does not cover (a batch larger
        than one request holds, or one that joined after an approver decided)
        makes a new request, waited for in turn."""
        while True:
            waiting = [i for i, r in enumerate(results) if isinstance(r, ApprovalPending)]
            left = deadline - time.monotonic()
            if not waiting or left <= 0:
                return
            outcome: dict[str, SigneryError | None] = {}
            for i in waiting:
                request_id = _pending(results[i]).request_id
                if request_id in outcome:
                    continue
                self.observer.waiting(request_id, left)
                state = client.wait_for_approval(
                    request_id, max(deadline - time.monotonic(), 0), APPROVAL_POLL_SECONDS
                )
                outcome[request_id] = _decided(state)
                if isinstance(outcome[request_id], ApprovalPending):
                    return  # timed out: the request is still pending
            retry = []
            for i in waiting:
                decided = outcome[_pending(results[i]).request_id]
                if decided is None:
                    retry.append(i)
                else:
                    results[i] = decided
            if not retry:
                return
            again = [files[i] for i in retry]
            self.observer.approved(again)
            for i, r in zip(retry, self.sign_all(signer, again), strict=True):
                results[i] = r


def _pending(result: FileResult) -> ApprovalPending:
    assert isinstance(result, ApprovalPending)
    return result


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
