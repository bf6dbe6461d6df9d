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
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from devtools.softhsm import SoftHsm, SoftHsmToken
from devtools.softhsm import available as softhsm_available
from signery.keystores import BACKENDS, KeyStore
from tests.support import missing

__all__ = ["SoftHsm", "SoftHsmToken", "claim_token", "pkcs11_store", "pkcs11_tool"]

TOKENS_PER_PROCESS = 24


def pkcs11_tool(token: SoftHsmToken, *args: str) -> subprocess.CompletedProcess[str]:
    """Run OpenSC's pkcs11-tool against a token, logged in as the user."""
    tool = shutil.which("pkcs11-tool")
    if tool is None:
        missing("pkcs11-tool (OpenSC)")
    assert tool is not None
    return subprocess.run(
        [
            tool,
            *("--module", str(token.module), "--token-label", token.label),
            *("--login", "--pin", token.pin),
            *args,
        ],
        env={**os.environ, **token.env()},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class _InProcess:
    """The SoftHSM of this test process and the tokens not yet claimed."""

    def __init__(self) -> None:
        if not softhsm_available():
            missing("SoftHSM2 (softhsm2-util, libsofthsm2.so)")
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
    store = BACKENDS["pkcs11"].open_store(claim_token().settings(sessions=sessions))
    try:
        yield store
    finally:
        store.close()
