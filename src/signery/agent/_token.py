"""The PKCS#11 token the agent serves: one slot, the account's usable keys.

:class:`Token` is shared by every connection: the key list (cached for
``cache_seconds``, fetched again when stale or after a signing refusal that
says the key changed) and the way to the server. :class:`Application` is one
connected process's view, as PKCS#11 defines it: initialized or not, its
sessions, its searches and its signing operations. Each method is one PKCS#11
call; a refusal is a :class:`Pkcs11Error` with the return value the spec names.

No login is needed (the agent logged in as the account already): the token
says so (no ``CKF_LOGIN_REQUIRED``), and C_Login with any PIN succeeds, for the
tools that log in anyway.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

from signery import __version__
from signery import protocol as p
from signery.agent._mechanisms import (
    EC_MECHANISMS,
    RSA_MECHANISMS,
    PssParams,
    SignOperation,
    signature_length,
    start,
)
from signery.agent._objects import SENSITIVE, AttributeValue, HandleBook, KeyEntry, TokenObject
from signery.agent._objects import token_objects as _token_objects
from signery.agent._pkcs11 import (
    CKA,
    CKO,
    CKR,
    CKS,
    CKU,
    EFFECTIVELY_INFINITE,
    UNAVAILABLE_INFORMATION,
    MechanismFlag,
    Pkcs11Error,
    SessionFlag,
    SlotFlag,
    TokenFlag,
)
from signery.crypto import Hashed

log = logging.getLogger("signery.agent")

SLOT_ID: Final = 1
MANUFACTURER: Final = "Signery"
MODEL: Final = "signery-agent"
CRYPTOKI_VERSION: Final = (2, 40)
# How many objects one C_FindObjects answers at most, whatever the tool asks.
FIND_MAX: Final = 1024
_VERSION: Final = (int(__version__.split(".")[0]), int([*__version__.split("."), "0"][1]))


Version = tuple[int, int]


@dataclass(frozen=True, slots=True)
class LibraryInfo:
    """CK_INFO (text fields are padded to their widths on the wire)."""

    cryptoki_version: Version
    manufacturer: str
    description: str
    library_version: Version


@dataclass(frozen=True, slots=True)
class SlotInfo:
    """CK_SLOT_INFO."""

    description: str
    manufacturer: str
    flags: int
    hardware_version: Version
    firmware_version: Version


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """CK_TOKEN_INFO; ``counts`` are its eleven CK_ULONGs in the struct's order
    (flags, session counts, PIN lengths, memory)."""

    label: str
    manufacturer: str
    model: str
    serial: str
    counts: tuple[int, ...]
    hardware_version: Version
    firmware_version: Version
    utc_time: str


class RemoteSigning(Protocol):
    """What the token needs of the server: the key list and a signature."""

    def keys(self) -> list[p.SigningKeySummary]:
        """The account's keys; a Pkcs11Error when the server cannot say."""

    def sign(
        self, key: KeyEntry, hashed: Hashed, scheme: p.SignatureScheme, caller: p.ClientInfo | None
    ) -> bytes:
        """The signature (DER for ECDSA), or a Pkcs11Error saying why not;
        ``caller`` is recorded with it (the calling process)."""


