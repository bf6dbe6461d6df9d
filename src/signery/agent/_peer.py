"""Who is on the other end of the agent's socket: the calling tool, for the audit.

The kernel says who connected (``SO_PEERCRED``: pid, uid, gid, taken when the
peer called ``connect``, so it cannot be forged by the peer); ``/proc`` says
what that process runs. The agent refuses a peer of another uid before reading a
byte, and sends what it learned as the signing's client info, so that an auditor
sees "jarsigner on build-7 signed with release-rsa", with the tool's hash.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from signery import __version__
from signery import protocol as p

# struct ucred { pid_t pid; uid_t uid; gid_t gid; } (Linux socket(7))
_UCRED = struct.Struct("=iII")
# The command line in the audit event: long enough for a tool's options, never a
# whole response file.
COMMAND_LINE_MAX = 1024
# An executable larger than this is named but not hashed (the hash would hold up
# every connection of that tool).
HASH_MAX_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    """The pid, uid and gid of the process that connected to a Unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCredentials(pid, uid, gid)


@dataclass(frozen=True, slots=True)
class PeerProcess:
    """What a connected tool is: recorded with every signature it asks for."""

    pid: int
    executable: str | None
    executable_sha256: str | None
    command_line: str | None
    user: str | None

    @property
    def tool(self) -> str | None:
        """The tool's short name (``jarsigner``, ``osslsigncode``): the file name of
        the executable the process runs (the command line goes to the audit
        event beside it)."""
        if self.executable is None:
            return None
        return Path(self.executable).name

    def client_info(self, machine: str) -> p.ClientInfo:
        """What the signing API records of this caller (built once per connection)."""
        return p.ClientInfo(
            machine=machine,
            tool=f"{self.tool or 'unknown'} via signery-agent/{__version__}"[:256],
            process=p.ClientProcess(
                pid=self.pid,
                executable=self.executable,
                executable_sha256=self.executable_sha256,
                command_line=self.command_line,
                user=self.user,
            ),
        )


def machine_name() -> str:
    return socket.gethostname()[:256]


def describe(credentials: PeerCredentials, proc: Path = Path("/proc")) -> PeerProcess:
    """Read the peer's executable, its SHA-256 and its command line from ``/proc``.

    The process may be gone or may not be ours to read: every field that cannot
    be read is None, never an error (the signature is still audited, with less)."""
    base = proc / str(credentials.pid)
    executable: str | None
    try:
        executable = os.readlink(base / "exe")
    except OSError:
        executable = None
    sha256 = _hash_executable(base / "exe") if executable is not None else None
    try:
        raw = (base / "cmdline").read_bytes()
    except OSError:
        command_line = None
    else:
        words = [w.decode("utf-8", "replace") for w in raw.split(b"\0") if w]
        command_line = _printable(" ".join(words))[:COMMAND_LINE_MAX] or None
    try:
        user: str | None = pwd.getpwuid(credentials.uid).pw_name
    except KeyError:
        user = str(credentials.uid)
    return PeerProcess(
        pid=credentials.pid,
        executable=_printable(executable)[:1024] if executable is not None else None,
        executable_sha256=sha256,
        command_line=command_line,
        user=user,
    )


def _hash_executable(path: Path) -> str | None:
    # /proc/<pid>/exe opens the very file the process runs, even if it was
    # replaced or deleted on disk since.
    try:
        with path.open("rb") as f:
            if os.fstat(f.fileno()).st_size > HASH_MAX_BYTES:
                return None
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return None


def _printable(text: str) -> str:
    """Control characters replaced: the server refuses them in any field, and a
    command line may carry a newline."""
    return "".join(c if c.isprintable() else "?" for c in text)
