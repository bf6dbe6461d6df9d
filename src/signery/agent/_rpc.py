"""The p11-kit RPC wire format (protocol version 0, what p11-kit 0.24's
``p11-kit-client.so`` speaks), read and written: frames, the typed fields of
a message, and attribute values encoded by attribute type.

The layout, from p11-kit 0.24.1's ``rpc-message.c`` and ``rpc-transport.c``,
checked against the real client (the tests in tests/agent speak it both through
``p11-kit-client.so`` and raw): after a one-byte version exchange, a frame is
a 12-byte header (call code, options length, body length; big-endian), then the
options and the body; a body
is a call id, a signature string naming its fields, then the fields. A
``CK_ULONG`` is always 8 bytes, lengths and counts 4. Every read is bounded by
the frame: a field that runs past its end is a :class:`FrameError`, never an
over-read.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from enum import IntEnum
from typing import Final

from signery.agent._mechanisms import PssParams
from signery.agent._objects import AttributeValue
from signery.agent._pkcs11 import CKM

HEADER: Final = struct.Struct(">III")
# A frame larger than this is refused and the connection closed: tools stream
# data through C_SignUpdate in chunks far smaller.
FRAME_MAX: Final = 4 * 1024 * 1024
NULL_LENGTH: Final = 0xFFFFFFFF
# C_Initialize's first field: p11-kit's fixed handshake string.
HANDSHAKE: Final = b"PRIVATE-GNOME-KEYRING-PKCS11-PROTOCOL-V-1"
PROTOCOL_VERSION: Final = 0


class Call(IntEnum):
    """Call ids of protocol version 0 (``rpc-message.h``) the agent implements;
    every other id between 1 and ``LAST`` answers CKR_FUNCTION_NOT_SUPPORTED."""

    ERROR = 0
    C_INITIALIZE = 1
    C_FINALIZE = 2
    C_GET_INFO = 3
    C_GET_SLOT_LIST = 4
    C_GET_SLOT_INFO = 5
    C_GET_TOKEN_INFO = 6
    C_GET_MECHANISM_LIST = 7
    C_GET_MECHANISM_INFO = 8
    C_OPEN_SESSION = 10
    C_CLOSE_SESSION = 11
    C_CLOSE_ALL_SESSIONS = 12
    C_GET_SESSION_INFO = 13
    C_LOGIN = 18
    C_LOGOUT = 19
    C_GET_ATTRIBUTE_VALUE = 24
    C_FIND_OBJECTS_INIT = 26
    C_FIND_OBJECTS = 27
    C_FIND_OBJECTS_FINAL = 28
    C_SIGN_INIT = 42
    C_SIGN = 43
    C_SIGN_UPDATE = 44
    C_SIGN_FINAL = 45


LAST_CALL: Final = 65  # C_WaitForSlotEvent, the last call of version 0

# (request signature, response signature) of each implemented call.
SIGNATURES: Final[dict[Call, tuple[bytes, bytes]]] = {
    Call.C_INITIALIZE: (b"ayyay", b""),
    Call.C_FINALIZE: (b"", b""),
    Call.C_GET_INFO: (b"", b"vsusv"),
    Call.C_GET_SLOT_LIST: (b"yfu", b"au"),
    Call.C_GET_SLOT_INFO: (b"u", b"ssuvv"),
    Call.C_GET_TOKEN_INFO: (b"u", b"ssssuuuuuuuuuuuvvs"),
    Call.C_GET_MECHANISM_LIST: (b"ufu", b"au"),
    Call.C_GET_MECHANISM_INFO: (b"uu", b"uuu"),
    Call.C_OPEN_SESSION: (b"uu", b"u"),
    Call.C_CLOSE_SESSION: (b"u", b""),
    Call.C_CLOSE_ALL_SESSIONS: (b"u", b""),
    Call.C_GET_SESSION_INFO: (b"u", b"uuuu"),
    Call.C_LOGIN: (b"uuay", b""),
    Call.C_LOGOUT: (b"u", b""),
    Call.C_GET_ATTRIBUTE_VALUE: (b"uufA", b"aAu"),
    Call.C_FIND_OBJECTS_INIT: (b"uaA", b""),
    Call.C_FIND_OBJECTS: (b"ufu", b"au"),
    Call.C_FIND_OBJECTS_FINAL: (b"u", b""),
    Call.C_SIGN_INIT: (b"uMu", b""),
    Call.C_SIGN: (b"uayfy", b"ay"),
    Call.C_SIGN_UPDATE: (b"uay", b""),
    Call.C_SIGN_FINAL: (b"ufy", b"ay"),
}


class FrameError(Exception):
    """A message that does not parse: the client gets CKR_DEVICE_ERROR."""


# How each attribute's value travels (p11-kit 0.24 ``map_attribute_to_value_type``).
_BYTE_TYPES: Final = frozenset(
    {0x1, 0x2, 0x86, 0x103, 0x104, 0x105, 0x106, 0x107, 0x108, 0x109, 0x10A, 0x10B, 0x10C}
    | {0x162, 0x163, 0x164, 0x165, 0x170, 0x171, 0x200, 0x202, 0x210, 0x301, 0x302, 0x405}
)
_ULONG_TYPES: Final = frozenset(
    {0x0, 0x80, 0x87, 0x88, 0x100, 0x121, 0x133, 0x134, 0x160, 0x161, 0x166, 0x201}
    | {0x300, 0x400, 0x401, 0x402, 0x403, 0x404, 0x406, 0x500}
)
_DATE_TYPES: Final = frozenset({0x110, 0x111})
_MECHANISM_ARRAY_TYPES: Final = frozenset({0x40000600})
_TEMPLATE_TYPES: Final = frozenset({0x40000211, 0x40000212})


class Reader:
    """The fields of one message body, in order."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._at = 0

    def _take(self, n: int) -> bytes:
        if n < 0 or self._at + n > len(self._data):
            raise FrameError("the message ends inside a field")
        chunk = bytes(self._data[self._at : self._at + n])
        self._at += n
        return chunk

    def u32(self) -> int:
        value: int = struct.unpack(">I", self._take(4))[0]
        return value

    def ulong(self) -> int:
        value: int = struct.unpack(">Q", self._take(8))[0]
        return value

    def byte(self) -> int:
        return self._take(1)[0]

    def _array(self) -> bytes | None:
        """p11-kit's inner byte array: a length (NULL_LENGTH for NULL) and bytes."""
        length = self.u32()
        if length == NULL_LENGTH:
            return None
        if length >= 0x7FFFFFFF:
            raise FrameError("byte array too long")
        return self._take(length)

    def byte_array(self) -> tuple[bytes | None, int]:
        """``ay``: (the bytes, or None when only a length was sent; the length)."""
        present = self.byte()
        length = self.u32()
        if not present:
            return None, length
        return self._take(length), length

    def buffer(self) -> int:
        """``fy``/``fu``: the room the application offers (0: it asks the size)."""
        return self.u32()

    def signature(self) -> bytes:
        data = self._array()
        if data is None:
            raise FrameError("no signature string")
        return data

    def template(self) -> dict[int, AttributeValue | None]:
        """``aA``: attributes with values (a search template)."""
        found: dict[int, AttributeValue | None] = {}
        for _ in range(self._count()):
            kind = self.u32()
            if not self.byte():
                found[kind] = None
                continue
            self.u32()  # the application's ulValueLen; the value says its own size
            found[kind] = self._value(kind)
        return found

    def attribute_buffers(self) -> list[tuple[int, int]]:
        """``fA``: (attribute type, room for its value; 0 asks the size)."""
        return [(self.u32(), self.u32()) for _ in range(self._count())]

    def mechanism(self) -> tuple[int, PssParams | None]:
        """``M``: the mechanism type and, for CKM_RSA_PKCS_PSS, its parameters
        (p11-kit sends no other parameter the agent uses)."""
        kind = self.u32()
        if kind == CKM.RSA_PKCS_PSS:
            return kind, PssParams(self.ulong(), self.ulong(), self.ulong())
        if kind == 0x9:  # CKM_RSA_PKCS_OAEP: three ulongs and a source array
            self.ulong(), self.ulong(), self.ulong()
            self._array()
            return kind, None
        self._array()
        return kind, None

    def _count(self) -> int:
        count = self.u32()
        if count > 4096:
            raise FrameError(f"{count} attributes in one template")
        return count

    def _value(self, kind: int) -> AttributeValue | None:
        if kind in _BYTE_TYPES:
            return self.byte() != 0
        if kind in _ULONG_TYPES:
            return self.ulong()
        if kind in _MECHANISM_ARRAY_TYPES:
            return tuple(self.ulong() for _ in range(self._count()))
        if kind in _TEMPLATE_TYPES:
            self.template()
            return None  # nested templates match nothing here
        return self._array()


