"""The base of the demo: running commands, printing, the walk and the cleanup."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import textwrap
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from rich.console import Console
from rich.markup import escape
from rich.text import Text

from demo._common import (
    AWS_KMS,
    COMMAND_TIMEOUT,
    PKCS11,
    STOP_TIMEOUT,
    State,
    StepFailed,
    StepResult,
    hardware_stores,
)


class Runner:
    """One run of the demo: a temporary installation, a server, and what every step
    uses to run commands, print and check; the chapters (``_server``, ``_management``...)
    add the steps, ``Demo`` puts them in order."""

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
        # Filled in by the Demo: (title, action) per step, and what happened to each.
        self.steps: list[tuple[str, Callable[[], None]]] = []
        self.results: list[StepResult] = []

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
