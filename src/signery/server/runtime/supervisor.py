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
(prometheus_client multiprocess mode; signery.server.runtime.metrics).

SO_REUSEPORT lets any process of the same user join the port, and the kernel
then spreads connections over two unrelated servers: a second installation's
`signery serve` on a busy port would answer half of the first one's clients
with ``unknown_client``. So the parent claims the port first (:func:`claim_port`):

* a lock only one `signery serve` on the host can hold per port number: a name
  in Linux's abstract socket namespace, which belongs to the network namespace
  like the port itself and disappears with the process, so a crash leaves no
  stale lock. Two servers starting at the same instant cannot both hold it;
* then a bind of the address *without* SO_REUSEPORT, which fails while anything
  else listens there (an older Signery, another program), and succeeds beside
  the parent's own socket, which is not listening.

Either failure is a clear start-up error (:class:`~signery.errors.PortInUse`).
"""

from __future__ import annotations

import errno
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from typing import Any

from signery.errors import PortInUse
from signery.server.config import PROMETHEUS_MULTIPROC_ENV

log = logging.getLogger("signery.supervisor")

RESTART_BACKOFF_SECONDS = 1.0
STOP_GRACE_SECONDS = 15.0
PORT_LOCK_NAME = "signery-serve-port-{port}"  # in the abstract namespace: no file
# Port 0: the kernel may pick a port whose only other socket is another server's
# (bound, not yet listening) holder; then another free port is picked.
FREE_PORT_ATTEMPTS = 10


def reuseport_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


@dataclass(frozen=True, slots=True)
class ClaimedPort:
    """A port this `signery serve` and its workers alone listen on, for as long
    as ``close`` is not called (or the process lives)."""

    listening: socket.socket  # bound with SO_REUSEPORT (workers: each binds its own)
    lock: socket.socket | None  # None where there is no abstract socket namespace

    @property
    def port(self) -> int:
        return int(self.listening.getsockname()[1])

    def close(self) -> None:
        self.listening.close()
        if self.lock is not None:
            self.lock.close()


def claim_port(host: str, port: int) -> ClaimedPort:
    """Bind ``host:port`` for this server's workers only (see the module's
    docstring); port 0 picks a free port. Raises PortInUse."""
    for _ in range(FREE_PORT_ATTEMPTS if port == 0 else 1):
        try:
            sock = reuseport_socket(host, port)
        except OSError as e:
            raise PortInUse(
                f"cannot listen on {_address(host, port)}: {e.strerror}; "
                "stop what listens there or choose another --port"
            ) from e
        bound = int(sock.getsockname()[1])
        try:
            lock = _lock(host, bound)
        except PortInUse:
            sock.close()
            if port == 0:
                continue
            raise
        try:
            _nothing_listens(host, bound)
        except BaseException:
            sock.close()
            if lock is not None:
                lock.close()
            raise
        return ClaimedPort(sock, lock)
    raise PortInUse(f"found no free port on {host} in {FREE_PORT_ATTEMPTS} attempts")


def _lock(host: str, port: int) -> socket.socket | None:
    if not sys.platform.startswith("linux"):
        return None  # only the bind of _nothing_listens guards the port there
    lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        lock.bind(b"\0" + PORT_LOCK_NAME.format(port=port).encode())
    except OSError as e:
        lock.close()
        if e.errno != errno.EADDRINUSE:
            raise
        raise PortInUse(
            f"cannot listen on {_address(host, port)}: another `signery serve` on this host "
            f"holds port {port}; stop it or choose another --port"
        ) from None
    return lock


def _nothing_listens(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR: connections of an earlier run in TIME_WAIT, or our own
        # socket (bound, not listening), do not make the port busy; a listening
        # socket does, SO_REUSEPORT or not.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            raise PortInUse(
                f"cannot listen on {_address(host, port)}: another server listens there "
                f"({e.strerror}); stop it or choose another --port"
            ) from None


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _worker(
    host: str, port: int, uvicorn_options: dict[str, Any], parent: int, ready: EventType
) -> None:
    """Entry point of a worker process (spawned: a fresh interpreter). Sets ``ready``
    once the application has started and the worker serves."""
    import uvicorn

    class Worker(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if not self.should_exit:  # a failed lifespan startup asks to exit
                ready.set()

    sock = reuseport_socket(host, port)

    def orphaned() -> None:  # the supervisor was killed: do not serve on alone
        while os.getppid() == parent:
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=orphaned, daemon=True).start()
    config = uvicorn.Config(
        "signery.server.app:create_app_from_env", factory=True, **uvicorn_options
    )
    Worker(config).run(sockets=[sock])


class Supervisor:
    def __init__(
        self, *, host: str, port: int, workers: int, uvicorn_options: dict[str, Any]
    ) -> None:
        self.host = host
        self.port = port
        self.workers = workers
        self.options = uvicorn_options
        self._context = multiprocessing.get_context("spawn")
        self._processes: list[BaseProcess] = []
        self._ready: list[EventType] = []
        self._stop = threading.Event()
        self._metrics_dir: Path | None = None

    def _spawn(self) -> tuple[BaseProcess, EventType]:
        ready = self._context.Event()
        process = self._context.Process(
            target=_worker,
            args=(self.host, self.port, self.options, os.getpid(), ready),
            name="signery-worker",
            daemon=False,
        )
        process.start()
        return process, ready

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
            process, ready = self._spawn()
            self._processes.append(process)
            self._ready.append(ready)
        log.info("workers started", extra={"workers": [p.pid for p in self._processes]})
        status = 0
        while not self._stop.wait(0.5):
            for i, process in enumerate(self._processes):
                if process.is_alive():
                    continue
                if not self._ready[i].is_set():
                    # Died before it served: the configuration is broken, and every
                    # restart would fail the same way. (A worker that served and
                    # then died, however soon, is replaced.)
                    log.error(
                        "a worker failed to start; stopping", extra={"exitcode": process.exitcode}
                    )
                    status = 1
                    self._stop.set()
                    break
                log.warning("a worker died; starting another", extra={"exitcode": process.exitcode})
                self._forget_metrics_of(process)
                time.sleep(RESTART_BACKOFF_SECONDS)
                self._processes[i], self._ready[i] = self._spawn()
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
