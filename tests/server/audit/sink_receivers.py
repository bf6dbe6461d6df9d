"""Real receivers for audit sinks, on 127.0.0.1 threads: a syslog collector
(TCP with RFC 6587 octet counting, or UDP) and an HTTP webhook endpoint."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

SYSLOG_RE = re.compile(
    r"^<(?P<pri>\d{1,3})>1 (?P<time>\S+) (?P<host>\S+) signery - audit "
    r'\[signery@32473 event_id="(?P<id>[^"]+)" seq="(?P<seq>\d+)" kind="[^"]+"\] (?P<msg>.*)$',
    re.DOTALL,
)


class SyslogReceiver:
    """A syslog collector: RFC 6587 octet-counted frames over TCP, or one message
    per UDP datagram. ``stop()`` closes the port (an outage), ``start()`` reopens it."""

    def __init__(self, transport: str, port: int) -> None:
        self.transport = transport
        self.port = port
        self.messages: list[bytes] = []
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._conns: list[socket.socket] = []

    def start(self) -> None:
        kind = socket.SOCK_STREAM if self.transport == "tcp" else socket.SOCK_DGRAM
        sock = socket.socket(socket.AF_INET, kind)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        if self.transport == "tcp":
            sock.listen()
        self._sock = sock
        target = self._accept if self.transport == "tcp" else self._datagrams
        threading.Thread(target=target, args=(sock,), daemon=True).start()

    def stop(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
            self._sock = None
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        self._conns.clear()

    def _accept(self, sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = sock.accept()
                self._conns.append(conn)
                threading.Thread(target=self._frames, args=(conn,), daemon=True).start()

    def _frames(self, conn: socket.socket) -> None:
        buffer = b""
        with contextlib.suppress(OSError):
            while chunk := conn.recv(65536):
                buffer += chunk
                while b" " in buffer:
                    length, rest = buffer.split(b" ", 1)
                    if len(rest) < int(length):
                        break
                    with self._lock:
                        self.messages.append(rest[: int(length)])
                    buffer = rest[int(length) :]

    def _datagrams(self, sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while True:
                data = sock.recv(65536)
                with self._lock:
                    self.messages.append(data)

    def events(self) -> list[dict[str, Any]]:
        with self._lock:
            messages = list(self.messages)
        out = []
        for m in messages:
            match = SYSLOG_RE.match(m.decode("ascii"))
            assert match, m
            event = json.loads(match["msg"])
            assert event["id"] == match["id"]
            assert event["seq"] == int(match["seq"])
            out.append(event)
        return out


class WebhookReceiver:
    """An HTTP endpoint that answers ``down_status`` while down, 200 when up."""

    def __init__(self) -> None:
        self.down_status: int | None = 503
        self.events: list[dict[str, Any]] = []
        self.requests: list[tuple[int, dict[str, str]]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                status = receiver.down_status or 200
                receiver.requests.append((status, dict(self.headers)))
                if status == 200:
                    receiver.events.extend(json.loads(body)["events"])
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/audit"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
