"""What the benchmarks share: a real ``signery serve`` on a temporary data directory."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
# The development tools (SoftHSM2 tokens, the moto KMS double, PE images) live in
# the repository's devtools/ package, beside src/, not in the installed package.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
HOST = "127.0.0.1"


class BenchError(Exception):
    """A failure that invalidates the benchmark (printed loudly, exit status 1)."""


def log(message: str) -> None:
    print(message, flush=True)


def clean_env() -> dict[str, str]:
    """This process's environment without what would change a run: no inherited
    SIGNERY_* setting, AWS configuration or SoftHSM2 configuration."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SIGNERY_", "AWS_")) and k != "SOFTHSM2_CONF"
    }


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class Server:
    """``signery init`` + ``signery serve`` on a temporary data directory, access
    log off; its URL is known before it starts (the load generator is set up first)."""

    def __init__(self, workdir: Path, workers: int = 1, env: dict[str, str] | None = None) -> None:
        exe = Path(sys.executable).parent / "signery"
        self.signery = str(exe if exe.exists() else ROOT / ".venv" / "bin" / "signery")
        self.data_dir = workdir / "data"
        self.log_path = workdir / "serve.log"
        self.workers = workers
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        # Only what the benchmark sets; stores and benchmarks add theirs (add_env).
        self.env = {**clean_env(), "SIGNERY_ACCESS_LOG": "false", **(env or {})}

    def add_env(self, env: dict[str, str]) -> None:
        """Settings for ``init`` and ``serve`` (e.g. the pkcs11 and aws-kms stores)."""
        self.env.update(env)

    def init(self) -> dict[str, Any]:
        """``signery init --json``: its answer (admin_token, issuer, root_tsg_id...)."""
        done = subprocess.run(
            [self.signery, "init", "--data-dir", str(self.data_dir), "--json"],
            env=self.env,
            capture_output=True,
            check=False,
        )
        if done.returncode != 0:
            raise BenchError(f"signery init failed:\n{done.stderr.decode(errors='replace')}")
        info: dict[str, Any] = json.loads(done.stdout)
        return info

    def start(self, timeout: float = 60.0) -> None:
        cmd = [
            self.signery, "serve", "--data-dir", str(self.data_dir), "--host", HOST,
            "--port", str(self.port), "--log-level", "warning", "--workers", str(self.workers),
        ]  # fmt: skip
        with self.log_path.open("wb") as logfile:
            self.proc = subprocess.Popen(
                cmd, env=self.env, stdout=logfile, stderr=subprocess.STDOUT
            )
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

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:]) or "(server log is empty)"


# ---------------------------------------------------------------- measuring


def raw_rate(sign: Callable[[], object], seconds: float, threads: int = 1) -> float:
    """Operations per second of ``sign`` run in ``threads`` threads for ``seconds``."""
    for _ in range(5):  # warm up (first calls load and set up the key in OpenSSL)
        sign()
    counts = [0] * threads
    barrier = threading.Barrier(threads + 1)
    deadline = [0.0]

    def worker(i: int) -> None:
        barrier.wait()
        n = 0
        end = deadline[0]
        while time.perf_counter() < end:
            sign()
            n += 1
        counts[i] = n

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    started = time.perf_counter()
    deadline[0] = started + seconds
    barrier.wait()
    for t in pool:
        t.join()
    return sum(counts) / (time.perf_counter() - started)


def process_ticks(pid: int) -> int:
    """user + system clock ticks of a process (all its threads) and of its live
    descendants (the worker processes of ``signery serve --workers N``)."""
    with open(f"/proc/{pid}/stat") as f:
        after_name = f.read().rsplit(")", 1)[1].split()
    ticks = int(after_name[11]) + int(after_name[12])  # utime, stime (fields 14, 15)
    for child in children_of(pid):
        with contextlib.suppress(OSError):
            ticks += process_ticks(child)
    return ticks


def children_of(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(c) for c in f.read().split()]
    return found
