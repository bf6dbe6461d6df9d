"""``signery agent``: a PKCS#11 token on a Unix socket, for the tools people use.

The socket is the agent's only door, so it is private: created 0600 in a
directory of the user's that nobody else may enter (0700, owned by the user;
an existing directory that is not is refused, never repaired behind the user's
back), and a peer of another uid is refused at connect time.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import stat
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import quote

from signery.agent._remote import ClientSigning
from signery.agent._server import serve_connection
from signery.agent._token import Token
from signery.client import Client
from signery.errors import ClientError

log = logging.getLogger("signery.agent")

DEFAULT_CACHE_SECONDS: Final = 30.0
# Processes connected at once (a build runs a handful of tools); one more is
# refused with a log line rather than left waiting for a thread.
CONNECTIONS_MAX: Final = 64
ADDRESS_VARIABLE: Final = "P11_KIT_SERVER_ADDRESS"
# Where Debian's p11-kit-modules installs the module tools load to reach the agent.
P11_KIT_CLIENT: Final = Path("/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so")


@dataclass(frozen=True, slots=True)
class AgentSettings:
    socket: Path
    approval_wait: float = 0.0
    cache_seconds: float = DEFAULT_CACHE_SECONDS


def default_socket() -> Path:
    """``$XDG_RUNTIME_DIR/signery/agent.sock`` (a per-user tmpfs on most
    desktops), else ``/tmp/signery-<uid>/agent.sock``."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / "signery" if runtime else Path(f"/tmp/signery-{os.getuid()}")  # noqa: S108
    return base / "agent.sock"


def server_address(socket_path: Path) -> str:
    """The value of P11_KIT_SERVER_ADDRESS for a socket (p11-kit percent-decodes it)."""
    return "unix:path=" + quote(str(socket_path.absolute()), safe="/")


def prepare_socket_directory(socket_path: Path) -> None:
    """Make the socket's directory 0700 if missing; refuse one others may enter,
    or a socket path someone else's file already holds."""
    directory = socket_path.absolute().parent
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = directory.stat()
    if info.st_uid != os.getuid():
        raise ClientError(f"{directory} belongs to uid {info.st_uid}: choose a directory of yours")
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise ClientError(
            f"{directory} is open to other users (mode {stat.S_IMODE(info.st_mode):o}): "
            "the agent's socket needs a directory only you can enter (chmod 700)"
        )
    if socket_path.exists() or socket_path.is_symlink():
        if not stat.S_ISSOCK(socket_path.lstat().st_mode):
            raise ClientError(f"{socket_path} exists and is not a socket")
        socket_path.unlink()  # a socket left by an agent that ended without cleaning up


class Agent:
    """The token of one account, served on one socket."""

    def __init__(self, client: Client, settings: AgentSettings, *, label: str, serial: str) -> None:
        self.settings = settings
        self.token = Token(
            remote=ClientSigning(client, approval_wait=settings.approval_wait),
            label=label,
            serial=serial,
            cache_seconds=settings.cache_seconds,
        )
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        # One thread per connected process (see _server.py for why), at most
        # CONNECTIONS_MAX at once; their sockets, to cut them off at stop().
        self._threads = ThreadPoolExecutor(CONNECTIONS_MAX, thread_name_prefix="signery-agent")
        self._open: dict[socket.socket, asyncio.Future[None]] = {}

    async def start(self) -> None:
        path = self.settings.socket
        prepare_socket_directory(path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket is created 0600, with no window
        try:
            listener.bind(str(path))
        except OSError:
            listener.close()
            raise
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        listener.listen(CONNECTIONS_MAX)
        listener.setblocking(False)
        self._listener = listener
        self._accepting = asyncio.create_task(self._accept(listener))
        log.info("serving a PKCS#11 token on %s", path)

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                connection, _ = await loop.sock_accept(listener)
            except OSError as e:
                if self._listener is None:
                    return  # stopped
                log.warning("accepting a connection failed: %s", e)
                continue
            if len(self._open) >= CONNECTIONS_MAX:
                log.warning("refused a connection: %d processes are connected", CONNECTIONS_MAX)
                connection.close()
                continue
            connection.setblocking(True)
            done = loop.run_in_executor(self._threads, serve_connection, self.token, connection)
            self._open[connection] = done
            done.add_done_callback(functools.partial(self._closed, connection))

    def _closed(self, connection: socket.socket, _: asyncio.Future[None]) -> None:
        self._open.pop(connection, None)

    async def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            if self._accepting is not None:
                self._accepting.cancel()
                await asyncio.gather(self._accepting, return_exceptions=True)
            listener.close()
            # Processes still connected (a daemon such as gnupg-pkcs11-scd keeps the
            # module loaded) are cut off: their threads see the end of the stream.
            for connection in list(self._open):
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
            await asyncio.gather(*self._open.values(), return_exceptions=True)
        self._threads.shutdown(wait=False)
        with contextlib.suppress(FileNotFoundError):
            self.settings.socket.unlink()


@contextlib.contextmanager
def running_in_thread(agent: Agent) -> Iterator[Agent]:
    """The agent served from a thread of this process until the block ends
    (``signery exec``, tests)."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    failure: list[BaseException] = []
    stop = asyncio.Event()

    async def main() -> None:
        try:
            await agent.start()
        except BaseException as e:
            failure.append(e)
            started.set()
            return
        started.set()
        try:
            await stop.wait()
        finally:
            await agent.stop()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    started.wait()
    if failure:
        thread.join()
        loop.close()
        raise failure[0]
    try:
        yield agent
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join()
        loop.close()
