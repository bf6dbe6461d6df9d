"""Bad input and faults reach the agent from any process of its user, not only
from p11-kit-client.so: these tests speak the RPC protocol on the socket
directly (what a buggy or hostile tool could send) and check that each gets its
PKCS#11 error, that nothing is signed that should not be, and that the agent
goes on serving."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from signery.agent import Agent, AgentSettings, running_in_thread
from signery.agent._pkcs11 import CKA, CKM, CKO, CKR
from signery.agent._rpc import HANDSHAKE, HEADER, Call, Reader, Writer
from signery.client import Client
from tests.agent.conftest import Served
from tests.support import missing, require_tool

SLOT = 1


class RpcClient:
    """A p11-kit RPC client over a raw socket, one request at a time."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(str(path))
        self.sock.sendall(b"\x00")
        assert self._read(1) == b"\x00"
        self.code = 0x10

    def _read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("the agent closed the connection")
            data += chunk
        return data

    def send_body(self, body: bytes) -> tuple[int, Reader]:
        self.code += 1
        self.sock.sendall(HEADER.pack(self.code, 6, len(body)) + b"client" + body)
        code, options, length = HEADER.unpack(self._read(HEADER.size))
        assert code == self.code
        assert options == 0
        reader = Reader(self._read(length))
        call = reader.u32()
        reader.signature()
        return call, reader

    def call(self, writer: Writer) -> Reader:
        """The answer's fields; a PKCS#11 error raises :class:`Refused`."""
        call, reader = self.send_body(writer.body())
        if call == Call.ERROR:
            raise Refused(CKR(reader.ulong()))
        return reader

    def initialize(self) -> None:
        w = Writer(Call.C_INITIALIZE, b"ayyay")
        w.byte_array(HANDSHAKE, len(HANDSHAKE)).byte(0).byte_array(b"\x00", 1)
        self.call(w)

    def open_session(self) -> int:
        return self.call(Writer(Call.C_OPEN_SESSION, b"uu").ulong(SLOT).ulong(6)).ulong()

    def private_key(self, session: int, key_id: str) -> int:
        template = {CKA.CLASS: int(CKO.PRIVATE_KEY), CKA.ID: bytes.fromhex(key_id.replace("-", ""))}
        w = Writer(Call.C_FIND_OBJECTS_INIT, b"uaA").ulong(session).u32(len(template))
        for kind, value in template.items():
            w.u32(kind).byte(1)
            if isinstance(value, int):
                w.u32(8).ulong(value)
            else:
                w.u32(len(value)).u32(len(value))
                w._raw(value)
        self.call(w)
        r = self.call(Writer(Call.C_FIND_OBJECTS, b"ufu").ulong(session).u32(10))
        r.byte()
        handles = [r.ulong() for _ in range(r.u32())]
        self.call(Writer(Call.C_FIND_OBJECTS_FINAL, b"u").ulong(session))
        assert len(handles) == 1, handles
        return handles[0]

    def sign_init(self, session: int, mechanism: int, key: int) -> None:
        w = Writer(Call.C_SIGN_INIT, b"uMu").ulong(session).u32(mechanism).u32(0xFFFFFFFF)
        self.call(w.ulong(key))

    def sign(self, session: int, data: bytes, room: int = 1024) -> bytes:
        w = Writer(Call.C_SIGN, b"uayfy").ulong(session).byte_array(data, len(data)).u32(room)
        r = self.call(w)
        present, length = r.byte(), r.u32()
        assert present, f"only a length ({length})"
        return r._take(length)

    def close(self) -> None:
        self.sock.close()


class Refused(Exception):
    def __init__(self, rv: CKR) -> None:
        super().__init__(rv.name)
        self.rv = rv


def refused(action: Any) -> CKR:
    with pytest.raises(Refused) as caught:
        action()
    return caught.value.rv


@pytest.fixture
def rpc(served: Served) -> Iterator[RpcClient]:
    client = RpcClient(served.socket)
    client.initialize()
    yield client
    client.close()


def sign_events(served: Served, after: int) -> list[dict[str, Any]]:
    return [e for e in served.api.events_after(after) if e["kind"].startswith("signing.sign")]


def test_unknown_and_unfitting_mechanisms_are_refused(served: Served, rpc: RpcClient) -> None:
    session = rpc.open_session()
    ec = rpc.private_key(session, served.keys["EC_P256"]["id"])
    assert refused(lambda: rpc.sign_init(session, 0x1234, ec)) is CKR.MECHANISM_INVALID
    # An RSA mechanism on an EC key (p11-kit's client would let it through).
    assert refused(lambda: rpc.sign_init(session, CKM.RSA_PKCS, ec)) is CKR.KEY_TYPE_INCONSISTENT
    # The session is still usable: a fitting mechanism starts.
    rpc.sign_init(session, CKM.ECDSA, ec)


