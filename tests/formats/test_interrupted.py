"""Every format, interrupted (SignOptions.interrupted, what the CLI sets on Ctrl-C
and SIGTERM), at the two points that matter: while the file is read, and while
the server signs.

Either way the format raises Interrupted, leaves no temporary file, writes no
output and leaves its input byte for byte as it was (authenticode and jar sign in
place); interrupted while reading, it sends nothing. The signer is a real
RemoteSigner of a real ``signery serve``; the interrupt is set at a known point
through the format's own hooks (the progress callback, the HTTP transport), so
nothing depends on timing.
"""

from __future__ import annotations

import hashlib
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from devtools.pe import build_pe
from signery.client import Client, RemoteSigner
from signery.crypto import HASH_CHUNK
from signery.errors import Interrupted
from signery.formats import SignOptions, get_format
from tests.support import Account, Api, Installation, ServerProcess, new_installation

pytestmark = pytest.mark.e2e

SIZE = 3 * HASH_CHUNK  # three chunks: the interrupt comes after the first
FORMATS = ["raw", "cms", "authenticode", "jar", "openpgp"]


@pytest.fixture(scope="module", params=["sqlite"])
def installation(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Installation]:
    """One database is enough: the formats see a RemoteSigner, never the database."""
    with new_installation(request.param, tmp_path_factory.mktemp("signery-interrupted")) as inst:
        yield inst


class SignedThenInterrupted(httpx.HTTPTransport):
    """A real HTTP transport that sets ``event`` once a signing request has been
    answered: the interrupt that arrives while the server signs."""

    def __init__(self, event: threading.Event) -> None:
        super().__init__()
        self.event = event

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if request.url.path.endswith("/sign"):
            self.event.set()
        return response


@pytest.fixture(scope="module")
def account_and_key(server_api: Api) -> tuple[Account, str]:
    tsg = server_api.create_tsg()
    account = server_api.create_account(tsg["id"])
    key = server_api.create_key(tsg["id"], "EC_P256", ca="builtin")
    return account, key["name"]


def artifact(fmt: str, path: Path) -> Path:
    """A file of the format, SIZE bytes (jar: two entries, progress is per entry)."""
    if fmt == "jar":
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("first.bin", bytes(SIZE))
            zf.writestr("second.bin", bytes(SIZE))
    elif fmt == "authenticode":
        path.write_bytes(build_pe(pe32_plus=True, overlay=bytes(SIZE)))
    else:
        path.write_bytes(bytes(range(256)) * (SIZE // 256))
    return path


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def signing_kinds(api: Api, seq: int) -> list[str]:
    return [e["kind"] for e in api.events_after(seq) if e["kind"].startswith("signing.")]


@pytest.mark.parametrize("fmt", FORMATS)
def test_interrupted_while_reading_sends_nothing_and_writes_nothing(
    server: ServerProcess,
    server_api: Api,
    account_and_key: tuple[Account, str],
    tmp_path: Path,
    fmt: str,
) -> None:
    account, key = account_and_key
    stop = threading.Event()
    file = artifact(fmt, tmp_path / f"artifact.{fmt}")
    before = sha256_of(file)
    # The progress callback sets the interrupt after the first chunk; the format
    # must stop at the next one.
    options = SignOptions(interrupted=stop, progress=lambda _: stop.set())
    signature_format = get_format(fmt)
    output = signature_format.default_output(file, options)
    with Client(server.url, credentials=account.credentials(), interrupted=stop) as client:
        signer: RemoteSigner = client.signer(key)
        seq = server_api.last_seq()
        with pytest.raises(Interrupted):
            signature_format.sign(signer, file, output, options)
    assert stop.is_set(), "the format never reported a chunk"
    assert sorted(p.name for p in tmp_path.iterdir()) == [file.name]
    assert sha256_of(file) == before
    assert signing_kinds(server_api, seq) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_interrupted_while_the_server_signs_discards_the_signature(
    server: ServerProcess,
    server_api: Api,
    account_and_key: tuple[Account, str],
    tmp_path: Path,
    fmt: str,
) -> None:
    """The request left before the interrupt: the server signed (and recorded it),
    but nothing is written and an input signed in place is left untouched."""
    account, key = account_and_key
    stop = threading.Event()
    file = artifact(fmt, tmp_path / f"artifact.{fmt}")
    before = sha256_of(file)
    options = SignOptions(interrupted=stop)
    signature_format = get_format(fmt)
    output = signature_format.default_output(file, options)
    with Client(
        server.url,
        credentials=account.credentials(),
        interrupted=stop,
        transport=SignedThenInterrupted(stop),
    ) as client:
        signer = client.signer(key)
        seq = server_api.last_seq()
        with pytest.raises(Interrupted, match="signature was discarded"):
            signature_format.sign(signer, file, output, options)
        with pytest.raises(Interrupted, match="no request was sent"):
            client.keys()
    assert sorted(p.name for p in tmp_path.iterdir()) == [file.name]
    assert sha256_of(file) == before
    assert signing_kinds(server_api, seq) == ["signing.sign.succeeded"]