class Token:
    """The account's keys as token objects, cached for ``cache_seconds``."""

    def __init__(
        self,
        *,
        remote: RemoteSigning,
        label: str,
        serial: str,
        cache_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.remote = remote
        self.label = label
        self.serial = serial
        self._cache_seconds = cache_seconds
        self._clock = clock
        self._book = HandleBook()
        self._objects: list[TokenObject] = []
        self._fetched: float | None = None
        self._lock = threading.Lock()

    def objects(self) -> list[TokenObject]:
        """The current objects; the key list is fetched again once stale. A
        server that cannot be reached leaves the last list in place for a tool
        that already holds handles, and says so in the log."""
        with self._lock:
            now = self._clock()
            if self._fetched is None or now - self._fetched >= self._cache_seconds:
                try:
                    keys = self.remote.keys()
                except Pkcs11Error:
                    if self._fetched is None:
                        raise
                    log.warning("could not refresh the key list; using the one from before")
                else:
                    self._objects = _token_objects(keys, self._book)
                    self._fetched = now
            return list(self._objects)

    def invalidate(self) -> None:
        """Fetch the key list at the next call (a key was refused or changed)."""
        with self._lock:
            self._fetched = None

    def object(self, handle: int) -> TokenObject:
        for found in self.objects():
            if found.handle == handle:
                return found
        raise Pkcs11Error(CKR.OBJECT_HANDLE_INVALID, f"no object {handle} (any more)")


@dataclass
class Session:
    handle: int
    flags: int
    found: list[int] | None = None  # an active C_FindObjects search
    signing: SignOperation | None = None
    signing_key: KeyEntry | None = None


@dataclass
class Application:
    """One connected process: the PKCS#11 state the spec keeps per application."""

    token: Token
    caller: p.ClientInfo | None = None  # what the server records as the calling process
    initialized: bool = False
    logged_in: bool = False
    sessions: dict[int, Session] = field(default_factory=dict)
    _next_session: int = 1

    # ------------------------------------------------------------ general

    def initialize(self) -> None:
        if self.initialized:
            raise Pkcs11Error(CKR.CRYPTOKI_ALREADY_INITIALIZED)
        self.initialized = True

    def finalize(self) -> None:
        self._ready()
        self.sessions.clear()
        self.logged_in = False
        self.initialized = False

    def info(self) -> LibraryInfo:
        self._ready()
        return LibraryInfo(CRYPTOKI_VERSION, MANUFACTURER, "Signery remote signing", _VERSION)

    def slot_list(self) -> list[int]:
        self._ready()
        return [SLOT_ID]

    def slot_info(self, slot: int) -> SlotInfo:
        self._slot(slot)
        return SlotInfo(
            f"Signery account {self.token.label}",
            MANUFACTURER,
            int(SlotFlag.TOKEN_PRESENT),
            (1, 0),
            _VERSION,
        )

    def token_info(self, slot: int) -> TokenInfo:
        self._slot(slot)
        flags = (
            TokenFlag.TOKEN_INITIALIZED | TokenFlag.USER_PIN_INITIALIZED | TokenFlag.WRITE_PROTECTED
        )
        rw = sum(1 for s in self.sessions.values() if s.flags & SessionFlag.RW_SESSION)
        counts = (
            int(flags),
            EFFECTIVELY_INFINITE,  # max sessions
            len(self.sessions),
            EFFECTIVELY_INFINITE,  # max read-write sessions
            rw,
            255,  # max PIN length
            0,  # min PIN length
            *(UNAVAILABLE_INFORMATION,) * 4,  # public and private memory, total and free
        )
        return TokenInfo(
            self.token.label, MANUFACTURER, MODEL, self.token.serial, counts, (1, 0), _VERSION, ""
        )

    def mechanism_list(self, slot: int) -> list[int]:
        self._slot(slot)
        return [int(m) for m in RSA_MECHANISMS + EC_MECHANISMS]

    def mechanism_info(self, slot: int, mechanism: int) -> tuple[int, int, int]:
        """(min key size, max key size, flags)."""
        self._slot(slot)
        if mechanism in RSA_MECHANISMS:
            return 2048, 4096, int(MechanismFlag.SIGN)
        if mechanism in EC_MECHANISMS:
            flags = (
                MechanismFlag.SIGN
                | MechanismFlag.EC_F_P
                | MechanismFlag.EC_NAMEDCURVE
                | MechanismFlag.EC_UNCOMPRESS
            )
            return 256, 521, int(flags)
        raise Pkcs11Error(CKR.MECHANISM_INVALID, f"mechanism 0x{mechanism:x} is not offered")

    # ------------------------------------------------------------ sessions

    def open_session(self, slot: int, flags: int) -> int:
        self._slot(slot)
        if not flags & SessionFlag.SERIAL_SESSION:
            raise Pkcs11Error(CKR.SESSION_PARALLEL_NOT_SUPPORTED)
        handle = self._next_session
        self._next_session += 1
        self.sessions[handle] = Session(handle, flags)
        return handle

    def close_session(self, handle: int) -> None:
        self._session(handle)
        del self.sessions[handle]
        if not self.sessions:
            self.logged_in = False  # PKCS#11 §5.6: closing the last session logs out

    def close_all_sessions(self, slot: int) -> None:
        self._slot(slot)
        self.sessions.clear()
        self.logged_in = False

    def session_info(self, handle: int) -> tuple[int, int, int, int]:
        """(slot, state, flags, device error)."""
        session = self._session(handle)
        rw = bool(session.flags & SessionFlag.RW_SESSION)
        if self.logged_in:
            state = CKS.RW_USER_FUNCTIONS if rw else CKS.RO_USER_FUNCTIONS
        else:
            state = CKS.RW_PUBLIC_SESSION if rw else CKS.RO_PUBLIC_SESSION
        return SLOT_ID, int(state), session.flags, 0

    def login(self, handle: int, user_type: int) -> None:
        """Any PIN: the agent is logged in as its account already."""
        self._session(handle)
        if user_type == CKU.SO:
            raise Pkcs11Error(CKR.USER_TYPE_INVALID, "this token has no security officer")
        if user_type == CKU.USER and self.logged_in:
            raise Pkcs11Error(CKR.USER_ALREADY_LOGGED_IN)
        if user_type not in (CKU.USER, CKU.CONTEXT_SPECIFIC):
            raise Pkcs11Error(CKR.USER_TYPE_INVALID)
        self.logged_in = True

    def logout(self, handle: int) -> None:
        self._session(handle)
        if not self.logged_in:
            raise Pkcs11Error(CKR.USER_NOT_LOGGED_IN)
        self.logged_in = False

    # ------------------------------------------------------------ objects

    def find_objects_init(self, handle: int, template: Mapping[int, AttributeValue | None]) -> None:
        session = self._session(handle)
        if session.found is not None:
            raise Pkcs11Error(CKR.OPERATION_ACTIVE)
        session.found = [o.handle for o in self.token.objects() if o.matches(template)]

    def find_objects(self, handle: int, most: int) -> list[int]:
        session = self._session(handle)
        if session.found is None:
            raise Pkcs11Error(CKR.OPERATION_NOT_INITIALIZED)
        count = max(0, min(most, FIND_MAX))
        answer, session.found = session.found[:count], session.found[count:]
        return answer

    def find_objects_final(self, handle: int) -> None:
        session = self._session(handle)
        if session.found is None:
            raise Pkcs11Error(CKR.OPERATION_NOT_INITIALIZED)
        session.found = None

    def attribute_values(
        self, handle: int, obj: int, kinds: Sequence[int]
    ) -> tuple[CKR, list[AttributeValue | CKR | None]]:
        """C_GetAttributeValue: per attribute its value, or why not. Every
        attribute is answered; the call's return value names a refusal
        (PKCS#11 §5.7 lets it name any): a sensitive one before an unknown one,
        as SoftHSM does."""
        self._session(handle)
        found = self.token.object(obj)
        rv = CKR.OK
        values: list[AttributeValue | CKR | None] = []
        for kind in kinds:
            if found.object_class == CKO.PRIVATE_KEY and kind in SENSITIVE:
                values.append(CKR.ATTRIBUTE_SENSITIVE)
                rv = CKR.ATTRIBUTE_SENSITIVE
            elif kind in found.attributes:
                values.append(found.attributes[kind])
            else:
                values.append(CKR.ATTRIBUTE_TYPE_INVALID)
                if rv is CKR.OK:
                    rv = CKR.ATTRIBUTE_TYPE_INVALID
        return rv, values

    # ------------------------------------------------------------ signing

    def sign_init(self, handle: int, mechanism: int, pss: PssParams | None, key: int) -> None:
        session = self._session(handle)
        if session.signing is not None:
            raise Pkcs11Error(CKR.OPERATION_ACTIVE)
        try:
            found = self.token.object(key)
        except Pkcs11Error:
            raise Pkcs11Error(CKR.KEY_HANDLE_INVALID, f"no key {key} (any more)") from None
        if found.key is None or found.attributes.get(CKA.SIGN) is not True:
            raise Pkcs11Error(CKR.KEY_FUNCTION_NOT_PERMITTED, f"object {key} does not sign")
        session.signing = start(mechanism, found.key.algorithm, pss)
        session.signing_key = found.key

    def sign_length(self, handle: int) -> int:
        """The signature's length, for a tool that asks before signing (the
        operation stays active, PKCS#11 §5.2)."""
        session = self._session(handle)
        if session.signing is None:
            raise Pkcs11Error(CKR.OPERATION_NOT_INITIALIZED)
        return signature_length(session.signing.algorithm)

    def sign_update(self, handle: int, data: bytes) -> None:
        session = self._session(handle)
        if session.signing is None:
            raise Pkcs11Error(CKR.OPERATION_NOT_INITIALIZED)
        try:
            session.signing.update(data)
        except Pkcs11Error:
            self._end_signing(session)
            raise

    def take_signing(self, handle: int, data: bytes | None) -> tuple[SignOperation, KeyEntry]:
        """C_Sign (with ``data``) or C_SignFinal: the operation ends here, whatever
        the server answers (PKCS#11 §5.12), and the caller sends it."""
        session = self._session(handle)
        operation, key = session.signing, session.signing_key
        if operation is None or key is None:
            raise Pkcs11Error(CKR.OPERATION_NOT_INITIALIZED)
        self._end_signing(session)
        if data is not None:
            operation.update(data)
        return operation, key

    def sign_remote(self, operation: SignOperation, key: KeyEntry) -> bytes:
        """Send the digest (blocking: run it off the event loop)."""
        hashed, scheme = operation.request()
        try:
            signature = self.token.remote.sign(key, hashed, scheme, self.caller)
        except Pkcs11Error as e:
            if e.rv in (CKR.KEY_HANDLE_INVALID, CKR.KEY_FUNCTION_NOT_PERMITTED):
                self.token.invalidate()
            raise
        return operation.result(signature)

    # ------------------------------------------------------------ checks

    def _end_signing(self, session: Session) -> None:
        session.signing = None
        session.signing_key = None

    def _ready(self) -> None:
        if not self.initialized:
            raise Pkcs11Error(CKR.CRYPTOKI_NOT_INITIALIZED)

    def _slot(self, slot: int) -> None:
        self._ready()
        if slot != SLOT_ID:
            raise Pkcs11Error(CKR.SLOT_ID_INVALID, f"no slot {slot}")

    def _session(self, handle: int) -> Session:
        self._ready()
        session = self.sessions.get(handle)
        if session is None:
            raise Pkcs11Error(CKR.SESSION_HANDLE_INVALID, f"no session {handle}")
        return session
