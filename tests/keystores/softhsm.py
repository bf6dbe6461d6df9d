"""SoftHSM2 tokens for the pkcs11 key store's tests.

SoftHSM reads ``SOFTHSM2_CONF`` once, when its library is loaded (the first
``C_Initialize`` of the process), and does not notice tokens created by
``softhsm2-util`` afterwards. So the test process gets one SoftHSM directory,
created on first use with a batch of tokens before anything loads the library,
and every store that opens in-process claims a token of its own: no two stores
of one process share a token, whose login is per process (PKCS#11 v2.40 base
§5.6). Server processes started by the end-to-end tests get the same
``SOFTHSM2_CONF`` in their environment (SoftHSM's file store is safe for
several processes).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from signery.keystores import KeyStore
from signery.keystores._settings import Pkcs11Settings
from tests.support import missing

MODULE_CANDIDATES = (
    Path("/usr/lib/softhsm/libsofthsm2.so"),
    Path("/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so"),
    Path("/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so"),
    Path("/usr/local/lib/softhsm/libsofthsm2.so"),
)
# Tokens made before the library is first loaded: one per store a test run opens.
TOKENS_PER_PROCESS = 24
SO_PIN_BYTES = 8


@dataclass(frozen=True)
class SoftHsmToken:
    """An initialised token: where it is, and the secrets to use it."""

    module: Path
    conf: Path
    label: str
    pin: str
    so_pin: str
    pin_file: Path

    def settings(self, *, sessions: int = 4) -> Pkcs11Settings:
        return Pkcs11Settings(
            module=self.module, token_label=self.label, pin_file=self.pin_file, sessions=sessions
        )

    def env(self) -> dict[str, str]:
        """The environment a process needs to see this token."""
        return {"SOFTHSM2_CONF": str(self.conf)}

    def pkcs11_tool(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run OpenSC's pkcs11-tool against this token, logged in as the user."""
        tool = shutil.which("pkcs11-tool")
        if tool is None:
            missing("pkcs11-tool (OpenSC)")
        assert tool is not None
        return subprocess.run(
            [
                tool,
                *("--module", str(self.module), "--token-label", self.label),
                *("--login", "--pin", self.pin),
                *args,
            ],
            env={**os.environ, **self.env()},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )


def softhsm_module() -> Path:
    """The SoftHSM2 PKCS#11 library; a skip (a failure in CI) when absent."""
    for path in MODULE_CANDIDATES:
        if path.is_file():
            return path
    missing("SoftHSM2 (libsofthsm2.so)")
    raise AssertionError("unreachable")


class SoftHsm:
    """A SoftHSM2 installation in its own directory (config file + token store)."""

    def __init__(self, directory: Path) -> None:
        self.util = shutil.which("softhsm2-util")
        if self.util is None:
            missing("SoftHSM2 (softhsm2-util)")
        self.module = softhsm_module()
        self.directory = directory
        tokens = directory / "tokens"
        tokens.mkdir(parents=True, exist_ok=True)
        self.conf = directory / "softhsm2.conf"
        self.conf.write_text(
            f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
        )

    def init_token(self, label: str) -> SoftHsmToken:
        """A new token in a free slot, with a fresh random user PIN (and a PIN file)."""
        assert self.util is not None
        pin = f"pin-{secrets.token_hex(8)}"
        so_pin = secrets.token_hex(SO_PIN_BYTES)
        subprocess.run(
            [
                self.util,
                *("--init-token", "--free", "--label", label),
                *("--pin", pin, "--so-pin", so_pin),
            ],
            env={**os.environ, "SOFTHSM2_CONF": str(self.conf)},
            capture_output=True,
            check=True,
            timeout=60,
        )
        pin_file = self.directory / f"{label}.pin"
        pin_file.touch(mode=0o600)
        pin_file.write_text(pin + "\n")
        return SoftHsmToken(self.module, self.conf, label, pin, so_pin, pin_file)


class _InProcess:
    """The SoftHSM of this test process and the tokens not yet claimed."""

    def __init__(self) -> None:
        directory = Path(tempfile.mkdtemp(prefix="signery-softhsm-"))
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
        self.hsm = SoftHsm(directory)
        self.free = [self.hsm.init_token(f"signery-{i:02d}") for i in range(TOKENS_PER_PROCESS)]
        # Before the first load of the library in this process (see the module doc).
        os.environ["SOFTHSM2_CONF"] = str(self.hsm.conf)


_in_process: _InProcess | None = None
_in_process_lock = threading.Lock()


def claim_token() -> SoftHsmToken:
    """A token no other store of this process has used (skips without SoftHSM2)."""
    global _in_process
    with _in_process_lock:
        if _in_process is None:
            _in_process = _InProcess()
        if not _in_process.free:
            raise RuntimeError(f"all {TOKENS_PER_PROCESS} SoftHSM tokens are used; raise the count")
        return _in_process.free.pop(0)


@contextlib.contextmanager
def pkcs11_store(tmp: Path, *, sessions: int = 4) -> Iterator[KeyStore]:
    """A pkcs11 key store on a fresh SoftHSM2 token (the conformance factory)."""
    from signery.keystores._pkcs11 import open_store

    store = open_store(claim_token().settings(sessions=sessions))
    try:
        yield store
    finally:
        store.close()
