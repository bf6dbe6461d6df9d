"""Only the workers of one `signery serve` share its port.

Regression tests for issue 12 item 12: every worker listens on its own
SO_REUSEPORT socket, and a second `signery serve` (of another installation)
could join them on the same port; the kernel then split the connections between
two unrelated installations (`unknown_client` for half of the requests).
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from signery.server.config import PROMETHEUS_MULTIPROC_ENV
from signery.server.runtime.supervisor import Supervisor
from tests.support import (
    SIGNERY,
    Installation,
    free_port,
    new_installation,
    running_server,
    server_env,
)

pytestmark = pytest.mark.e2e

REQUESTS = 60  # new connections each: the kernel spreads connections, not requests


@pytest.fixture(scope="module")
def first(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installation]:
    with new_installation("sqlite", tmp_path_factory.mktemp("first")) as inst:
        yield inst


@pytest.fixture(scope="module")
def second(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installation]:
    with new_installation("sqlite", tmp_path_factory.mktemp("second")) as inst:
        yield inst


def serve(installation: Installation, port: int, *, workers: int = 1) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [SIGNERY, "serve", "--host", "127.0.0.1", "--port", str(port), "--json"],
        env=server_env(installation, SIGNERY_WORKERS=str(workers)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@contextlib.contextmanager
def stopped_at_exit(process: subprocess.Popen[str]) -> Iterator[subprocess.Popen[str]]:
    try:
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(30)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def answered_by(url: str, installation: Installation) -> list[int]:
    """The status of REQUESTS requests on new connections, each with the
    installation's admin token: 200 from its own server, 401 from another."""
    statuses = []
    for _ in range(REQUESTS):
        with httpx.Client(base_url=url, timeout=30) as http:
            r = http.get(
                "/api/v1/tsgs", headers={"Authorization": f"Bearer {installation.admin_token}"}
            )
            statuses.append(r.status_code)
    return statuses


@pytest.mark.parametrize("workers", [1, 2])
def test_a_second_server_on_a_busy_port_refuses_to_start(
    first: Installation, second: Installation, workers: int
) -> None:
    with running_server(first, SIGNERY_WORKERS=str(workers)) as server:
        port = int(server.url.rsplit(":", 1)[1])
        with stopped_at_exit(serve(second, port, workers=workers)) as intruder:
            try:
                out, err = intruder.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                out = "still running"
                err = ""
            assert intruder.returncode == 1, out
            assert out == ""  # no URL announced
            assert "port_in_use" in err
            assert f"127.0.0.1:{port}" in err
            assert answered_by(server.url, first) == [200] * REQUESTS


def test_a_server_on_a_port_held_by_another_program_refuses_to_start(second: Installation) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with stopped_at_exit(serve(second, port)) as process:
            _, err = process.communicate(timeout=60)
            assert process.returncode == 1
            assert "port_in_use" in err


def test_of_two_servers_started_at_once_on_one_port_only_one_serves(
    first: Installation, second: Installation
) -> None:
    port = free_port()
    results: dict[str, tuple[int | None, str]] = {}
    processes = {"first": serve(first, port, workers=2), "second": serve(second, port, workers=2)}
    with stopped_at_exit(processes["first"]), stopped_at_exit(processes["second"]):

        def announcement(name: str) -> None:
            process = processes[name]
            assert process.stdout is not None
            line = process.stdout.readline()  # the URL, or nothing when it exits
            results[name] = (None if line else process.wait(60), line)

        readers = [threading.Thread(target=announcement, args=(n,)) for n in processes]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(90)
        serving = [n for n, (code, _) in results.items() if code is None]
        refused = [n for n, (code, _) in results.items() if code == 1]
        assert len(serving) == 1, results
        assert len(refused) == 1, results
        winner = first if serving == ["first"] else second
        url = f"http://127.0.0.1:{port}"
        wait_ready(url)
        assert answered_by(url, winner) == [200] * REQUESTS


def wait_ready(url: str) -> None:
    with httpx.Client(base_url=url, timeout=5) as http:
        for _ in range(300):
            try:
                if http.get("/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
    raise AssertionError(f"{url} did not become ready")


def test_a_worker_that_dies_before_it_serves_stops_the_supervisor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that cannot start (here: a TLS certificate file that does not
    exist) would fail the same way on every restart: the supervisor stops with
    status 1 instead of restarting it forever. Whether a worker had started is
    what it said (it serves), not how long ago it was spawned: a worker killed
    just after it began serving is replaced (tests/e2e/test_workers.py)."""
    options = {"log_config": None, "ssl_certfile": str(tmp_path / "missing.pem")}
    supervisor = Supervisor(host="127.0.0.1", port=free_port(), workers=1, uvicorn_options=options)
    # run() is a process's main loop: it names the metrics directory in the
    # environment and takes SIGTERM/SIGINT; give both back to this test process.
    monkeypatch.setenv(PROMETHEUS_MULTIPROC_ENV, "")
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        assert supervisor.run() == 1
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
