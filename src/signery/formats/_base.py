"""What every signature format provides, and what it sees of a key: a :class:`Signer`.

Formats see a Signer, never HTTP: ``signery.client.RemoteSigner`` is the one
that signs through a Signery server, and any object with the same shape (a local
key in a test, another service) signs the same formats. This package imports
nothing from ``signery.client``: the client depends on the formats (its
``sign_files`` drives them), never the other way round."""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import BinaryIO, Protocol

from cryptography import x509

from signery.crypto import Hashed, PublicKey
from signery.errors import Interrupted
from signery.protocol import Algorithm, DigestAlgorithm, SignatureScheme, SignResponse

Timestamper = Callable[[Hashed], bytes]
"""Asks an RFC 3161 TSA for a token over a message imprint; returns the DER
TimeStampToken (a CMS ContentInfo), already checked against the imprint and the
nonce (``signery.client.request_timestamp``). Formats embed it; they never see HTTP."""


class Signer(Protocol):
    """A key as a format sees it: what it is, and ``sign_detailed(digest)``.

    The format hashes the file locally and sends only the digest; the answer
    names the key version that signed and its certificate chain, which the
    format embeds (a key rotated between listing and signing is detected there).
    Members are read-only: a format never changes the signer it is given."""

    @property
    def key_name(self) -> str:
        """The key's name, as results and errors name it."""
        ...

    @property
    def algorithm(self) -> Algorithm: ...

    @property
    def public_key(self) -> PublicKey:
        """The public key of ``key_version``."""
        ...

    @property
    def certificate_chain(self) -> Sequence[x509.Certificate]:
        """Leaf first; empty for a key without a certificate."""
        ...

    @property
    def key_version(self) -> int | None:
        """The key version listed (the one ``public_key`` belongs to)."""
        ...

    @property
    def key_created_at(self) -> datetime | None:
        """When ``key_version`` was made (None when unknown): the creation time
        of the key's OpenPGP identity."""
        ...

    @property
    def default_digest(self) -> DigestAlgorithm: ...

    @property
    def default_scheme(self) -> SignatureScheme: ...

    def sign_detailed(self, hashed: Hashed, scheme: SignatureScheme | None = None) -> SignResponse:
        """Sign a digest with the key's current version: signature, key version,
        certificate chain. Safe to call from several threads at once."""
        ...


@dataclass(frozen=True, slots=True)
class SignOptions:
    """How to sign one file. Formats ignore the options that do not apply to them."""

    digest_algorithm: DigestAlgorithm | None = None
    scheme: SignatureScheme | None = None
    progress: Callable[[int], None] | None = None
    timestamper: Timestamper | None = None  # --timestamp URL
    pem: bool = False  # cms: PEM instead of DER
    append: bool = False  # authenticode: nest a second signature instead of replacing
    binary: bool = False  # openpgp: the binary packet instead of ASCII armor
    interrupted: threading.Event | None = None
    """Set by the caller to stop (the CLI sets it on SIGINT and SIGTERM): the
    format checks it after every chunk it reads or copies and before it puts its
    output in place, so an interrupted signing sends nothing more, leaves no
    temporary file and no modified input (:class:`~signery.errors.Interrupted`)."""

    def check_interrupted(self) -> None:
        """Raise Interrupted once ``interrupted`` is set."""
        if self.interrupted is not None and self.interrupted.is_set():
            raise Interrupted("stopped before it was signed; nothing was written")

    @property
    def on_chunk(self) -> Callable[[int], None] | None:
        """What a format calls with each chunk's size as it streams the file:
        stops an interrupted signing, then advances ``progress``."""
        if self.interrupted is None:
            return self.progress
        progress = self.progress

        def chunk(size: int) -> None:
            self.check_interrupted()
            if progress is not None:
                progress(size)

        return chunk

    # When the signature says it was made (CMS, Authenticode and JAR signingTime,
    # OpenPGP creation time); None: now. A run fixes it, so that signing again
    # after an approval sends the very digest the approvers approved (the time is
    # part of what is signed in these formats).
    signing_time: datetime | None = None


@dataclass(frozen=True, slots=True)
class SignResult:
    file: Path
    output: Path
    digest_algorithm: DigestAlgorithm
    digest: str
    key_name: str
    key_version: int | None
    scheme: SignatureScheme
    timestamped: bool = False


@dataclass(frozen=True, slots=True)
class VerifyResult:
    file: Path
    signature: Path
    valid: bool
    detail: str


class SignatureFormat(Protocol):
    """One signature format. ``sign`` hashes the file locally, asks ``signer`` for
    the signature of that digest, and writes the format (atomically: a failure
    leaves neither a partial output nor a modified input). A key that cannot sign
    the format is refused before anything is sent to the server."""

    name: str

    def default_output(self, file: Path, options: SignOptions) -> Path:
        """Where ``sign`` writes by default (the file itself for embedded formats);
        ``options`` can change it (openpgp --binary)."""
        ...

    def sign(
        self, signer: Signer, file: Path, output: Path, options: SignOptions
    ) -> SignResult: ...

    def verify(
        self,
        file: Path,
        signature: Path,
        public_keys: list[PublicKey],
        options: SignOptions,
    ) -> VerifyResult: ...


def write_atomically(
    path: Path, data: bytes, *, before_commit: Callable[[], None] | None = None
) -> None:
    """Write to a temporary file beside ``path``, then rename: a crash never leaves
    a half-written signature, and an existing file is replaced in one step.
    ``before_commit`` runs just before the rename; if it raises (an interrupt),
    the temporary file is removed and ``path`` is left as it was.

    The file gets the usual permissions (0666 minus the umask): signatures are
    public, unlike the private files tempfile.mkstemp is made for."""
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if before_commit is not None:
            before_commit()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def open_atomically(
    path: Path, mode: int = 0o666, *, before_commit: Callable[[], None] | None = None
) -> Iterator[BinaryIO]:
    """``write_atomically`` for output written in pieces (a signed copy of a large
    file): yields a seekable binary file beside ``path``, renamed over ``path`` only
    when the block ends without an exception and ``before_commit`` does not raise;
    otherwise it is removed. ``mode`` (minus the umask) lets a signed executable
    keep the input's permission bits."""
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if before_commit is not None:
            before_commit()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
