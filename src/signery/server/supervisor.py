"""Several server processes on one port, each with its own listening socket.

uvicorn's own multi-worker mode shares one listening socket between the
workers; the worker that wakes first accepts every connection waiting, so a
client that opens its keep-alive connections all at once (a CI fleet starting,
a load generator) can land them all on one worker while the others idle. Each
worker here binds its own socket with SO_REUSEPORT, and the kernel spreads new
connections over them evenly.

The parent holds the port (bound, never listening, so it receives no
connection), starts the workers, restarts one that dies, and stops them all on
SIGTERM or SIGINT.

Metrics: the workers count in files of a private directory the parent makes for
this run (mode 0700, removed when it stops) and names in ``PROMETHEUS_MULTIPROC_DIR``
before any worker starts, so a scrape answered by any worker sums them all
(prometheus_client multiprocess mode; signery.server.ops.metrics).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from signery.server.config import PROMETHEUS_MULTIPROC_ENV

log = logging.getLogger("signery.supervisor")

RESTART_BACKOFF_SECONDS = 1.0
STARTUP_GRACE_SECONDS = 10.0
STOP_GRACE_SECONDS = 15.0


def reuseport_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def _worker(host: str, port: int, uvicorn_options: dict[str, Any], parent: int) -> None:
    """Entry point of a worker process (spawned: a fresh interpreter)."""
    import uvicorn

    sock = reuseport_socket(host, port)

    def orphaned() -> None:  # the supervisor was killed: do not serve on alone
        while os.getppid() == parent:
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=orphaned, daemon=True).start()
    config = uvicorn.Config(
        "signery.server.app:create_app_from_env", factory=True, **uvicorn_options
    )
    uvicorn.Server(config).run(sockets=[sock])


class Supervisor:
    def __init__(self, host: str, port: int, workers: int, uvicorn_options: dict[str, Any]) -> None:
        self.host = host
        self.port = port
        self.workers = workers
        self.options = uvicorn_options
        self._context = multiprocessing.get_context("spawn")
        self._processes: list[BaseProcess] = []
        self._started: list[float] = []
        self._stop = threading.Event()
        self._metrics_dir: Path | None = None

    def _spawn(self) -> tuple[BaseProcess, float]:
        process = self._context.Process(
            target=_worker,
            args=(self.host, self.port, self.options, os.getpid()),
            name="signery-worker",
            daemon=False,
        )
        process.start()
        return process, time.monotonic()

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the exit status."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())
        # A fresh directory for this run (mkdtemp: mode 0700, nothing left from a
        # previous one); spawned workers inherit the environment.
        self._metrics_dir = Path(tempfile.mkdtemp(prefix="signery-metrics-"))
        os.environ[PROMETHEUS_MULTIPROC_ENV] = str(self._metrics_dir)
        try:
            return self._supervise()
        finally:
            shutil.rmtree(self._metrics_dir, ignore_errors=True)

    def _supervise(self) -> int:
        for _ in range(self.workers):
            process, started = self._spawn()
            self._processes.append(process)
            self._started.append(started)
        log.info("workers started", extra={"workers": [p.pid for p in self._processes]})
        status = 0
        while not self._stop.wait(0.5):
            for i, process in enumerate(self._processes):
                if process.is_alive():
                    continue
                if time.monotonic() - self._started[i] < STARTUP_GRACE_SECONDS:
                    # Died while starting: the configuration is broken, and every
                    # restart would fail the same way.
                    log.error(
                        "a worker failed to start; stopping", extra={"exitcode": process.exitcode}
                    )
                    status = 1
                    self._stop.set()
                    break
                log.warning("a worker died; starting another", extra={"exitcode": process.exitcode})
                self._forget_metrics_of(process)
                time.sleep(RESTART_BACKOFF_SECONDS)
                self._processes[i], self._started[i] = self._spawn()
        self._terminate()
        return status

    def _forget_metrics_of(self, process: BaseProcess) -> None:
        """A dead worker's live gauges go; its counters stay in the sums (a
        counter must not go back because a worker was replaced)."""
        from prometheus_client import multiprocess

        if process.pid is not None and self._metrics_dir is not None:
            multiprocess.mark_process_dead(process.pid, str(self._metrics_dir))  # type: ignore[no-untyped-call]

    def _terminate(self) -> None:
        for process in self._processes:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for process in self._processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()