def test_wrong_input_is_refused_before_anything_is_sent(served: Served, rpc: RpcClient) -> None:
    before = served.api.last_seq()
    session = rpc.open_session()
    ec = rpc.private_key(session, served.keys["EC_P256"]["id"])
    rsa = rpc.private_key(session, served.keys["RSA_3072"]["id"])
    rpc.sign_init(session, CKM.ECDSA, ec)
    assert refused(lambda: rpc.sign(session, bytes(20))) is CKR.DATA_LEN_RANGE  # a SHA-1 length
    sha1_info = bytes.fromhex("3021300906052b0e03021a05000414") + bytes(20)
    rpc.sign_init(session, CKM.RSA_PKCS, rsa)
    assert refused(lambda: rpc.sign(session, sha1_info)) is CKR.DATA_INVALID
    rpc.sign_init(session, CKM.RSA_PKCS, rsa)
    assert refused(lambda: rpc.sign(session, b"\x30" + bytes(50))) is CKR.DATA_INVALID
    # Sign without SignInit (the failed ones ended their operation).
    assert refused(lambda: rpc.sign(session, bytes(32))) is CKR.OPERATION_NOT_INITIALIZED
    assert sign_events(served, before) == []  # nothing reached the server


def test_unknown_sessions_and_objects(served: Served, rpc: RpcClient) -> None:
    assert refused(lambda: rpc.sign(999, bytes(32))) is CKR.SESSION_HANDLE_INVALID
    session = rpc.open_session()
    assert refused(lambda: rpc.sign_init(session, CKM.ECDSA, 999_999)) is CKR.KEY_HANDLE_INVALID
    w = Writer(Call.C_GET_SESSION_INFO, b"u").ulong(session + 100)
    assert refused(lambda: rpc.call(w)) is CKR.SESSION_HANDLE_INVALID
    # A call the token does not do: C_GenerateKey (58).
    call, reader = rpc.send_body(Writer(58, b"uMaA").body())
    assert (call, reader.ulong()) == (Call.ERROR, CKR.FUNCTION_NOT_SUPPORTED)


def test_sensitive_and_unknown_attributes_answer_each_on_its_own(
    served: Served, rpc: RpcClient
) -> None:
    session = rpc.open_session()
    key = rpc.private_key(session, served.keys["RSA_3072"]["id"])
    wanted = [0x123, 0x80001234, CKA.LABEL]  # private exponent, a vendor type, the label
    w = Writer(Call.C_GET_ATTRIBUTE_VALUE, b"uufA").ulong(session).ulong(key).u32(len(wanted))
    for kind in wanted:
        w.u32(kind).u32(256)
    r = rpc.call(w)
    assert r.u32() == 3
    assert (r.u32(), r.byte()) == (0x123, 0)
    assert (r.u32(), r.byte()) == (0x80001234, 0)
    assert (r.u32(), r.byte()) == (CKA.LABEL, 1)
    r.u32()
    label = r._array()
    assert label == served.keys["RSA_3072"]["name"].encode()
    assert r.ulong() == CKR.ATTRIBUTE_SENSITIVE


def test_malformed_frames(served: Served, rpc: RpcClient) -> None:
    # A body too short for its fields: an error, and the conversation goes on.
    call, reader = rpc.send_body(struct.pack(">I", Call.C_SIGN) + struct.pack(">I", 5) + b"uayfy")
    assert (call, reader.ulong()) == (Call.ERROR, CKR.DEVICE_ERROR)
    # Fields that are not the call's.
    call, reader = rpc.send_body(struct.pack(">II", Call.C_GET_INFO, 1) + b"u" + bytes(8))
    assert (call, reader.ulong()) == (Call.ERROR, CKR.DEVICE_ERROR)
    # A call id outside the protocol.
    call, reader = rpc.send_body(struct.pack(">II", 9999, 0))
    assert (call, reader.ulong()) == (Call.ERROR, CKR.DEVICE_ERROR)
    rpc.call(Writer(Call.C_GET_INFO, b""))  # still answering
    # A frame that cannot be p11-kit's: the connection ends, the agent does not.
    rpc.sock.sendall(HEADER.pack(0x99, 0, 0x7FFFFFFF))
    assert rpc.sock.recv(1) == b""
    again = RpcClient(served.socket)
    again.initialize()
    again.call(Writer(Call.C_GET_INFO, b""))
    again.close()


