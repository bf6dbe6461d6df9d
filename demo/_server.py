"""Start and stop: tools, installation, hardware stores, the server, the admin login."""

from __future__ import annotations

import json
import os
import shlex
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from rich.markup import escape
from rich.text import Text

from demo._common import (
    AWS_KMS,
    HSM_TOKEN_LABEL,
    KMS_ACCESS_KEY_ID,
    KMS_REGION,
    MOTO_START_TIMEOUT,
    PKCS11,
    READY_TIMEOUT,
    START_ATTEMPTS,
    STOP_TIMEOUT,
    StepFailed,
    find_openssl,
    find_signery,
    free_port,
)
from demo._runner import Runner
from devtools import softhsm
from signery import endpoints

REPOSITORY = Path(__file__).resolve().parents[1]


class ServerSteps(Runner):
    """Start and stop."""

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
            self.note("aws-kms store: moto's AWS KMS double (devtools.moto_kms) and boto3")
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
            "devtools.moto_kms",
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
                cwd=REPOSITORY,  # `-m devtools.moto_kms`: the repository's devtools/
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
                    response = http.get(url + endpoints.READYZ.path())
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
