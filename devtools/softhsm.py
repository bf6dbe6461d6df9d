"""SoftHSM2 tokens in a directory of their own, for tests, `make demo` and `make bench`.

SoftHSM reads ``SOFTHSM2_CONF`` when its library is first loaded in a process;
a process that should see these tokens must have it in its environment from the
start (``SoftHsmToken.env()``). Development tooling: the tokens' PINs are random
but kept in files next to them.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from signery.keystores import Pkcs11Settings

MODULE_CANDIDATES = (
    Path("/usr/lib/softhsm/libsofthsm2.so"),
    Path("/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so"),
    Path("/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so"),
    Path("/usr/local/lib/softhsm/libsofthsm2.so"),
)
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

    def server_env(self) -> dict[str, str]:
        """The environment of a `signery serve` that has this token as its pkcs11 store."""
        return {
            "SIGNERY_PKCS11__MODULE": str(self.module),
            "SIGNERY_PKCS11__TOKEN_LABEL": self.label,
            "SIGNERY_PKCS11__PIN_FILE": str(self.pin_file),
            **self.env(),
        }


def softhsm_module() -> Path | None:
    """The SoftHSM2 PKCS#11 library, if installed."""
    return next((p for p in MODULE_CANDIDATES if p.is_file()), None)


def available() -> bool:
    return shutil.which("softhsm2-util") is not None and softhsm_module() is not None


class SoftHsm:
    """A SoftHSM2 installation in its own directory (config file + token store)."""

    def __init__(self, directory: Path) -> None:
        util = shutil.which("softhsm2-util")
        module = softhsm_module()
        if util is None or module is None:
            raise FileNotFoundError("SoftHSM2 is not installed (softhsm2-util, libsofthsm2.so)")
        self.util = util
        self.module = module
        self.directory = directory
        tokens = directory / "tokens"
        tokens.mkdir(parents=True, exist_ok=True)
        self.conf = directory / "softhsm2.conf"
        self.conf.write_text(
            f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
        )

    def init_token(self, label: str) -> SoftHsmToken:
        """A new token in a free slot, with a fresh random user PIN (and a PIN file, 0600)."""
        pin = f"pin-{secrets.token_hex(8)}"
        so_pin = secrets.token_hex(SO_PIN_BYTES)
        subprocess.run(  # noqa: S603 - fixed argv: the softhsm2-util found on PATH
            [
                self.util,
                "--init-token",
                "--free",
                "--label",
                label,
                "--pin",
                pin,
                "--so-pin",
                so_pin,
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