def test_garbage_before_the_handshake_does_not_hurt(served: Served) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(str(served.socket))
        s.sendall(os.urandom(4096))
        s.shutdown(socket.SHUT_WR)
        # The agent answers the version byte and closes at the first frame header
        # that cannot be p11-kit's (closing with bytes unread may reset the stream).
        with contextlib.suppress(ConnectionResetError):
            while s.recv(4096):
                pass
    fresh = RpcClient(served.socket)
    fresh.initialize()
    fresh.close()


def test_a_peer_of_another_uid_is_refused(served: Served, caplog: pytest.LogCaptureFixture) -> None:
    if os.getuid() != 0:
        missing("root, to run a process as another user (CI runs as root)")
    setpriv = require_tool("setpriv")
    # An agent whose socket another user could reach (its directory opened
    # after the agent made it private), so that only the uid check is left.
    directory = Path(tempfile.mkdtemp(prefix="signery-agent-uid-", dir="/tmp"))
    socket_path = directory / "agent.sock"
    with Client(served.url, credentials=served.account.credentials()) as client:
        agent = Agent(client, AgentSettings(socket=socket_path), label="Signery", serial="uid")
        with running_in_thread(agent):
            directory.chmod(0o711)
            socket_path.chmod(0o666)
            probe = (
                "import socket,sys\n"
                "s=socket.socket(socket.AF_UNIX)\n"
                f"s.connect({str(socket_path)!r})\n"
                "s.settimeout(30)\n"
                "try:\n"
                "    s.sendall(b'\\x00')\n"
                "    answer = s.recv(1)\n"
                "except (BrokenPipeError, ConnectionResetError):\n"
                "    answer = b''\n"
                "sys.stdout.write(repr(answer))\n"
            )
            run = subprocess.run(
                [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups",
                 sys.executable, "-c", probe],
                capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            # The agent still serves its own user.
            mine = RpcClient(socket_path)
            mine.initialize()
            mine.close()
    directory.rmdir()
    assert run.returncode == 0, run.stderr
    assert run.stdout == "b''"  # closed without a word: no version byte
    assert "refused a connection from uid 65534" in caplog.text


def test_processes_are_served_side_by_side(served: Served) -> None:
    """Two tools signing at once each get their signature: one conversation does
    not wait for the other's round trip to the server."""
    results: dict[int, bytes | BaseException] = {}

    def sign(n: int) -> None:
        try:
            rpc = RpcClient(served.socket)
            rpc.initialize()
            session = rpc.open_session()
            key = rpc.private_key(session, served.keys["EC_P256"]["id"])
            for _ in range(20):
                rpc.sign_init(session, CKM.ECDSA, key)
                results[n] = rpc.sign(session, hashlib.sha256(b"%d" % n).digest())
            rpc.close()
        except BaseException as e:  # reported below
            results[n] = e

    threads = [threading.Thread(target=sign, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(results) == [0, 1, 2, 3]
    assert all(isinstance(r, bytes) and len(r) == 64 for r in results.values()), results


def test_connections_beyond_the_limit_are_refused_and_the_agent_goes_on(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    from signery.agent._agent import CONNECTIONS_MAX

    held = []
    try:
        for _ in range(CONNECTIONS_MAX):
            rpc = RpcClient(served.socket)  # each answered its version byte: served
            held.append(rpc)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as extra:
            extra.settimeout(30)
            extra.connect(str(served.socket))
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                extra.sendall(b"\x00")
            try:
                answer = extra.recv(1)
            except ConnectionResetError:
                answer = b""
            assert answer == b""  # closed: no version byte
        assert f"{CONNECTIONS_MAX} processes are connected" in caplog.text
    finally:
        for rpc in held:
            rpc.close()
    # Once they are gone, a new process is served again.
    deadline = time.monotonic() + 60
    while True:
        try:
            fresh = RpcClient(served.socket)
            break
        except (ConnectionError, AssertionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    fresh.initialize()
    fresh.close()


def test_a_template_attribute_without_a_value_matches_nothing(
    served: Served, rpc: RpcClient
) -> None:
    session = rpc.open_session()

    def found(template_body: Writer) -> int:
        rpc.call(template_body)
        r = rpc.call(Writer(Call.C_FIND_OBJECTS, b"ufu").ulong(session).u32(100))
        r.byte()
        count = r.u32()
        rpc.call(Writer(Call.C_FIND_OBJECTS_FINAL, b"u").ulong(session))
        return count

    everything = Writer(Call.C_FIND_OBJECTS_INIT, b"uaA").ulong(session).u32(0)
    assert found(everything) > 0
    # CKA_VALUE_LEN, which no object has, sent as "no value" (validity 0): it
    # is not a wildcard, nor does "absent" equal "no value".
    valueless = Writer(Call.C_FIND_OBJECTS_INIT, b"uaA").ulong(session).u32(1)
    valueless.u32(0x161).byte(0)
    assert found(valueless) == 0
