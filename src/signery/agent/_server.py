"""The agent's conversations: one p11-kit RPC conversation per connected process.

A connection is one PKCS#11 application (p11-kit-client.so connects at
C_Initialize and closes after C_Finalize): it gets its own
:class:`~signery.agent._token.Application`, and its requests are answered in
order, on a thread of its own (the asyncio loop in ``_agent.py`` accepts the
connections). A thread per conversation, not a coroutine: a signature is an
HTTP call of the synchronous client, and handing it from the loop to a worker
thread and back cost a third of an EC signature's latency on a two-core build
machine (``bench/agent_throughput.py``).

Before a byte is read the kernel's ``SO_PEERCRED`` says who connected: a
process of another uid is refused. A malformed message is answered with
CKR_DEVICE_ERROR (the frame told its length, so the conversation goes on); a
frame that cannot be a p11-kit message ends the connection. Nothing a peer
sends ends the agent.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from typing import Final

from signery.agent._objects import AttributeValue
from signery.agent._peer import PeerProcess, describe, machine_name, peer_credentials
from signery.agent._pkcs11 import CKR, Pkcs11Error
from signery.agent._rpc import (
    FRAME_MAX,
    HANDSHAKE,
    HEADER,
    LAST_CALL,
    PROTOCOL_VERSION,
    SIGNATURES,
    Call,
    FrameError,
    Reader,
    Writer,
    error_body,
    frame,
    native_length,
)
from signery.agent._token import Application, Token

log = logging.getLogger("signery.agent")

_Handler = Callable[[Application, Reader, Writer], None]
OPTIONS_MAX: Final = 1024


class Connection:
    """One connected process and its PKCS#11 state."""

    def __init__(self, token: Token, peer: PeerProcess | None) -> None:
        caller = peer.client_info(machine_name()) if peer is not None else None
        self.app = Application(token, caller=caller)
        self.peer = peer

    def answer(self, body: bytes) -> bytes:
        """The reply body to one request body."""
        reader = Reader(body)
        try:
            call = reader.u32()
            signature = reader.signature()
        except FrameError:
            return error_body(CKR.DEVICE_ERROR)
        if call not in SIGNATURES:
            if 0 < call <= LAST_CALL:
                return error_body(CKR.FUNCTION_NOT_SUPPORTED)
            log.warning("%s sent call id %d, not a PKCS#11 call", self._who(), call)
            return error_body(CKR.DEVICE_ERROR)
        known = Call(call)
        request, response = SIGNATURES[known]
        if signature != request:
            log.warning("%s sent %s with fields %r", self._who(), known.name, signature)
            return error_body(CKR.DEVICE_ERROR)
        writer = Writer(known, response)
        try:
            _HANDLERS[known](self.app, reader, writer)
        except Pkcs11Error as e:
            if e.rv not in _QUIET:
                log.info("%s: %s -> %s (%s)", self._who(), known.name, e.rv.name, e)
            return error_body(e.rv)
        except FrameError as e:
            log.warning("%s sent a malformed %s: %s", self._who(), known.name, e)
            return error_body(CKR.DEVICE_ERROR)
        except Exception:
            # A fault of the agent's own, not the tool's: logged with its trace,
            # answered as such, and the conversation (and the agent) go on.
            log.exception("%s: %s failed", self._who(), known.name)
            return error_body(CKR.GENERAL_ERROR)
        return writer.body()

    def _who(self) -> str:
        if self.peer is None:
            return "a process"
        return f"{self.peer.tool or 'a process'} (pid {self.peer.pid})"


# Answers that are part of a tool's normal conversation, not worth a log line.
_QUIET: Final = frozenset({CKR.USER_ALREADY_LOGGED_IN, CKR.CRYPTOKI_ALREADY_INITIALIZED})


