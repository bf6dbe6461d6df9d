"""What the benchmarks share: a real ``signery serve`` on a temporary data directory."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


class BenchError(Exception):
    """A failure that invalidates the benchmark (printed loudly, exit status 1)."""


def log(message: str) -> None:
    print(message, flush=True)


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SIGNERY_", "AWS_"))}
    env["SIGNERY_ACCESS_LOG"] = "false"
    return env


class Server:
    """``signery init`` + ``signery serve`` on a temporary data directory."""

    def __init__(self, workdir: Path, workers: int, env: dict[str, str] | None = None) -> None:
        exe = Path(sys.executable).parent / "signery"
        self.signery = str(exe if exe.exists() else ROOT / ".venv" / "bin" / "signery")
        self.data_dir = workdir / "data"
        self.log_path = workdir / "serve.log"
        self.workers = workers
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.env = {**clean_env(), **(env or {})}

    def init(self) -> str:
        """Initialize; returns the bootstrap admin token (to read the usage counters)."""
        done = subprocess.run(
            [self.signery, "init", "--data-dir", str(self.data_dir), "--json"],
            env=self.env,
            capture_output=True,
            check=False,
        )
        if done.returncode != 0:
            raise BenchError(f"signery init failed:\n{done.stderr.decode(errors='replace')}")
        return str(json.loads(done.stdout)["admin_token"])

    def start(self, timeout: float = 60.0) -> None:
        cmd = [
            self.signery,
            "serve",
            "--data-dir",
            str(self.data_dir),
            "--host",
            HOST,
            "--port",
            "0",
            "--json",
            "--log-level",
            "warning",
            "--workers",
            str(self.workers),
        ]
        with self.log_path.open("wb") as logfile:
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=subprocess.PIPE, stderr=logfile)
        assert self.proc.stdout is not None
        line: list[bytes] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()))  # type: ignore[union-attr]
        reader.daemon = True
        reader.start()
        reader.join(timeout)
        if not line or not line[0]:
            raise BenchError(f"signery serve did not announce its URL:\n{self.log_tail()}")
        self.url = str(json.loads(line[0])["url"])
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=2.0) as http:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise BenchError(f"signery serve exited early:\n{self.log_tail()}")
                with contextlib.suppress(httpx.TransportError):
                    if http.get("/readyz").status_code == 200:
                        return
                time.sleep(0.1)
        raise BenchError(f"signery serve not ready after {timeout:.0f} s:\n{self.log_tail()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:]) or "(server log is empty)"
