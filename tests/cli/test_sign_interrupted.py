"""Ctrl-C and SIGTERM during ``signery sign``: a real CLI process against a real
``signery serve``, interrupted while it hashes a large file.

Regression: Ctrl-C let the running file be signed anyway (the signing request
went out after the interrupt) and printed nothing; SIGTERM killed the process
and left its ``.NAME.<hex>.tmp`` beside the input. Now either signal stops the
run at the next chunk: no signing request after the signal, no temporary file,
the inputs as they were, stderr names what was signed and what was not, and the
exit status is 128 + the signal's number.

The large files are sparse (a hole reads as zeros), so making them costs no
disk; the signal is sent once the CLI is seen reading the file (its descriptor's
position in /proc), never after a fixed sleep.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import struct
import subprocess
import time
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from devtools.pe import build_pe
from tests.support import SIGNERY, Api, ServerProcess

pytestmark = pytest.mark.e2e

LARGE = 768 * 1024 * 1024  # seconds of hashing here; a hole on disk
STOP_TIMEOUT = 60  # generous: the run must end at the next 1 MiB chunk
START_TIMEOUT = 60
CHUNK = 1024 * 1024


# ------------------------------------------------------------------ files


def _sparse_raw(path: Path) -> None:
    with path.open("wb") as f:
        f.truncate(LARGE)


def _sparse_pe(path: Path) -> None:
    """A valid PE image followed by a large overlay (hashed by Authenticode)."""
    with path.open("wb") as f:
        f.write(build_pe(pe32_plus=True))
        f.truncate(LARGE)


def _sparse_jar(path: Path) -> None:
    """A zip with one stored entry of LARGE zero bytes, written around a hole
    (APPNOTE.TXT 4.3: local header, data, central directory, end record)."""
    crc = 0
    zeros = bytes(CHUNK)
    for _ in range(LARGE // CHUNK):
        crc = zlib.crc32(zeros, crc)
    name = b"payload.bin"
    dos_time, dos_date = 0, (2024 - 1980) << 9 | 1 << 5 | 1
    local = struct.pack(
        "<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, dos_time, dos_date, crc, LARGE, LARGE, len(name), 0
    )
    central = struct.pack(
        "<IHHHHHHIIIHHHHHII",
        0x02014B50, 20, 20, 0, 0, dos_time, dos_date, crc, LARGE, LARGE, len(name),
        0, 0, 0, 0, 0o644 << 16, 0,
    )  # fmt: skip
    directory_offset = len(local) + len(name) + LARGE
    end = struct.pack(
        "<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(central) + len(name), directory_offset, 0
    )
    with path.open("wb") as f:
        f.write(local + name)
        f.seek(directory_offset)
        f.write(central + name + end)
    with zipfile.ZipFile(path) as zf:
        assert zf.getinfo("payload.bin").file_size == LARGE


def _small_raw(path: Path, text: str) -> None:
    path.write_bytes(text.encode())


def _small_pe(path: Path, text: str) -> None:
    path.write_bytes(build_pe(pe32_plus=True, overlay=text.encode().ljust(64, b"\0")))


def _small_jar(path: Path, text: str) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("hello.txt", text)


FORMATS: dict[str, tuple[str, Callable[[Path], None], Callable[[Path, str], None]]] = {
    "raw": (".bin", _sparse_raw, _small_raw),
    "authenticode": (".exe", _sparse_pe, _small_pe),
    "jar": (".jar", _sparse_jar, _small_jar),
}


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def reads(pid: int, path: Path) -> bool:
    """Whether process ``pid`` has ``path`` open and has read from it."""
    try:
        descriptors = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
    for fd in descriptors:
        try:
            if os.readlink(fd) != str(path):
                continue
            info = Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text()
        except OSError:
            continue
        position = re.search(r"^pos:\s+(\d+)", info, re.M)
        if position and int(position.group(1)) > 0:
            return True
    return False


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def build(server: ServerProcess, server_api: Api, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A build machine: the `build` profile of an account with a certified EC key."""
    api = server_api
    tsg = api.create_tsg()
    account = api.create_account(tsg["id"])
    key = api.create_key(tsg["id"], "EC_P256", ca="builtin")
    root = tmp_path_factory.mktemp("interrupted")
    home, work = root / "home", root / "work"
    work.mkdir()
    key_file = root / "account.pem"
    key_file.write_text(account.private_key_pem)
    key_file.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIGNERY_")}
    env.update({"SIGNERY_HOME": str(home), "NO_COLOR": "1", "COLUMNS": "200"})
    login = [SIGNERY, "--profile", "build", "login", "--server", server.url]
    login += ["--client-id", account.client_id, "--key-file", str(key_file)]
    subprocess.run(login, env=env, check=True, capture_output=True, timeout=START_TIMEOUT)
    return {"env": env, "work": work, "key": key, "account": account}


# ------------------------------------------------------------------ the tests


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_signing_stops_at_once_and_says_what_was_signed(
    server_api: Api, build: dict[str, Any], fmt: str, signum: signal.Signals
) -> None:
    suffix, make_large, make_small = FORMATS[fmt]
    work: Path = build["work"] / f"{fmt}-{signum.name}"
    work.mkdir()
    first, large, last = (work / f"{n}{suffix}" for n in ("first", "large", "last"))
    make_small(first, f"signed before the interrupt ({fmt}, {signum.name})")
    make_large(large)
    make_small(last, f"never started ({fmt}, {signum.name})")
    before = {f: sha256_of(f) for f in (large, last)}
    seq = server_api.last_seq()

    # One file at a time, in order: `first` is signed, `large` is being hashed
    # when the signal comes, `last` has not started.
    command = [SIGNERY, "--profile", "build", "sign", "--key", build["key"]["name"]]
    command += ["--format", fmt, "--jobs", "1", str(first), str(large), str(last)]
    process = subprocess.Popen(
        command,
        env=build["env"],
        cwd=work,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not (
            reads(process.pid, large)
            # Authenticode writes the signed copy while it hashes: wait for it too.
            and (fmt != "authenticode" or list(work.glob(f".{large.name}.*.tmp")))
        ):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the CLI never started reading the large file"
            time.sleep(0.005)
        process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=STOP_TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()

    assert process.returncode == 128 + signum, (process.returncode, stdout, stderr)
    assert "Traceback" not in stderr
    assert re.search(rf"^interrupted by {signum.name}: 1 of 3 files signed", stderr, re.M), stderr
    assert re.search(rf"^\s*signed\s+{re.escape(str(first))}\b", stderr, re.M), stderr
    for not_signed in (large, last):
        assert re.search(rf"^\s*not signed\s+{re.escape(str(not_signed))}\b", stderr, re.M), stderr
    # Nothing half-written is left, and what was not signed is as it was.
    assert sorted(p.name for p in work.iterdir() if p.name.startswith(".")) == []
    assert {f: sha256_of(f) for f in (large, last)} == before
    if fmt == "raw":
        assert sorted(p.name for p in work.iterdir()) == [
            first.name,
            f"{first.name}.sig",
            large.name,
            last.name,
        ]
    # One signing request reached the server: the first file's, before the signal.
    signing = [e for e in server_api.events_after(seq) if e["kind"].startswith("signing.")]
    assert [e["kind"] for e in signing] == ["signing.sign.succeeded"], signing
    if fmt == "raw":
        assert signing[0]["digest"] == hashlib.sha256(first.read_bytes()).hexdigest()