def serve_connection(token: Token, sock: socket.socket) -> None:
    """Talk p11-kit RPC with one peer until it closes (or breaks the framing)."""
    try:
        peer: PeerProcess | None = None
        if sock.family == socket.AF_UNIX:
            credentials = peer_credentials(sock)
            if credentials.uid != os.getuid():
                log.warning(
                    "refused a connection from uid %d (pid %d): the agent serves uid %d only",
                    credentials.uid,
                    credentials.pid,
                    os.getuid(),
                )
                return
            peer = describe(credentials)
        connection = Connection(token, peer)
        _receive(sock, 1)  # the client's highest protocol version
        sock.sendall(bytes((PROTOCOL_VERSION,)))  # version 0, whatever it offers
        while True:
            try:
                header = _receive(sock, HEADER.size)
            except EOFError:
                return  # the process closed (after C_Finalize, or it ended)
            code, options_length, body_length = HEADER.unpack(header)
            if options_length > OPTIONS_MAX or body_length > FRAME_MAX or code == 0:
                log.warning(
                    "%s sent a frame of %d bytes: not p11-kit RPC; closing",
                    connection._who(),
                    body_length,
                )
                return
            _receive(sock, options_length)
            body = _receive(sock, body_length)
            sock.sendall(frame(code, connection.answer(body)))
    except (EOFError, OSError):
        return
    except Exception:
        # The agent's own fault (reading /proc, building the caller's info...):
        # this conversation ends, logged with its trace; the agent goes on.
        log.exception("a conversation with a connected process failed")
    finally:
        sock.close()


def _receive(sock: socket.socket, n: int) -> bytes:
    """Exactly ``n`` bytes, or EOFError when the peer closes first."""
    chunks = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


# ---------------------------------------------------------------- the calls


def _initialize(app: Application, r: Reader, w: Writer) -> None:
    handshake, _ = r.byte_array()
    r.byte()  # pReserved given
    r.byte_array()  # pReserved (p11-kit's own options; none for us)
    if handshake != HANDSHAKE:
        raise Pkcs11Error(CKR.GENERAL_ERROR, "not a p11-kit RPC client")
    app.initialize()


def _finalize(app: Application, r: Reader, w: Writer) -> None:
    app.finalize()


def _get_info(app: Application, r: Reader, w: Writer) -> None:
    info = app.info()
    w.version(info.cryptoki_version).padded(info.manufacturer, 32).ulong(0)
    w.padded(info.description, 32).version(info.library_version)


def _get_slot_list(app: Application, r: Reader, w: Writer) -> None:
    r.byte()  # tokenPresent: the one slot always has its token
    room = r.buffer()
    slots = app.slot_list()
    w.ulong_array(slots if room >= len(slots) else None, len(slots))


def _get_slot_info(app: Application, r: Reader, w: Writer) -> None:
    info = app.slot_info(r.ulong())
    w.padded(info.description, 64).padded(info.manufacturer, 32).ulong(info.flags)
    w.version(info.hardware_version).version(info.firmware_version)


def _get_token_info(app: Application, r: Reader, w: Writer) -> None:
    info = app.token_info(r.ulong())
    w.padded(info.label, 32).padded(info.manufacturer, 32)
    w.padded(info.model, 16).padded(info.serial, 16)
    for value in info.counts:
        w.ulong(value)
    w.version(info.hardware_version).version(info.firmware_version).padded(info.utc_time, 16)


def _get_mechanism_list(app: Application, r: Reader, w: Writer) -> None:
    slot = r.ulong()
    room = r.buffer()
    mechanisms = app.mechanism_list(slot)
    w.ulong_array(mechanisms if room >= len(mechanisms) else None, len(mechanisms))


def _get_mechanism_info(app: Application, r: Reader, w: Writer) -> None:
    low, high, flags = app.mechanism_info(r.ulong(), r.ulong())
    w.ulong(low).ulong(high).ulong(flags)


def _open_session(app: Application, r: Reader, w: Writer) -> None:
    w.ulong(app.open_session(r.ulong(), r.ulong()))


def _close_session(app: Application, r: Reader, w: Writer) -> None:
    app.close_session(r.ulong())


def _close_all_sessions(app: Application, r: Reader, w: Writer) -> None:
    app.close_all_sessions(r.ulong())


def _get_session_info(app: Application, r: Reader, w: Writer) -> None:
    for value in app.session_info(r.ulong()):
        w.ulong(value)


def _login(app: Application, r: Reader, w: Writer) -> None:
    session, user_type = r.ulong(), r.ulong()
    r.byte_array()  # the PIN: not needed, the agent is logged in as its account
    app.login(session, user_type)


