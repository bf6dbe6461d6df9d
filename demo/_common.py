"""The demo's constants, values and helpers: what every chapter of the walk shares."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from devtools import softhsm

COMMAND_TIMEOUT = 120.0  # seconds for one CLI or openssl command
READY_TIMEOUT = 60.0  # seconds for the server to answer /readyz
STOP_TIMEOUT = 10.0  # seconds between SIGTERM and SIGKILL
START_ATTEMPTS = 3  # a free port can be taken between probing and binding it
MOTO_START_TIMEOUT = 30.0  # seconds for the AWS KMS double to announce its URL
MARKER = ".signery-demo"  # marks a directory this demo may wipe and recreate
OUTPUTS = frozenset(
    {
        MARKER,
        "hello.txt",
        "hello.txt.sig",
        "app.bin",
        "app.bin.sig",
        "app.bin.rsa.sig",
        "app.bin.hsm.sig",
        "app.bin.kms.sig",
        "pubkey.pem",
        "pubkey-rsa.pem",
        "pubkey-hsm.pem",
        "pubkey-kms.pem",
        "leaf-hsm.pem",
        "leaf-kms.pem",
        "chain.pem",
        "leaf.pem",
        "issuing-ca.pem",
        "root-ca.pem",
        "audit-events.json",
        "usage.json",
        "release-ec.asc",
        "hello.exe",
        "app.jar",
        "hello.txt.asc",
        "hello.txt.p7s",
        "app.bin.sig.tsq",
        "app.bin.sig.tsr",
        "ca.crl",
        "ca.crl.pem",
        "leaf-renewed.pem",
        "app.bin.renewed.sig",
        "app.bin.rsa-v2.sig",
        "app.bin.gated.sig",
        "audit-checkpoints",
        "pubkey-gated.pem",
        "pubkey-rsa-v2.pem",
        "server.log",
        "moto.log",
    }
)

TSG_NAME = "demo-team"
# The organization in the demo keys' certificates, and in the TSG's subject policy.
DEMO_ORG = "Signery Demo"
ACCOUNT_NAME = "build-bot"
EC_KEY = "release-ec"
RSA_KEY = "release-rsa"
GATED_KEY = "release-gated"
APPROVER = "release-manager"
APPROVER_PROFILE = "approver"
EXIT_APPROVAL_PENDING = 3  # `signery sign`: the key requires approval; request pending
BUILD_PROFILE = "build"
REFUSAL_CODES = ("account_disabled", "client_disabled")
HSM_TOKEN_LABEL = "signery-demo"
KMS_REGION = "us-east-1"
KMS_ACCESS_KEY_ID = "testing"  # a dummy: moto accepts any credentials
CERT_RE = re.compile(r"-----BEGIN CERTIFICATE-----\s.*?-----END CERTIFICATE-----\s*", re.DOTALL)


class StepFailed(Exception):
    """A step did not do what it should; carries the evidence to print."""

    def __init__(self, message: str, output: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.output = output


@dataclass(frozen=True)
class HardwareStore:
    """A key store outside the server that the demo can stand up on this machine."""

    storage: str  # the key store's name on the server
    device: str  # what plays the hardware here
    key: str  # the demo key created in it
    cn: str  # the common name of its certificate
    suffix: str  # in the names of its outputs: pubkey-SUFFIX.pem, app.bin.SUFFIX.sig


PKCS11 = HardwareStore(
    "pkcs11", "SoftHSM2 token", "release-hsm", "Signery Demo Release (HSM)", "hsm"
)
AWS_KMS = HardwareStore(
    "aws-kms", "moto KMS double", "release-kms", "Signery Demo Release (KMS)", "kms"
)


def hardware_stores(wanted: bool) -> tuple[list[HardwareStore], dict[str, str]]:
    """The hardware key stores this machine can run, and why each other one is skipped."""
    if not wanted:
        return [], {s.storage: "asked with --no-hardware" for s in (PKCS11, AWS_KMS)}
    missing: dict[HardwareStore, list[str]] = {PKCS11: [], AWS_KMS: []}
    if not softhsm.available():
        missing[PKCS11].append("SoftHSM2 is not installed (no softhsm2-util or libsofthsm2.so)")
    if importlib.util.find_spec("pkcs11") is None:
        missing[PKCS11].append("python-pkcs11 is not installed (pip install 'signery[pkcs11]')")
    if not all(importlib.util.find_spec(m) for m in ("moto", "flask", "flask_cors")):
        missing[AWS_KMS].append("moto's server is not installed (pip install 'moto[server]')")
    if importlib.util.find_spec("boto3") is None:
        missing[AWS_KMS].append("boto3 is not installed (pip install 'signery[aws]')")
    available = [store for store, why in missing.items() if not why]
    skipped = {store.storage: "; ".join(why) for store, why in missing.items() if why}
    return available, skipped


@dataclass
class StepResult:
    """What happened to one step of the walk."""

    number: int
    title: str
    status: str = "not run"  # "ok", "failed" or "not run"
    seconds: float = 0.0


@dataclass
class State:
    """Facts learned along the way that later steps need."""

    url: str = ""
    admin_token: str = ""
    root_tsg_id: str = ""
    issuer: str = ""
    tsg_id: str = ""
    client_id: str = ""
    account_id: str = ""
    key_ids: dict[str, str] = field(default_factory=dict)
    key_file: Path | None = None
    disabled_at: float = 0.0


def find_signery() -> Path:
    """The ``signery`` console script of this interpreter's environment, else on PATH."""
    here = Path(sys.executable)
    for name in ("signery", "signery.exe"):
        candidate = here.with_name(name)
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("signery")
    if found is None:
        raise StepFailed(
            "the `signery` command is not installed next to "
            f"{sys.executable} nor on PATH (run `make demo` or `pip install -e '.[server]'`)"
        )
    return Path(found)


def find_openssl() -> Path:
    """The ``openssl`` executable: the independent verifier of everything we sign."""
    found = shutil.which("openssl")
    if found is None:
        raise StepFailed("`openssl` is not on PATH; the demo verifies every signature with it")
    return Path(found)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def split_certificates(pem: str) -> list[str]:
    """The PEM certificate blocks of ``pem``, in order."""
    return [m.group(0).strip() + "\n" for m in CERT_RE.finditer(pem)]


def prepare_out_dir(out: Path) -> None:
    """Wipe and recreate ``out``, but only if it is empty or a previous demo's output."""
    resolved = out.resolve()
    cwd = Path.cwd().resolve()
    if resolved in (cwd, Path.home().resolve(), Path(resolved.anchor)) or resolved in cwd.parents:
        raise StepFailed(f"refusing to use {out} as the output directory: it would be wiped")
    if resolved.exists():
        if not resolved.is_dir():
            raise StepFailed(f"{out} exists and is not a directory")
        names = {p.name for p in resolved.iterdir()}
        if not (MARKER in names or names <= OUTPUTS):
            raise StepFailed(
                f"{out} is not empty and was not made by this demo; "
                "refusing to wipe it (choose another --out)"
            )
        shutil.rmtree(resolved)
    resolved.mkdir(parents=True)
    (resolved / MARKER).write_text("made by `python -m demo`; wiped on each run\n")
