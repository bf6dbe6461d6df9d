"""``make demo``: walk the whole Signery lifecycle against a real server process.

Run as ``python -m signery.demo --out demo-out``. The demo drives the product the
way a user would: every action is a ``signery`` command run as a subprocess, and
every signature is checked with ``openssl`` rather than with Signery's own code.

It initializes an installation in a temporary data directory (SQLite, builtin
key store, built-in CA), starts ``signery serve`` on a free port of 127.0.0.1,
creates a child TSG with a subject policy (the certificate subjects its keys may
get; another is refused), a built-in account and two signing keys with certificates,
logs in as the account, signs sample artifacts, verifies them, rotates a key
(the account signs with the new version unchanged; both versions' signatures
verify), puts a key under an approval policy (the account's request waits until
a release manager with the approver role approves it; the single-use grant then
signs once), shows a refusal, shows the audit events and usage counters, and
stops the server. It prints each
step and exits 0 only if every step succeeded.

Hardware key stores, when this machine has what they need: with SoftHSM2 and
python-pkcs11 the demo initializes a SoftHSM2 token in its temporary directory
and gives the server the ``pkcs11`` store on it; with moto (and boto3) it starts
moto's AWS KMS double (``signery.devtools.moto_kms``, on loopback, log in the
temporary directory) and gives the server the ``aws-kms`` store on it. For each,
it creates an EC P-256 key in that store with a built-in CA certificate, signs
``app.bin`` with it as the account and verifies the signature with openssl. A
store whose tools are missing is skipped, and the demo says why; ``--no-hardware``
skips both (the demo is then what it was without them).

Outputs left in the ``--out`` directory: the sample artifacts and their ``.sig``
files, ``pubkey.pem``, ``pubkey-rsa.pem`` and (after the rotation)
``pubkey-rsa-v2.pem`` with ``app.bin.rsa-v2.sig``, ``pubkey-gated.pem`` with the
approved ``app.bin.gated.sig``, ``chain.pem`` (leaf first, root
last) split into ``leaf.pem``, ``issuing-ca.pem`` and ``root-ca.pem``,
``audit-events.json``, ``usage.json`` and ``server.log``; with the pkcs11 store
``pubkey-hsm.pem``, ``leaf-hsm.pem`` and ``app.bin.hsm.sig``; with the aws-kms
store ``pubkey-kms.pem``, ``leaf-kms.pem``, ``app.bin.kms.sig`` (and ``moto.log``
if the double logged anything).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import traceback
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

import httpx
from rich.console import Console
from rich.markup import escape
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from signery.devtools import softhsm
from signery.devtools.pe import build_pe

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
    (resolved / MARKER).write_text("made by `python -m signery.demo`; wiped on each run\n")


class Demo:
    """One run of the demo: a temporary installation, a server and the walk."""

    def __init__(
        self,
        console: Console,
        out: Path,
        tmp: Path,
        debug_break: str | None,
        *,
        hardware: bool = True,
    ) -> None:
        self.console = console
        self.out = out.resolve()
        self.tmp = tmp
        self.debug_break = debug_break
        self.data_dir = tmp / "data"
        self.home = tmp / "home"
        self.server_log = tmp / "server.log"
        self.signery = Path("signery")
        self.openssl = Path("openssl")
        self.server: subprocess.Popen[bytes] | None = None
        self.server_log_file: IO[bytes] | None = None
        self.killed = False
        self.moto: subprocess.Popen[bytes] | None = None
        self.moto_log = tmp / "moto.log"
        self.moto_log_file: IO[bytes] | None = None
        self.state = State()
        self.secrets: list[str] = []
        self.env = self._child_env()
        # What the server process gets on top of self.env: the hardware stores' settings.
        self.server_env: dict[str, str] = {}
        self.hardware, self.skipped = hardware_stores(hardware)
        self.steps: list[tuple[str, Callable[[], None]]] = [
            ("Check the tools", self.step_tools),
            ("Initialize an installation in a temporary data directory", self.step_init),
        ]
        if self.hardware:
            self.steps.append((self.hardware_title(), self.step_hardware))
        self.steps += [
            ("Start the server on 127.0.0.1", self.step_serve),
            ("Log in as the administrator", self.step_admin_login),
            ("Show the key stores and their health", self.step_keystores),
            ("Create a child TSG", self.step_tsg),
            (
                "Set the child TSG's subject policy: the certificate subjects it may get",
                self.step_subject_policy,
            ),
            ("Create a built-in account with a generated key pair", self.step_account),
            ("Create an EC P-256 signing key with a built-in CA certificate", self.step_ec_key),
            ("Create an RSA 3072 signing key with a built-in CA certificate", self.step_rsa_key),
            ("Export the public keys and the certificate chain", self.step_export),
            ("Check the certificate chain with openssl", self.step_chain_openssl),
            ("Log in as the built-in account", self.step_account_login),
            ("List the keys the account may sign with", self.step_keys),
            ("Sign two sample artifacts with the EC key", self.step_sign_ec),
            ("Sign the binary with the RSA key as well", self.step_sign_rsa),
            ("Verify the signatures with signery", self.step_verify_signery),
            ("Verify the signatures with openssl", self.step_verify_openssl),
            ("Renew the EC key's certificate: same key pair, new certificate", self.step_renew),
            ("Revoke the old certificate; the CRL lists it for openssl", self.step_crl),
            ("Timestamp the signature with Signery's RFC 3161 TSA", self.step_timestamp),
            ("CMS: sign hello.txt with a timestamp; openssl cms -verify", self.step_cms),
            (
                "Authenticode: sign a Windows program with a timestamp; osslsigncode verify",
                self.step_authenticode,
            ),
            ("JAR: sign a Java archive with a timestamp; jarsigner -verify -strict", self.step_jar),
            ("OpenPGP: export the public key, sign, gpg --verify", self.step_openpgp),
            (
                "Rotate the RSA key: a new version signs, the old one still verifies",
                self.step_rotate,
            ),
            (
                "Require approval for a key: pending, approved by a release manager, signed once",
                self.step_approval,
            ),
        ]
        for store in self.hardware:
            self.steps.append(
                (
                    f"Sign with an EC P-256 key in the {store.storage} store ({store.device})",
                    functools.partial(self.step_hardware_key, store),
                )
            )
        stop = "Stop the server and the AWS KMS double" if AWS_KMS in self.hardware else ""
        self.steps += [
            ("Disable the account: signing is refused", self.step_refusal),
            ("Enable the account again: signing works", self.step_reenable),
            ("Show the audit events", self.step_audit),
            (
                "Check the audit hash chains and a signed checkpoint; catch an edited copy",
                self.step_audit_verify,
            ),
            ("Show the usage counters", self.step_usage),
            (stop or "Stop the server", self.step_stop),
        ]
        self.results = [StepResult(i, title) for i, (title, _) in enumerate(self.steps, 1)]

    # ------------------------------------------------------------ plumbing

    def _child_env(self) -> dict[str, str]:
        # No inherited SIGNERY_* setting may point the demo at a real installation
        # (SIGNERY_DATABASE_URL, SIGNERY_CONFIG...) or at the user's profiles.
        # Nor may an inherited AWS_* setting (profile, credentials) reach a real AWS account.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SIGNERY_", "AWS_"))}
        env["SIGNERY_HOME"] = str(self.home)
        env["COLUMNS"] = str(max(self.console.width - 4, 60))  # output is indented by 4
        env["PYTHONUNBUFFERED"] = "1"
        env.pop("PYTHONSTARTUP", None)
        return env

    def redact(self, text: str) -> str:
        """``text`` with every known secret replaced by ``***``, temp paths abbreviated."""
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text.replace(str(self.tmp), "$DEMO_TMP")

    def shown(self, argv: Sequence[str | Path]) -> str:
        """A command line as printed: short program name, temp paths abbreviated, secrets hidden."""
        words = [str(a) for a in argv]
        words[0] = Path(words[0]).name
        return self.redact(shlex.join(words).replace(str(self.out) + os.sep, ""))

    def print_output(self, text: str, style: str = "dim") -> None:
        """Print a command's output, indented, never interpreted as markup."""
        text = self.redact(text).rstrip()
        if text:
            body = Text.from_ansi(textwrap.indent(text, "    ", lambda _: True))
            body.stylize(style)
            self.console.print(body)

    def note(self, message: str) -> None:
        """A line of commentary from the demo itself (markup allowed)."""
        self.console.print(f"  [green]✓[/] {self.redact(message)}", highlight=False)

    def run(
        self,
        argv: Sequence[str | Path],
        *,
        check: bool = True,
        show: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run one command, print it (and its output if ``show``), fail the step if it fails."""
        args = [str(a) for a in argv]
        self.console.print(Text("  $ " + self.shown(args), style="bold cyan"))
        try:
            done = subprocess.run(  # noqa: S603 - fixed argv of our own CLI and openssl, no shell
                args,
                cwd=self.out,
                env=self.env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=COMMAND_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            raise StepFailed(
                f"`{self.shown(args)}` did not finish in {COMMAND_TIMEOUT:.0f} s"
            ) from e
        except OSError as e:
            raise StepFailed(f"cannot run `{self.shown(args)}`: {e}") from e
        if show:
            self.print_output(done.stdout)
            self.print_output(done.stderr, "yellow")
        if check and done.returncode != 0:
            raise StepFailed(
                f"`{self.shown(args)}` exited with status {done.returncode}",
                done.stderr or done.stdout,
            )
        return done

    def cli(
        self,
        *args: str | Path,
        profile: str | None = None,
        check: bool = True,
        show: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``signery [--profile P] ARGS`` (global options go before the command)."""
        prefix: list[str | Path] = [self.signery]
        if profile is not None:
            prefix += ["--profile", profile]
        return self.run([*prefix, *args], check=check, show=show)

    def cli_json(self, *args: str | Path, profile: str | None = None) -> Any:
        """Run ``signery ... --json`` quietly and return its parsed output."""
        done = self.cli(*args, "--json", profile=profile, show=False)
        try:
            return json.loads(done.stdout)
        except ValueError as e:
            raise StepFailed("the command did not print valid JSON", done.stdout) from e

    def openssl_run(
        self, *args: str | Path, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run ``openssl ARGS`` in the output directory."""
        return self.run([self.openssl, *args], check=check)

    def expect(self, condition: bool, message: str, output: str = "") -> None:
        """Fail the step with ``message`` unless ``condition`` holds."""
        if not condition:
            raise StepFailed(message, output)

    def hardware_title(self) -> str:
        """The title of the step that stands up the hardware key stores."""
        parts = []
        if PKCS11 in self.hardware:
            parts.append("create a SoftHSM2 token")
        if AWS_KMS in self.hardware:
            parts.append("start the AWS KMS double (moto)")
        title = " and ".join(parts)
        return title[:1].upper() + title[1:]

    def skipped_line(self) -> str:
        """One line naming the hardware key stores that are skipped, and why."""
        by_reason: dict[str, list[str]] = {}
        for name, why in self.skipped.items():
            by_reason.setdefault(why, []).append(name)
        return "skipped " + "; ".join(
            f"the {' and '.join(names)} store{'s' if len(names) > 1 else ''}: {why}"
            for why, names in by_reason.items()
        )

    def moto_log_tail(self, lines: int = 20) -> str:
        """The last lines of the AWS KMS double's log (for a failure report)."""
        try:
            text = self.moto_log.read_text("utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def server_log_tail(self, lines: int = 20) -> str:
        """The last lines of the server's log, JSON records shortened (for a failure report)."""
        try:
            text = self.server_log.read_text("utf-8", errors="replace")
        except OSError:
            return ""
        shown = []
        for line in text.splitlines()[-lines:]:
            try:
                record = json.loads(line)
                shown.append(
                    f"{record.pop('time', '')} {record.pop('level', '')} "
                    f"{record.pop('logger', '')}: {record.pop('msg', '')}"
                    + "".join(f" {k}={v}" for k, v in record.items() if k != "color_message")
                )
            except (ValueError, AttributeError):
                shown.append(line)
        return "\n".join(shown)

    # ------------------------------------------------------------ the walk

    def walk(self) -> bool:
        """Run every step in order; stop at the first failure. True if all succeeded."""
        total = len(self.steps)
        for result, (_, action) in zip(self.results, self.steps, strict=True):
            self.console.print()
            self.console.rule(
                f"[bold]Step {result.number}/{total}[/]  {escape(result.title)}", align="left"
            )
            started = time.monotonic()
            failure: StepFailed | None = None
            try:
                action()
            except StepFailed as e:
                failure = e
            except Exception as e:  # a surprise (say, a missing JSON field) is a failed step too
                failure = StepFailed(f"{type(e).__name__}: {e}", traceback.format_exc())
            if failure is not None:
                result.seconds = time.monotonic() - started
                result.status = "failed"
                self.report_failure(result, failure)
                return False
            result.seconds = time.monotonic() - started
            result.status = "ok"
        return True

    def report_failure(self, result: StepResult, e: StepFailed) -> None:
        """Say which step failed, why, and what the command and server said."""
        self.console.print(
            f"\n[bold red]✗ Step {result.number} ({escape(result.title)}) failed:[/] "
            f"{escape(self.redact(e.message))}",
            highlight=False,
        )
        if e.output.strip():
            self.console.print("  [red]command output:[/]")
            self.print_output(e.output, "red")
        tail = self.server_log_tail()
        if self.server is not None and tail:
            self.console.print("  [red]last lines of the server log:[/]")
            self.print_output(tail, "dim red")
        tail = self.moto_log_tail()
        if self.moto is not None and tail:
            self.console.print("  [red]last lines of the AWS KMS double's log:[/]")
            self.print_output(tail, "dim red")

    # ------------------------------------------------------------ steps

    def step_tools(self) -> None:
        self.signery = find_signery()
        self.openssl = find_openssl()
        self.cli("--version")
        self.openssl_run("version")
        self.note(f"signery: {escape(str(self.signery))}")
        self.note(f"openssl: {escape(str(self.openssl))}")
        self.console.print(
            f"  [green]✓[/] temporary directory: {escape(str(self.tmp))} (shown as $DEMO_TMP); "
            "profiles live in $DEMO_TMP/home (SIGNERY_HOME), never in ~/.config/signery"
        )
        if PKCS11 in self.hardware:
            self.note(
                f"pkcs11 store: SoftHSM2 ({escape(str(softhsm.softhsm_module()))}) "
                "and python-pkcs11"
            )
        if AWS_KMS in self.hardware:
            self.note("aws-kms store: moto's AWS KMS double (signery.devtools.moto_kms) and boto3")
        if self.skipped:
            self.console.print(f"  [yellow]-[/] {escape(self.skipped_line())}", highlight=False)

    def step_init(self) -> None:
        info = self.cli_json("init", "--data-dir", self.data_dir)
        try:
            self.state.admin_token = str(info["admin_token"])
            self.state.root_tsg_id = str(info["root_tsg_id"])
            self.state.issuer = str(info["issuer"])
            password = str(info["admin_password"])
            username = str(info["admin_username"])
        except (KeyError, TypeError) as e:
            raise StepFailed(f"`signery init --json` did not report {e}", json.dumps(info)) from e
        self.expect(bool(info.get("created")), "`signery init` did not create a new installation")
        self.secrets += [secret for secret in (self.state.admin_token, password) if secret]
        self.note(f"root TSG [bold]{self.state.root_tsg_id}[/], issuer {escape(self.state.issuer)}")
        self.note(f"superuser [bold]{escape(username)}[/], password *** and API token ***")
        self.note(f"built-in CA: {escape(str(info.get('ca_root_subject')))}")
        self.note(f"database: {escape(self.redact(str(info.get('database_url'))))}")

    def step_hardware(self) -> None:
        # moto starts (about half a second) while softhsm2-util initializes the token.
        if AWS_KMS in self.hardware:
            self.start_moto()
        if PKCS11 in self.hardware:
            self.create_token()
        if AWS_KMS in self.hardware:
            self.wait_moto()
        self.note("`signery serve` gets this environment on top of the usual one:")
        self.print_output("\n".join(f"{k}={shlex.quote(v)}" for k, v in self.server_env.items()))

    def create_token(self) -> None:
        """A SoftHSM2 token of its own in $DEMO_TMP/softhsm, as the server's pkcs11 store."""
        hsm = softhsm.SoftHsm(self.tmp / "softhsm")
        self.console.print(
            Text(
                "  $ "
                + self.redact(
                    f"SOFTHSM2_CONF={hsm.conf} {Path(hsm.util).name} --init-token --free "
                    f"--label {HSM_TOKEN_LABEL} --pin *** --so-pin ***"
                ),
                style="bold cyan",
            )
        )
        try:
            token = hsm.init_token(HSM_TOKEN_LABEL)
        except subprocess.CalledProcessError as e:
            output = (e.stderr or b"") + (e.stdout or b"")
            raise StepFailed(
                f"softhsm2-util exited with status {e.returncode}",
                output.decode("utf-8", errors="replace"),
            ) from e
        except (OSError, subprocess.TimeoutExpired) as e:
            raise StepFailed(f"cannot initialize a SoftHSM2 token: {e}") from e
        self.secrets += [token.pin, token.so_pin]
        self.server_env.update(token.server_env())
        self.note(
            f"token [bold]{token.label}[/] in $DEMO_TMP/softhsm/tokens, "
            f"user PIN *** and SO PIN *** (random)"
        )
        self.note(
            f"the server reads the user PIN from {self.redact(str(token.pin_file))} "
            f"(mode {stat.S_IMODE(token.pin_file.stat().st_mode):o})"
        )

    def start_moto(self) -> None:
        """Start moto's AWS KMS double on a port it picks; wait_moto() reads its URL."""
        argv = [
            sys.executable,
            "-m",
            "signery.devtools.moto_kms",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--exit-with-parent",
        ]
        self.console.print(Text("  $ " + self.shown(argv) + " &", style="bold cyan"))
        if self.moto_log_file is None:
            self.moto_log_file = self.moto_log.open("ab")
        try:
            self.moto = subprocess.Popen(  # noqa: S603 - fixed argv: this interpreter, our module
                argv,
                cwd=self.tmp,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=self.moto_log_file,
                start_new_session=True,  # Ctrl-C reaches the demo, which then stops it
            )
        except OSError as e:
            raise StepFailed(f"cannot start the AWS KMS double: {e}") from e

    def wait_moto(self) -> None:
        """Read the URL the AWS KMS double announces once it answers; set the KMS settings."""
        proc = self.moto
        assert proc is not None
        assert proc.stdout is not None
        stdout = proc.stdout
        lines: list[bytes] = []
        reader = threading.Thread(target=lambda: lines.append(stdout.readline()), daemon=True)
        reader.start()
        reader.join(MOTO_START_TIMEOUT)
        # On failure, report_failure() shows the end of its log.
        if not lines:
            raise StepFailed(
                f"the AWS KMS double did not announce its URL in {MOTO_START_TIMEOUT:.0f} s"
            )
        if not lines[0]:  # end of its output: it is exiting
            try:
                status: int | None = proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                status = None
            raise StepFailed(
                f"the AWS KMS double exited with status {status} before it was ready"
                if status is not None
                else "the AWS KMS double closed its output without announcing its URL"
            )
        try:
            url = str(json.loads(lines[0])["url"])
        except (ValueError, KeyError, TypeError) as e:
            raise StepFailed(
                "the AWS KMS double announced something other than its URL",
                lines[0].decode("utf-8", errors="replace"),
            ) from e
        secret = f"dummy-{os.urandom(8).hex()}"
        self.secrets.append(secret)
        self.server_env.update(
            {
                "SIGNERY_AWS_KMS__REGION": KMS_REGION,
                "SIGNERY_AWS_KMS__ENDPOINT_URL": url,
                # Dummy credentials through the standard AWS chain; no AWS files, no
                # instance metadata: nothing of a real AWS account is ever read.
                "AWS_ACCESS_KEY_ID": KMS_ACCESS_KEY_ID,
                "AWS_SECRET_ACCESS_KEY": secret,
                "AWS_CONFIG_FILE": os.devnull,
                "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
                "AWS_EC2_METADATA_DISABLED": "true",
            }
        )
        self.note(f"AWS KMS double process {proc.pid} listening on [bold]{url}[/]")
        self.note("its log goes to $DEMO_TMP/moto.log; its keys live in its memory only")

    def start_server(self, port: int) -> subprocess.Popen[bytes]:
        """Start ``signery serve`` on ``port`` with its output going to the server log."""
        argv = [
            str(self.signery),
            "serve",
            "--data-dir",
            str(self.data_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
        self.console.print(Text("  $ " + self.shown(argv) + " &", style="bold cyan"))
        if self.server_log_file is None:
            self.server_log_file = self.server_log.open("ab")
        return subprocess.Popen(  # noqa: S603 - fixed argv of our own CLI, no shell
            argv,
            cwd=self.tmp,
            env={
                **self.env,
                "SIGNERY_ACCESS_LOG": "false",
                # Signed audit checkpoints are also written here, outside the database.
                "SIGNERY_AUDIT_CHECKPOINT_DIR": str(self.out / "audit-checkpoints"),
                **self.server_env,
            },
            stdin=subprocess.DEVNULL,
            stdout=self.server_log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches the demo, which then stops the server
        )

    def wait_ready(self, proc: subprocess.Popen[bytes], url: str) -> dict[str, Any] | None:
        """Poll ``/readyz`` until it answers 200; None if the process exited first."""
        deadline = time.monotonic() + READY_TIMEOUT
        last = "no answer yet"
        with httpx.Client(timeout=2.0, trust_env=False) as http:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    return None
                try:
                    response = http.get(f"{url}/readyz")
                except httpx.HTTPError as e:
                    last = f"{type(e).__name__}: {e}"
                else:
                    if response.status_code == 200:
                        body: dict[str, Any] = response.json()
                        return body
                    last = f"HTTP {response.status_code}: {response.text[:200]}"
                time.sleep(0.2)
        raise StepFailed(f"the server did not become ready in {READY_TIMEOUT:.0f} s ({last})")

    def step_serve(self) -> None:
        for attempt in range(1, START_ATTEMPTS + 1):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            self.server = self.start_server(port)
            health = self.wait_ready(self.server, url)
            if health is not None:
                self.state.url = url
                self.note(f"server process {self.server.pid} listening on [bold]{url}[/]")
                self.note(f"GET {url}/readyz -> 200 {escape(json.dumps(health))}")
                self.note("its log goes to $DEMO_TMP/server.log (copied to the output at the end)")
                return
            status = self.server.returncode
            self.server = None
            in_use = "port_in_use" in self.server_log_tail()
            if not (in_use and attempt < START_ATTEMPTS):
                raise StepFailed(
                    f"the server exited with status {status} before it was ready",
                    self.server_log_tail(),
                )
            self.console.print(f"  [yellow]port {port} was taken meanwhile; trying another[/]")

    def step_admin_login(self) -> None:
        self.cli("login", "--server", self.state.url, "--api-token", self.state.admin_token)

    def step_keystores(self) -> None:
        self.cli("keystore", "list")
        stores = self.cli_json("keystore", "list")  # the same list, for a robust check
        listed = {str(s.get("name")): s for s in stores}
        for name in ("builtin", *(store.storage for store in self.hardware)):
            found = listed.get(name)
            self.expect(
                found is not None,
                f"`signery keystore list` does not list the {name} store",
                json.dumps(stores, indent=2),
            )
            assert found is not None
            self.expect(
                found.get("healthy") is True,
                f"the {name} store is not healthy: {found.get('detail')}",
                json.dumps(stores, indent=2),
            )
            self.note(f"[bold]{name}[/] is healthy: {escape(str(found.get('detail')))}")

    def step_tsg(self) -> None:
        tsg = self.cli_json("tsg", "create", TSG_NAME)
        self.state.tsg_id = str(tsg["id"])
        self.expect(
            tsg.get("parent_id") == self.state.root_tsg_id,
            f"TSG {TSG_NAME} is not a child of the root TSG {self.state.root_tsg_id}",
            json.dumps(tsg, indent=2),
        )
        self.note(f"TSG [bold]{TSG_NAME}[/] has id [bold]{self.state.tsg_id}[/]")
        done = self.cli("tsg", "tree")
        self.expect(self.state.tsg_id in done.stdout, "the new TSG is missing from `tsg tree`")

    def step_subject_policy(self) -> None:
        # The built-in CA certifies keys below the root TSG only under a subject
        # policy that the root superuser (the demo's administrator) sets.
        self.cli(
            "tsg", "subject-policy", "set", self.state.tsg_id,
            "--cn", f"{DEMO_ORG} *", "--org", DEMO_ORG,
        )  # fmt: skip
        policy = self.cli_json("tsg", "subject-policy", "show", self.state.tsg_id)
        self.expect(
            policy.get("effect") == "policies"
            and (policy.get("own") or {}).get("rules", {}).get("organization") == [DEMO_ORG],
            "the TSG's subject policy is not in force",
            json.dumps(policy, indent=2),
        )
        refused = self.cli(
            "key", "create", "not-ours", "--tsg", self.state.tsg_id, "--algorithm", "EC_P256",
            "--ca", "builtin", "--cn", "Someone Else", "--org", "Someone Else Inc",
            check=False,
        )  # fmt: skip
        self.expect(
            refused.returncode == 1 and "subject_not_allowed" in refused.stderr,
            "a key whose subject is outside the policy was not refused",
            refused.stdout + refused.stderr,
        )
        self.note(
            f"keys in TSG {self.state.tsg_id} get certificates only for O={DEMO_ORG} and "
            f"CN={DEMO_ORG} *; another subject is refused (subject_not_allowed)"
        )

    def step_account(self) -> None:
        key_file = self.tmp / f"{ACCOUNT_NAME}.key"
        account = self.cli_json(
            "account", "create", ACCOUNT_NAME, "--tsg", self.state.tsg_id, "--key-out", key_file
        )
        self.state.client_id = str(account["client_id"])
        self.state.account_id = str(account["id"])
        self.state.key_file = key_file
        self.expect(key_file.is_file(), f"the private key was not written to {key_file}")
        mode = stat.S_IMODE(key_file.stat().st_mode)
        self.expect(
            os.name == "nt" or mode & 0o077 == 0,
            f"the private key file has mode {mode:o}, readable by others",
        )
        fingerprints = ", ".join(k["fingerprint"][:16] for k in account.get("keys", []))
        self.note(
            f"account [bold]{ACCOUNT_NAME}[/] in TSG {self.state.tsg_id}, "
            f"status {escape(str(account.get('status')))}"
        )
        self.note(f"client id [bold]{self.state.client_id}[/]")
        self.note(f"public key registered on the server (fingerprint {fingerprints}...)")
        self.note(
            f"private key written to $DEMO_TMP/{key_file.name} with mode {mode:o}; "
            "the server does not keep it"
        )

    def create_key(self, name: str, algorithm: str, cn: str, storage: str = "builtin") -> None:
        """Create a signing key in ``storage``, certified by the built-in CA, and describe it."""
        where: tuple[str, ...] = () if storage == "builtin" else ("--storage", storage)
        key = self.cli_json(
            "key",
            "create",
            name,
            "--tsg",
            self.state.tsg_id,
            "--algorithm",
            algorithm,
            "--ca",
            "builtin",
            "--cn",
            cn,
            "--org",
            DEMO_ORG,
            *where,
        )
        self.state.key_ids[name] = str(key["id"])
        chain = key.get("certificate_chain") or []
        self.expect(key.get("status") == "active", f"key {name} is not active", json.dumps(key))
        self.expect(
            key.get("storage") == storage,
            f"key {name} is in the {key.get('storage')} store, not in {storage}",
            json.dumps(key),
        )
        self.expect(len(chain) >= 2, f"key {name} has no certificate chain", json.dumps(key))
        cert = next(
            (v.get("certificate") for v in key.get("versions", []) if v.get("version") == 1), None
        )
        self.note(
            f"key [bold]{name}[/] ({algorithm}, storage {key.get('storage')}), "
            f"id {key['id']}, schemes {', '.join(key.get('schemes', []))}"
        )
        if cert:
            self.note(f"certificate subject {escape(str(cert.get('subject')))}")
            self.note(f"issued by {escape(str(cert.get('issuer')))}, until {cert.get('not_after')}")

    def step_ec_key(self) -> None:
        self.create_key(EC_KEY, "EC_P256", "Signery Demo Release (EC)")

    def step_rsa_key(self) -> None:
        self.create_key(RSA_KEY, "RSA_3072", "Signery Demo Release (RSA)")

    def step_export(self) -> None:
        self.cli("key", "public-key", EC_KEY, "-o", "pubkey.pem")
        self.cli("key", "public-key", RSA_KEY, "-o", "pubkey-rsa.pem")
        self.cli("key", "chain", EC_KEY, "-o", "chain.pem")
        certs = split_certificates((self.out / "chain.pem").read_text("ascii"))
        self.expect(
            len(certs) >= 3,
            f"chain.pem holds {len(certs)} certificates; expected leaf, issuing CA and root",
            (self.out / "chain.pem").read_text("ascii"),
        )
        (self.out / "leaf.pem").write_text(certs[0], "ascii")
        (self.out / "issuing-ca.pem").write_text("".join(certs[1:-1]), "ascii")
        (self.out / "root-ca.pem").write_text(certs[-1], "ascii")
        self.note(
            f"chain.pem holds {len(certs)} certificates, split into "
            "leaf.pem, issuing-ca.pem and root-ca.pem"
        )

    def step_chain_openssl(self) -> None:
        done = self.openssl_run(
            "verify", "-CAfile", "root-ca.pem", "-untrusted", "issuing-ca.pem", "leaf.pem"
        )
        self.expect("leaf.pem: OK" in done.stdout, "openssl did not say `leaf.pem: OK`")
        for name in ("root-ca.pem", "issuing-ca.pem", "leaf.pem"):
            self.openssl_run("x509", "-in", name, "-noout", "-subject", "-issuer")
        done = self.openssl_run(
            "x509", "-in", "leaf.pem", "-noout", "-ext", "keyUsage,extendedKeyUsage"
        )
        self.expect("Code Signing" in done.stdout, "the leaf certificate lacks EKU Code Signing")
        self.expect(
            "Digital Signature" in done.stdout, "the leaf certificate lacks KU digitalSignature"
        )
        done = self.openssl_run("x509", "-in", "leaf.pem", "-noout", "-pubkey")
        self.expect(
            done.stdout.strip() == (self.out / "pubkey.pem").read_text("ascii").strip(),
            "the leaf certificate does not certify the key's public key (pubkey.pem)",
            done.stdout,
        )
        self.note("the chain verifies up to the built-in root; the leaf is for code signing")
        self.note("and it certifies the same public key as pubkey.pem")

    def step_account_login(self) -> None:
        assert self.state.key_file is not None
        self.cli(
            "login",
            "--server",
            self.state.url,
            "--client-id",
            self.state.client_id,
            "--key-file",
            self.state.key_file,
            profile=BUILD_PROFILE,
        )

    def step_keys(self) -> None:
        self.cli("keys", profile=BUILD_PROFILE)
        keys = self.cli_json("keys", profile=BUILD_PROFILE)  # the same list, for a robust check
        listed = {str(k.get("name")): k for k in keys}
        for name in (EC_KEY, RSA_KEY):
            self.expect(name in listed, f"`signery keys` does not list {name}", json.dumps(keys))
            self.expect(
                bool(listed[name].get("certificate_chain")),
                f"`signery keys` shows no certificate chain for {name}",
                json.dumps(keys),
            )
        self.note(f"the account sees {len(keys)} keys, {EC_KEY} and {RSA_KEY}, with certificates")

    def step_sign_ec(self) -> None:
        (self.out / "hello.txt").write_text(
            "Hello from the Signery demo.\nOnly this file's SHA-256 digest left the machine.\n",
            "utf-8",
        )
        # A small "binary": a fixed header and random bytes, so every run signs new content.
        (self.out / "app.bin").write_bytes(b"\x7fELF\x02\x01\x01\x00" + os.urandom(64 * 1024))
        self.note("wrote hello.txt and app.bin (64 KiB)")
        key = "no-such-key" if self.debug_break == "sign-key" else EC_KEY
        self.cli(
            "sign", "--key", key, "--format", "raw", "hello.txt", "app.bin", profile=BUILD_PROFILE
        )
        for name in ("hello.txt.sig", "app.bin.sig"):
            path = self.out / name
            self.expect(path.is_file() and path.stat().st_size > 0, f"{name} was not written")

    def step_sign_rsa(self) -> None:
        self.cli(
            "sign",
            "--key",
            RSA_KEY,
            "--format",
            "raw",
            "-o",
            "app.bin.rsa.sig",
            "app.bin",
            profile=BUILD_PROFILE,
        )
        size = (self.out / "app.bin.rsa.sig").stat().st_size
        self.expect(size == 384, f"an RSA 3072 signature has 384 bytes, app.bin.rsa.sig has {size}")

    def step_verify_signery(self) -> None:
        self.cli("verify", "--key", EC_KEY, "hello.txt", "app.bin", profile=BUILD_PROFILE)
        self.cli(
            "verify",
            "--public-key",
            "pubkey-rsa.pem",
            "--signature",
            "app.bin.rsa.sig",
            "app.bin",
            profile=BUILD_PROFILE,
        )

    def step_verify_openssl(self) -> None:
        if self.debug_break == "signature":
            sig = self.out / "hello.txt.sig"
            data = bytearray(sig.read_bytes())
            data[-1] ^= 0x01
            sig.write_bytes(bytes(data))
            self.console.print("  [yellow]debug: flipped a bit of hello.txt.sig[/]")
        checks = [
            ("pubkey.pem", "hello.txt.sig", "hello.txt"),
            ("pubkey.pem", "app.bin.sig", "app.bin"),
            ("pubkey-rsa.pem", "app.bin.rsa.sig", "app.bin"),
        ]
        for pub, sig_name, file in checks:
            done = self.openssl_run(
                "dgst", "-sha256", "-verify", pub, "-signature", sig_name, file, check=False
            )
            self.expect(
                done.returncode == 0 and "Verified OK" in done.stdout,
                f"openssl does not verify {sig_name} (status {done.returncode})",
                done.stdout + done.stderr,
            )
        # And the negative: a changed file must not verify.
        tampered = self.tmp / "hello-tampered.txt"
        tampered.write_bytes((self.out / "hello.txt").read_bytes() + b"!")
        done = self.openssl_run(
            "dgst",
            "-sha256",
            "-verify",
            "pubkey.pem",
            "-signature",
            "hello.txt.sig",
            tampered,
            check=False,
        )
        self.expect(
            done.returncode != 0 and "Verified OK" not in done.stdout,
            "openssl accepted the signature of hello.txt for a changed file",
            done.stdout + done.stderr,
        )
        self.note("openssl verifies all three signatures (ECDSA P-256 and RSA PKCS#1 v1.5)")
        self.note("and rejects hello.txt.sig for a copy of hello.txt with one byte added")

    def step_hardware_key(self, store: HardwareStore) -> None:
        name = store.key
        pub = f"pubkey-{store.suffix}.pem"
        leaf = f"leaf-{store.suffix}.pem"
        sig = f"app.bin.{store.suffix}.sig"
        chain = self.tmp / f"chain-{store.suffix}.pem"
        self.create_key(name, "EC_P256", store.cn, store.storage)
        self.cli("key", "public-key", name, "-o", pub)
        self.cli("key", "chain", name, "-o", chain)
        certs = split_certificates(chain.read_text("ascii"))
        self.expect(bool(certs), f"the chain of {name} holds no certificate", chain.read_text())
        (self.out / leaf).write_text(certs[0], "ascii")
        self.cli(
            "sign", "--key", name, "--format", "raw", "-o", sig, "app.bin", profile=BUILD_PROFILE
        )
        done = self.openssl_run(
            "dgst", "-sha256", "-verify", pub, "-signature", sig, "app.bin", check=False
        )
        self.expect(
            done.returncode == 0 and "Verified OK" in done.stdout,
            f"openssl does not verify {sig} (status {done.returncode})",
            done.stdout + done.stderr,
        )
        done = self.openssl_run(
            "verify", "-CAfile", "root-ca.pem", "-untrusted", "issuing-ca.pem", leaf
        )
        self.expect(f"{leaf}: OK" in done.stdout, f"openssl did not say `{leaf}: OK`")
        done = self.openssl_run("x509", "-in", leaf, "-noout", "-pubkey")
        exported = (self.out / pub).read_text("ascii").strip()
        self.expect(
            done.stdout.strip() == exported,
            f"the certificate of {name} does not certify the exported public key ({pub})",
            done.stdout,
        )
        self.expect(
            exported != (self.out / "pubkey.pem").read_text("ascii").strip(),
            f"{name} has the same public key as {EC_KEY}",
        )
        self.note(f"openssl verifies {sig} with {pub}, the key generated in {store.storage}")
        self.note(
            f"{leaf} (the first certificate of `key chain`) chains up to the built-in root "
            f"and certifies the same public key as {pub}"
        )

    def step_renew(self) -> None:
        before = self.cli_json("keys", profile=BUILD_PROFILE)
        old_chain = next(k for k in before if k.get("name") == EC_KEY)["certificate_chain"]
        self.cli("key", "renew", EC_KEY)
        self.cli("key", "certificates", EC_KEY)
        # The build machine changes nothing: its next listing carries the new chain.
        after = self.cli_json("keys", profile=BUILD_PROFILE)
        new_chain = next(k for k in after if k.get("name") == EC_KEY)["certificate_chain"]
        self.expect(new_chain[0] != old_chain[0], "the account still sees the old certificate")
        (self.out / "leaf-renewed.pem").write_text(new_chain[0], "ascii")
        done = self.openssl_run(
            "verify", "-CAfile", "root-ca.pem", "-untrusted", "issuing-ca.pem", "leaf-renewed.pem"
        )
        self.expect(
            "leaf-renewed.pem: OK" in done.stdout, "the renewed certificate does not verify"
        )
        done = self.openssl_run("x509", "-in", "leaf-renewed.pem", "-noout", "-pubkey")
        self.expect(
            done.stdout.strip() == (self.out / "pubkey.pem").read_text("ascii").strip(),
            "the renewed certificate certifies another key pair",
            done.stdout,
        )
        self.cli(
            "sign", "--key", EC_KEY, "-o", "app.bin.renewed.sig", "app.bin", profile=BUILD_PROFILE
        )
        done = self.openssl_run(
            "dgst", "-sha256", "-verify", "pubkey.pem", "-signature", "app.bin.renewed.sig",
            "app.bin",
        )  # fmt: skip
        self.expect("Verified OK" in done.stdout, "openssl does not verify app.bin.renewed.sig")
        self.note("the new certificate certifies the same public key (pubkey.pem still verifies)")
        self.note("and the account saw the new chain at its next `signery keys`")

    def step_crl(self) -> None:
        history = self.cli_json("key", "certificates", EC_KEY)
        old = next((c for c in history if c.get("status") == "superseded"), None)
        self.expect(old is not None, "the key's certificate history lacks the superseded one")
        assert old is not None
        self.cli("key", "revoke-certificate", EC_KEY, "--serial", old["serial"], "--reason",
                 "superseded")  # fmt: skip
        self.cli("ca", "crl", "-o", "ca.crl")
        self.cli("ca", "crl", "-o", "ca.crl.pem", "--pem")
        self.openssl_run("crl", "-in", "ca.crl.pem", "-noout", "-text")
        verify = ("verify", "-crl_check", "-CAfile", "root-ca.pem", "-untrusted", "issuing-ca.pem",
                  "-CRLfile", "ca.crl.pem")  # fmt: skip
        done = self.openssl_run(*verify, "leaf.pem", check=False)
        self.expect(
            done.returncode != 0 and "certificate revoked" in done.stdout + done.stderr,
            "openssl -crl_check still accepts the revoked certificate leaf.pem",
            done.stdout + done.stderr,
        )
        done = self.openssl_run(*verify, "leaf-renewed.pem")
        self.expect(
            "leaf-renewed.pem: OK" in done.stdout, "the renewed certificate fails -crl_check"
        )
        self.note("ca.crl (DER) and ca.crl.pem list the old certificate as revoked (superseded);")
        self.note("openssl -crl_check refuses leaf.pem and accepts leaf-renewed.pem")

    def step_timestamp(self) -> None:
        # Only the signature's SHA-256 leaves the machine; the reply is checked
        # (granted, same hash, same nonce) before it is written.
        self.cli("timestamp", "app.bin.sig", "--query-out", "app.bin.sig.tsq",
                 profile=BUILD_PROFILE)  # fmt: skip
        shown = self.openssl_run("ts", "-reply", "-in", "app.bin.sig.tsr", "-text")
        self.expect("Status: Granted." in shown.stdout, "the TSA did not grant the timestamp")
        self.expect("Nonce: " in shown.stdout, "the timestamp does not echo the nonce")
        # -queryfile also checks the nonce and the policy; -data recomputes the hash.
        # The token carries the TSA certificate and the issuing CA: the root suffices.
        for source in (("-queryfile", "app.bin.sig.tsq"), ("-data", "app.bin.sig")):
            done = self.openssl_run(
                "ts", "-verify", *source, "-in", "app.bin.sig.tsr", "-CAfile", "root-ca.pem"
            )
            self.expect(
                "Verification: OK" in done.stdout,
                "openssl ts -verify does not accept app.bin.sig.tsr",
                done.stdout + done.stderr,
            )
        self.note("app.bin.sig.tsr is an RFC 3161 reply over app.bin.sig, signed by the TSA key")
        self.note("(certificate: EKU timeStamping only, critical; issued by the built-in CA);")
        self.note("openssl ts -verify accepts it against root-ca.pem alone")

    def verifier(self, name: str) -> Path | None:
        """An external verifier on PATH, or None (its check is then skipped, saying so:
        the signature is still made; CI has every verifier)."""
        found = shutil.which(name)
        if found is None:
            self.console.print(
                f"  [yellow]-[/] {name} is not installed: its check is skipped", highlight=False
            )
        return Path(found) if found else None

    @property
    def tsa_url(self) -> str:
        return f"{self.state.url}/api/v1/tsa"

    def step_cms(self) -> None:
        self.cli("sign", "--key", EC_KEY, "--format", "cms", "--timestamp", self.tsa_url,
                 "hello.txt", profile=BUILD_PROFILE)  # fmt: skip
        done = self.openssl_run(
            "cms", "-verify", "-binary", "-content", "hello.txt", "-inform", "DER",
            "-in", "hello.txt.p7s", "-CAfile", "chain.pem", "-purpose", "any", "-out", os.devnull,
        )  # fmt: skip
        self.expect(
            "Verification successful" in done.stderr + done.stdout,
            "openssl cms -verify does not accept hello.txt.p7s",
            done.stderr,
        )
        done = self.cli("verify", "--format", "cms", "--key", EC_KEY, "hello.txt",
                        profile=BUILD_PROFILE)  # fmt: skip
        self.expect("timestamped" in done.stdout, "the CMS signature carries no timestamp")
        self.note("hello.txt.p7s: detached CMS SignedData with the chain and an RFC 3161 token;")
        self.note("openssl cms -verify accepts it against chain.pem")

    def step_authenticode(self) -> None:
        exe = self.out / "hello.exe"
        compiler = shutil.which("x86_64-w64-mingw32-gcc")
        if compiler is not None:
            source = self.tmp / "hello.c"
            source.write_text('#include <stdio.h>\nint main(void) { puts("hello"); return 0; }\n')
            self.run([compiler, "-O2", "-s", "-o", exe, source])
            self.note("hello.exe: a PE32+ program compiled with MinGW-w64")
        else:
            exe.write_bytes(build_pe(pe32_plus=True, text=b"\xc3" + os.urandom(4096)))
            self.note("hello.exe: a minimal PE32+ image (MinGW-w64 is not installed)")
        self.cli("sign", "--key", RSA_KEY, "--format", "authenticode", "--timestamp",
                 self.tsa_url, "hello.exe", profile=BUILD_PROFILE)  # fmt: skip
        osslsigncode = self.verifier("osslsigncode")
        if osslsigncode is not None:
            done = self.run([osslsigncode, "verify", "-CAfile", "chain.pem",
                             "-TSA-CAfile", "root-ca.pem", "-in", "hello.exe"])  # fmt: skip
            self.expect(
                "Signature verification: ok" in done.stdout
                and "Timestamp Server Signature verification: ok" in done.stdout,
                "osslsigncode does not accept hello.exe and its timestamp",
                done.stdout,
            )
        self.note("hello.exe now carries an Authenticode signature (RSA 3072, PKCS#1 v1.5) and")
        self.note("an RFC 3161 countersignature from Signery's TSA; osslsigncode verifies both")

    def step_jar(self) -> None:
        jar = self.out / "app.jar"
        with zipfile.ZipFile(jar, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("META-INF/MANIFEST.MF",
                       "Manifest-Version: 1.0\r\nMain-Class: demo.Hello\r\n"
                       "Implementation-Title: Signery demo\r\n\r\n")  # fmt: skip
            z.writestr("demo/Hello.class", os.urandom(512))
            z.writestr("demo/messages.properties", "greeting=hello\n")
        self.note("app.jar: a sample archive with a manifest of its own (its attributes are kept)")
        self.cli("sign", "--key", RSA_KEY, "--format", "jar", "--timestamp", self.tsa_url,
                 "app.jar", profile=BUILD_PROFILE)  # fmt: skip
        keytool, jarsigner = self.verifier("keytool"), self.verifier("jarsigner")
        if keytool is None or jarsigner is None:
            return
        store = self.tmp / "truststore.jks"
        store.unlink(missing_ok=True)
        password = "demo-truststore"
        self.run([keytool, "-importcert", "-noprompt", "-alias", "signery-root", "-file",
                  "root-ca.pem", "-keystore", store, "-storetype", "JKS", "-storepass", password],
                 show=False)  # fmt: skip
        done = self.run([jarsigner, "-verify", "-strict", "-verbose", "-keystore", store,
                         "-storepass", password, "app.jar"], show=False)  # fmt: skip
        self.print_output("\n".join(line for line in done.stdout.splitlines()
                                     if "Timestamped by" in line or "verified" in line
                                     or line.startswith(("  s", "sm"))))  # fmt: skip
        self.expect(
            "jar verified." in done.stdout, "jarsigner does not verify app.jar", done.stdout
        )
        self.expect("Timestamped by" in done.stdout, "jarsigner sees no timestamp", done.stdout)
        with zipfile.ZipFile(jar) as z:
            block = ", ".join(n for n in z.namelist() if n.endswith((".SF", ".RSA", ".EC")))
        self.note(f"app.jar is signed in place ({block}); jarsigner -strict")
        self.note("verifies it against a truststore holding only root-ca.pem")

    def step_openpgp(self) -> None:
        uid = "Signery Demo Release <release@demo.example>"
        self.cli("key", "export", "--openpgp", EC_KEY, "--uid", uid, "-o", "release-ec.asc",
                 profile=BUILD_PROFILE)  # fmt: skip
        self.cli("sign", "--key", EC_KEY, "--format", "openpgp", "hello.txt", profile=BUILD_PROFILE)
        gpg = self.verifier("gpg")
        if gpg is None:
            return
        home = self.tmp / "gnupg"
        home.mkdir(mode=0o700, exist_ok=True)
        base: list[str | Path] = [gpg, "--batch", "--no-tty", "--homedir", home]
        try:
            self.run([*base, "--import", "release-ec.asc"])
            done = self.run([*base, "--verify", "hello.txt.asc", "hello.txt"])
        finally:
            gpgconf = shutil.which("gpgconf")
            if gpgconf is not None:  # gpg may have started an agent for this home
                self.run([gpgconf, "--homedir", home, "--kill", "all"], check=False, show=False)
        self.expect(
            "Good signature" in done.stderr, "gpg did not report a good signature", done.stderr
        )
        self.note("release-ec.asc is the key's OpenPGP public key (self-signed through Signery);")
        self.note("gpg verifies hello.txt.asc with it")

    def step_rotate(self) -> None:
        self.cli("key", "rotate", RSA_KEY)
        # The build machine changes nothing: it signs "with release-rsa" as before.
        done = self.cli(
            "sign", "--key", RSA_KEY, "-o", "app.bin.rsa-v2.sig", "app.bin", "--json",
            profile=BUILD_PROFILE,
        )  # fmt: skip
        try:
            signed = json.loads(done.stdout)
        except ValueError as e:
            raise StepFailed("`signery sign --json` did not print JSON", done.stdout) from e
        used = signed[0].get("key_version") if isinstance(signed, list) and signed else None
        self.expect(used == 2, f"the signature names key version {used}, not 2", done.stdout)
        key = self.cli_json("key", "show", RSA_KEY)
        versions = {v["version"]: v for v in key.get("versions", [])}
        self.expect(
            versions.get(1, {}).get("status") == "archived"
            and versions.get(2, {}).get("status") == "active",
            "expected version 1 archived and version 2 active",
            json.dumps(key.get("versions"), indent=2),
        )
        (self.out / "pubkey-rsa-v2.pem").write_text(versions[2]["public_key_pem"], "ascii")
        self.expect(
            versions[1]["public_key_pem"].strip()
            == (self.out / "pubkey-rsa.pem").read_text("ascii").strip(),
            "the archived version does not list the original public key",
        )
        for pub, sig in (("pubkey-rsa-v2.pem", "app.bin.rsa-v2.sig"),
                         ("pubkey-rsa.pem", "app.bin.rsa.sig")):  # fmt: skip
            done = self.openssl_run("dgst", "-sha256", "-verify", pub, "-signature", sig, "app.bin")
            self.expect("Verified OK" in done.stdout, f"openssl does not verify {sig} with {pub}")
        done = self.run(
            [self.openssl, "dgst", "-sha256", "-verify", "pubkey-rsa.pem", "-signature",
             "app.bin.rsa-v2.sig", "app.bin"],
            check=False, show=False,
        )  # fmt: skip
        self.expect(
            done.returncode != 0, "the new version's signature verifies with the old key pair"
        )
        self.note("openssl: the version 2 signature does not verify with version 1's public key")
        self.note(
            "version 2 signs at once; version 1 is archived but listed, so the signature "
            "made before the rotation still verifies"
        )

    def sign_pending(self, output: str) -> str:
        """`signery sign` on the gated key must stop at a pending request; its id."""
        done = self.cli(
            "sign", "--key", GATED_KEY, "-o", output, "app.bin", "--json",
            profile=BUILD_PROFILE, check=False, show=False,
        )  # fmt: skip
        self.print_output(done.stderr, "yellow")
        self.expect(
            done.returncode == EXIT_APPROVAL_PENDING,
            f"expected exit status {EXIT_APPROVAL_PENDING} (approval pending), "
            f"got {done.returncode}",
            done.stdout + done.stderr,
        )
        self.expect(not (self.out / output).exists(), f"{output} was written without approval")
        try:
            (result,) = json.loads(done.stdout)
        except ValueError as e:
            raise StepFailed("`signery sign --json` did not print JSON", done.stdout) from e
        self.expect(result.get("code") == "approval_pending", "not pending", done.stdout)
        return str(result["request_id"])

    def step_approval(self) -> None:
        # A release manager: a user holding the approver role on the team's TSG.
        user = self.cli_json("user", "create", APPROVER, "--tsg", self.state.tsg_id)
        self.secrets += [str(user.get("password") or "")]
        self.cli("role", "bind", APPROVER, "approver", "--tsg", self.state.tsg_id)
        token = self.cli_json("user", "token", "create", "--name", "demo", "--user", APPROVER)
        self.secrets.append(str(token["token"]))
        self.cli(
            "login", "--server", self.state.url, "--api-token", str(token["token"]),
            profile=APPROVER_PROFILE,
        )  # fmt: skip
        self.cli_json(
            "key", "create", GATED_KEY, "--tsg", self.state.tsg_id, "--algorithm", "EC_P256",
            "--ca", "builtin", "--org", DEMO_ORG, "--cn", "Signery Demo Gated Release",
        )  # fmt: skip
        self.cli("key", "public-key", GATED_KEY, "-o", "pubkey-gated.pem", show=False)
        self.cli(
            "key", "policy", "set", GATED_KEY, "--approvals", "1", "--approver", APPROVER,
            "--grant-uses", "1", "--grant-ttl", "8h", "--signer", ACCOUNT_NAME,
        )  # fmt: skip
        request_id = self.sign_pending("app.bin.gated.sig")
        self.note(f"the build machine got signing request {request_id}: nothing was signed")
        self.cli("approval", "list", profile=APPROVER_PROFILE)
        self.cli(
            "approval", "approve", request_id, "--comment", "release 1.0 is go",
            profile=APPROVER_PROFILE,
        )  # fmt: skip
        self.cli(
            "sign", "--key", GATED_KEY, "--wait", "--wait-timeout", "60s",
            "-o", "app.bin.gated.sig", "app.bin", profile=BUILD_PROFILE,
        )  # fmt: skip
        done = self.openssl_run(
            "dgst", "-sha256", "-verify", "pubkey-gated.pem", "-signature", "app.bin.gated.sig",
            "app.bin",
        )  # fmt: skip
        self.expect("Verified OK" in done.stdout, "openssl does not verify app.bin.gated.sig")
        self.cli("grant", "list", "--key", GATED_KEY, profile=APPROVER_PROFILE)
        grants = self.cli_json("grant", "list", "--key", GATED_KEY, profile=APPROVER_PROFILE)
        self.expect(
            any(g.get("uses") == 1 and g.get("max_uses") == 1 for g in grants),
            "the single-use grant is not shown as used once",
            json.dumps(grants, indent=2),
        )
        again = self.sign_pending("app.bin.gated-2.sig")
        self.expect(again != request_id, "the used-up grant's request was reused")
        self.note("approved once, signed once (openssl verifies it); the grant is used up")
        self.note(f"so the next signing waits for approval again (request {again})")

    def step_refusal(self) -> None:
        self.state.disabled_at = time.time()
        self.cli("account", "disable", self.state.client_id)
        refused = self.out / "refused.sig"
        done = self.cli(
            "sign", "--key", EC_KEY, "-o", refused, "app.bin", profile=BUILD_PROFILE, check=False
        )
        self.expect(
            done.returncode != 0,
            "signing with a disabled account succeeded",
            done.stdout + done.stderr,
        )
        self.expect(not refused.exists(), "a signature was written for a disabled account")
        codes = [c for c in REFUSAL_CODES if c in done.stderr]
        self.expect(
            bool(codes),
            f"the refusal does not name one of the codes {', '.join(REFUSAL_CODES)}",
            done.stderr,
        )
        self.note(
            f"refused with exit status {done.returncode} and error code [bold]{codes[0]}[/]; "
            "no signature was written"
        )

    def step_reenable(self) -> None:
        self.cli("account", "enable", self.state.client_id)
        target = self.tmp / "after-enable.sig"
        self.cli("sign", "--key", EC_KEY, "-o", target, "app.bin", profile=BUILD_PROFILE)
        self.expect(target.is_file(), "no signature after the account was enabled again")

    def step_audit(self) -> None:
        done = self.cli("audit", "list", "--limit", "1000", "--json", show=False)
        try:
            events: list[dict[str, Any]] = json.loads(done.stdout)
        except ValueError as e:
            raise StepFailed("`signery audit list --json` did not print JSON", done.stdout) from e
        (self.out / "audit-events.json").write_text(done.stdout, "utf-8")
        self.expect(bool(events), "there are no audit events")
        self.print_audit_table(events)

        def by_account(e: dict[str, Any]) -> bool:
            principal = e.get("principal") or {}
            return principal.get("id") in (self.state.account_id, self.state.client_id) or (
                principal.get("type") == "account" and principal.get("name") == ACCOUNT_NAME
            )

        ok = [
            e
            for e in events
            if str(e.get("kind", "")).startswith("signing.")
            and e.get("outcome") == "succeeded"
            and by_account(e)
        ]
        least = 4 + len(self.hardware)
        self.expect(
            len(ok) >= least, f"expected at least {least} successful signings, found {len(ok)}"
        )
        refusals = [
            e
            for e in events
            if e.get("outcome") != "succeeded"
            and e.get("reason") in REFUSAL_CODES
            and by_account(e)
        ]
        self.expect(
            bool(refusals),
            "the refused signing of the disabled account is not in the audit events",
        )
        r = refusals[0]
        self.note(f"{len(events)} events saved to audit-events.json; {len(ok)} successful signings")
        self.note(
            f"the refusal is recorded: kind {escape(str(r.get('kind')))}, outcome "
            f"{escape(str(r.get('outcome')))}, reason [bold]{escape(str(r.get('reason')))}[/]"
        )

    def step_audit_verify(self) -> None:
        checkpoints = self.out / "audit-checkpoints"
        self.cli("audit", "checkpoint")
        files = sorted(checkpoints.glob("*.json"))
        self.expect(bool(files), f"no checkpoint was exported to {checkpoints}")
        self.cli("audit", "verify", "--checkpoints", checkpoints)
        # An auditor's copy of the database, with one signing event quietly edited.
        copy = self.tmp / "audit-copy.db"
        with sqlite3.connect(self.data_dir / "signery.db") as live, sqlite3.connect(copy) as dst:
            live.backup(dst)
        with sqlite3.connect(copy) as db:
            row = db.execute(
                "SELECT id FROM audit_events WHERE kind = 'signing.sign.succeeded' "
                "AND hash IS NOT NULL ORDER BY seq LIMIT 1"
            ).fetchone()
            self.expect(row is not None, "no chained signing event to edit")
            db.execute("UPDATE audit_events SET digest = ? WHERE id = ?", ("00" * 32, row[0]))
        done = self.cli(
            "audit", "verify", "--database-url", f"sqlite:///{copy}", "--checkpoints",
            checkpoints, "--json", check=False, show=False,
        )  # fmt: skip
        self.expect(
            done.returncode == 1, "the edited copy passed `signery audit verify`", done.stdout
        )
        try:
            report = json.loads(done.stdout)
        except ValueError as e:
            raise StepFailed("`signery audit verify --json` did not print JSON", done.stdout) from e
        found = json.dumps(report)
        self.expect(row[0] in found and "altered" in found, "the edit is not reported", found)
        self.note(
            f"{len(files)} signed checkpoint(s) exported to audit-checkpoints/; "
            "the live chains verify clean"
        )
        self.note(f"the copy with one edited event is caught: altered, event {row[0]}")

    def print_audit_table(self, events: list[dict[str, Any]]) -> None:
        """The audit events as a compact table (the full records are in the JSON file)."""
        names = {v: k for k, v in self.state.key_ids.items()}
        wide = self.console.width >= 110
        table = Table(header_style="bold", pad_edge=False, box=None)
        table.add_column("time")
        table.add_column("kind", no_wrap=True)
        table.add_column("outcome", no_wrap=True)
        table.add_column("reason", overflow="fold")
        table.add_column("principal", overflow="fold")
        table.add_column("key", overflow="fold")
        if wide:
            table.add_column("digest")
        for event in events:
            outcome = str(event.get("outcome"))
            colour = "green" if outcome == "succeeded" else "bold red"
            principal = event.get("principal") or {}
            key_id = event.get("key_id")
            row = [
                str(event.get("time", ""))[11:19],
                escape(str(event.get("kind"))),
                f"[{colour}]{escape(outcome)}[/]",
                escape(str(event.get("reason") or "")),
                escape(str(principal.get("name") or principal.get("id") or principal.get("type"))),
                escape(names.get(key_id, key_id) if key_id else ""),
            ]
            if wide:
                row.append(str(event.get("digest") or "")[:16])
            table.add_row(*row)
        self.console.print(Padding(table, (0, 0, 0, 4), expand=False))

    def step_usage(self) -> None:
        done = self.cli("usage", "--json", show=False)
        try:
            report: dict[str, Any] = json.loads(done.stdout)
        except ValueError as e:
            raise StepFailed("`signery usage --json` did not print JSON", done.stdout) from e
        (self.out / "usage.json").write_text(done.stdout, "utf-8")
        counters: list[dict[str, Any]] = report.get("counters", [])
        table = Table(header_style="bold", pad_edge=False, box=None)
        for column in ("type", "name", "successes", "failures", "last used"):
            table.add_column(column, justify="right" if column.endswith("es") else "left")
        for c in counters:
            table.add_row(
                escape(str(c.get("subject_type"))),
                escape(str(c.get("name"))),
                str(c.get("successes")),
                str(c.get("failures")),
                str(c.get("last_used_at") or "")[:19],
            )
        self.console.print(Padding(table, (0, 0, 0, 4), expand=False))
        by_name = {(c.get("subject_type"), c.get("name")): c for c in counters}
        expected = {
            ("key", EC_KEY): 3,
            ("key", RSA_KEY): 1,
            **{("key", store.key): 1 for store in self.hardware},
            ("account", ACCOUNT_NAME): 4 + len(self.hardware),
        }
        for (kind, name), least in expected.items():
            found = by_name.get((kind, name))
            successes = int(found.get("successes", 0)) if found else 0
            self.expect(
                successes >= least,
                f"{kind} {name} counts {successes} successful signings; expected {least}",
                json.dumps(report, indent=2),
            )
        self.note("counters saved to usage.json")

    def step_stop(self) -> None:
        self.expect(self.server is not None, "there is no server to stop")
        assert self.server is not None
        self.console.print(Text(f"  $ kill -TERM {self.server.pid}", style="bold cyan"))
        status = self.stop_server()
        # uvicorn shuts down gracefully on SIGTERM, then re-raises it: -15 is a clean stop.
        self.expect(
            status in (0, -signal.SIGTERM) and not self.killed,
            f"the server did not stop cleanly (exit status {status})",
            self.server_log_tail(),
        )
        self.note(f"server stopped cleanly within {STOP_TIMEOUT:.0f} s (exit status {status})")
        if self.moto is not None:
            self.console.print(Text(f"  $ kill -TERM {self.moto.pid}", style="bold cyan"))
            status = self.stop_moto()
            # It catches SIGTERM and exits 0; -15 if the signal came before its handler.
            self.expect(
                status in (0, -signal.SIGTERM),
                f"the AWS KMS double did not stop cleanly (exit status {status})",
                self.moto_log_tail(),
            )
            self.note(f"AWS KMS double stopped (exit status {status})")

    # ------------------------------------------------------------ cleanup

    def stop_server(self) -> int | None:
        """Stop the server (SIGTERM, then SIGKILL after a grace period); its exit status."""
        proc, self.server = self.server, None
        status: int | None = None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    self.console.print(
                        f"  [yellow]the server did not stop in {STOP_TIMEOUT:.0f} s; killing it[/]"
                    )
                    proc.kill()
                    proc.wait()
                    self.killed = True
            status = proc.returncode
        if self.server_log_file is not None:
            self.server_log_file.close()
            self.server_log_file = None
        return status

    def stop_moto(self) -> int | None:
        """Stop the AWS KMS double (SIGTERM, then SIGKILL after a grace period); its status."""
        proc, self.moto = self.moto, None
        status: int | None = None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    self.console.print(
                        f"  [yellow]the AWS KMS double did not stop in {STOP_TIMEOUT:.0f} s; "
                        "killing it[/]"
                    )
                    proc.kill()
                    proc.wait()
            status = proc.returncode
            if proc.stdout is not None:
                proc.stdout.close()
        if self.moto_log_file is not None:
            self.moto_log_file.close()
            self.moto_log_file = None
        return status

    def collect_log(self) -> None:
        """Copy the server log (and the KMS double's, if it said anything) into the output."""
        if self.server_log.exists() and self.out.is_dir():
            shutil.copyfile(self.server_log, self.out / "server.log")
        if self.moto_log.is_file() and self.moto_log.stat().st_size > 0 and self.out.is_dir():
            shutil.copyfile(self.moto_log, self.out / "moto.log")

    def summary(self, ok: bool) -> None:
        """The table of steps, the outputs and the verdict."""
        self.console.print()
        self.console.rule("[bold]Summary", align="left")
        table = Table(header_style="bold", box=None, pad_edge=False)
        table.add_column("#", justify="right")
        table.add_column("step")
        table.add_column("result")
        table.add_column("time", justify="right")
        style = {"ok": "[green]ok[/]", "failed": "[bold red]FAILED[/]", "not run": "[dim]not run"}
        for r in self.results:
            seconds = f"{r.seconds:.1f} s" if r.status != "not run" else ""
            table.add_row(str(r.number), escape(r.title), style[r.status], seconds)
        self.console.print(Padding(table, (0, 0, 0, 2), expand=False))
        if self.out.is_dir():
            files = sorted(p for p in self.out.iterdir() if p.is_file() and p.name != MARKER)
            self.console.print(f"\n  outputs in [bold]{escape(str(self.out))}[/]:")
            for p in files:
                self.console.print(f"    {escape(p.name):<22} {p.stat().st_size:>8} bytes")
        stores = ", ".join(
            ["builtin", *(f"{store.storage} ({store.device})" for store in self.hardware)]
        )
        if self.skipped:
            stores += f"; skipped: {', '.join(self.skipped)} (see step 1)"
        self.console.print(f"\n  key stores of this run: {escape(stores)}", highlight=False)
        passed = sum(r.status == "ok" for r in self.results)
        if ok:
            self.console.print(
                f"\n[bold green]Demo succeeded:[/] all {passed} steps passed.", highlight=False
            )
        else:
            failed = next(r for r in self.results if r.status != "ok")
            self.console.print(
                f"\n[bold red]Demo failed[/] at step {failed.number} ({escape(failed.title)}); "
                f"{passed} of {len(self.results)} steps passed.",
                highlight=False,
            )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The demo's command line."""
    parser = argparse.ArgumentParser(
        prog="python -m signery.demo",
        description="Walk the Signery lifecycle against a real server on 127.0.0.1 "
        "and leave the signed files, keys, chain and audit events in OUT.",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("demo-out"),
        help="output directory, wiped and recreated (default: demo-out)",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary data directory (database, master key, profiles)",
    )
    parser.add_argument(
        "--no-hardware",
        action="store_true",
        help="skip the pkcs11 (SoftHSM2) and aws-kms (moto) key stores even where available",
    )
    # Makes a step fail on purpose, to check that the demo then exits 1.
    parser.add_argument("--debug-break", choices=["sign-key", "signature"], help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; 0 if every step succeeded, 1 if one failed."""
    args = parse_args(argv)
    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(highlight=False, width=110)  # a log file has room for wide tables
    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, _terminate)  # so that `finally` stops the server
    try:
        prepare_out_dir(args.out)
    except (StepFailed, OSError) as e:
        console.print(f"[bold red]error:[/] {escape(str(e))}")
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="signery-demo-")).resolve()
    demo = Demo(console, args.out, tmp, args.debug_break, hardware=not args.no_hardware)
    console.rule("[bold]Signery demo", align="left")
    extra = {
        PKCS11: "the pkcs11 key store on a SoftHSM2 token",
        AWS_KMS: "the aws-kms key store on moto's AWS KMS double",
    }
    also = " and ".join(extra[store] for store in demo.hardware)
    console.print(
        "  A real `signery serve` on 127.0.0.1 with a temporary data directory "
        "(SQLite, builtin key store, built-in CA"
        + (f"; also {also}" if also else "")
        + "), driven with the `signery` CLI and checked with openssl.",
        highlight=False,
    )
    ok = False
    try:
        ok = demo.walk()
    except KeyboardInterrupt:
        console.print("\n[bold red]interrupted[/]")
        return 130
    finally:
        status = demo.stop_server()
        if status is not None:
            console.print(f"  server stopped (exit status {status})")
        status = demo.stop_moto()
        if status is not None:
            console.print(f"  AWS KMS double stopped (exit status {status})")
        demo.collect_log()
        if args.keep:
            console.print(f"  kept the temporary directory {escape(str(tmp))}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    demo.summary(ok)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