def _logout(app: Application, r: Reader, w: Writer) -> None:
    app.logout(r.ulong())


def _get_attribute_value(app: Application, r: Reader, w: Writer) -> None:
    session, handle = r.ulong(), r.ulong()
    wanted = r.attribute_buffers()
    rv, values = app.attribute_values(session, handle, [kind for kind, _ in wanted])
    entries: list[tuple[int, AttributeValue | None, bool]] = []
    too_small = False
    for (kind, room), value in zip(wanted, values, strict=True):
        if value is None or isinstance(value, CKR):
            entries.append((kind, None, False))
        elif room == 0:
            entries.append((kind, value, False))  # the application asks the size
        elif room < native_length(value):
            entries.append((kind, None, False))
            too_small = True
        else:
            entries.append((kind, value, True))
    if rv is CKR.OK and too_small:
        rv = CKR.BUFFER_TOO_SMALL
    w.attributes(entries).ulong(rv)


def _find_objects_init(app: Application, r: Reader, w: Writer) -> None:
    session = r.ulong()
    app.find_objects_init(session, r.template())


def _find_objects(app: Application, r: Reader, w: Writer) -> None:
    session, most = r.ulong(), r.buffer()
    handles = app.find_objects(session, most)
    w.ulong_array(handles, len(handles))


def _find_objects_final(app: Application, r: Reader, w: Writer) -> None:
    app.find_objects_final(r.ulong())


def _sign_init(app: Application, r: Reader, w: Writer) -> None:
    session = r.ulong()
    mechanism, pss = r.mechanism()
    app.sign_init(session, mechanism, pss, r.ulong())


def _sign(app: Application, r: Reader, w: Writer) -> None:
    session = r.ulong()
    data, _ = r.byte_array()
    _finish(app, session, data if data is not None else b"", r.buffer(), w)


def _sign_update(app: Application, r: Reader, w: Writer) -> None:
    session = r.ulong()
    data, _ = r.byte_array()
    app.sign_update(session, data if data is not None else b"")


def _sign_final(app: Application, r: Reader, w: Writer) -> None:
    session = r.ulong()
    _finish(app, session, None, r.buffer(), w)


def _finish(app: Application, session: int, data: bytes | None, room: int, w: Writer) -> None:
    """C_Sign / C_SignFinal: a size query (or too little room) answers the length
    and keeps the operation; otherwise the digest goes to the server."""
    length = app.sign_length(session)
    if room < length:
        w.byte_array(None, length)
        return
    operation, key = app.take_signing(session, data)
    signature = app.sign_remote(operation, key)
    w.byte_array(signature, len(signature))


_HANDLERS: Final[dict[Call, _Handler]] = {
    Call.C_INITIALIZE: _initialize,
    Call.C_FINALIZE: _finalize,
    Call.C_GET_INFO: _get_info,
    Call.C_GET_SLOT_LIST: _get_slot_list,
    Call.C_GET_SLOT_INFO: _get_slot_info,
    Call.C_GET_TOKEN_INFO: _get_token_info,
    Call.C_GET_MECHANISM_LIST: _get_mechanism_list,
    Call.C_GET_MECHANISM_INFO: _get_mechanism_info,
    Call.C_OPEN_SESSION: _open_session,
    Call.C_CLOSE_SESSION: _close_session,
    Call.C_CLOSE_ALL_SESSIONS: _close_all_sessions,
    Call.C_GET_SESSION_INFO: _get_session_info,
    Call.C_LOGIN: _login,
    Call.C_LOGOUT: _logout,
    Call.C_GET_ATTRIBUTE_VALUE: _get_attribute_value,
    Call.C_FIND_OBJECTS_INIT: _find_objects_init,
    Call.C_FIND_OBJECTS: _find_objects,
    Call.C_FIND_OBJECTS_FINAL: _find_objects_final,
    Call.C_SIGN_INIT: _sign_init,
    Call.C_SIGN: _sign,
    Call.C_SIGN_UPDATE: _sign_update,
    Call.C_SIGN_FINAL: _sign_final,
}