class Writer:
    """A message body, field by field."""

    def __init__(self, call: int, signature: bytes) -> None:
        self._parts: list[bytes] = [struct.pack(">II", call, len(signature)), signature]

    def u32(self, value: int) -> Writer:
        self._parts.append(struct.pack(">I", value))
        return self

    def ulong(self, value: int) -> Writer:
        self._parts.append(struct.pack(">Q", value))
        return self

    def byte(self, value: int) -> Writer:
        self._parts.append(bytes((value,)))
        return self

    def version(self, version: tuple[int, int]) -> Writer:
        self._parts.append(bytes(version))
        return self

    def padded(self, text: str, width: int) -> Writer:
        """``s``: a fixed-width field padded with spaces (CK_UTF8CHAR[width])."""
        raw = text.encode()[:width]
        while raw and len(raw.decode("utf-8", "ignore").encode()) != len(raw):
            raw = raw[:-1]  # never cut a UTF-8 sequence in half
        return self.u32(width)._raw(raw.ljust(width, b" "))

    def byte_array(self, data: bytes | None, length: int) -> Writer:
        """``ay``: the bytes, or only their length (the application asked the size,
        or offered too little room)."""
        if data is None:
            return self.byte(0).u32(length)
        return self.byte(1).u32(len(data))._raw(data)

    def ulong_array(self, values: Sequence[int] | None, count: int) -> Writer:
        """``au``: the values, or only how many there are."""
        if values is None:
            return self.byte(0).u32(count)
        self.byte(1).u32(len(values))
        for value in values:
            self.ulong(value)
        return self

    def attributes(self, entries: Iterable[tuple[int, AttributeValue | None, bool]]) -> Writer:
        """``aA`` of a C_GetAttributeValue answer: per (type, value, with_value),
        the value (or, without, only its length: a size query); None is an
        attribute with no answer (unavailable, sensitive or too long)."""
        listed = list(entries)
        self.u32(len(listed))
        for kind, value, with_value in listed:
            self.u32(kind)
            if value is None:
                self.byte(0)
                continue
            self.byte(1).u32(native_length(value))
            self._value(kind, value if with_value else None)
        return self

    def _value(self, kind: int, value: AttributeValue | None) -> None:
        if kind in _BYTE_TYPES:
            self.byte(1 if value else 0)
        elif kind in _ULONG_TYPES:
            self.ulong(value if isinstance(value, int) else 0)
        elif kind in _MECHANISM_ARRAY_TYPES:
            # A size query gets a count of 0: p11-kit 0.24 would otherwise expect
            # elements that a length-only answer does not carry.
            values = value if isinstance(value, tuple) else ()
            self.u32(len(values))
            for v in values:
                self.ulong(v)
        elif isinstance(value, bytes) and value:
            self.u32(len(value))._raw(value)
        else:
            self.u32(NULL_LENGTH)  # a size query, or an empty value (an unset date)

    def _raw(self, data: bytes) -> Writer:
        self._parts.append(data)
        return self

    def body(self) -> bytes:
        return b"".join(self._parts)


def native_length(value: AttributeValue) -> int:
    """The attribute's ``ulValueLen`` in the application: CK_BBOOL 1, CK_ULONG 8."""
    if isinstance(value, bool):
        return 1
    if isinstance(value, int):
        return 8
    if isinstance(value, tuple):
        return 8 * len(value)
    return len(value)


def error_body(rv: int) -> bytes:
    """The answer to a call that failed: call id 0, one ulong, the CK_RV."""
    return Writer(Call.ERROR, b"u").ulong(rv).body()


def frame(code: int, body: bytes) -> bytes:
    """A reply frame: the request's code, no options, the body."""
    return HEADER.pack(code, 0, len(body)) + body
