"""PKCS#11 key store: key pairs generated and used inside a token (an HSM, a
smart card, SoftHSM2), through python-pkcs11.

Private keys are generated on the token as persistent, sensitive,
non-extractable objects and are only ever referred to by their ``CKA_ID``; the
store signs digests with the raw mechanisms (``CKM_RSA_PKCS`` over a DER
DigestInfo, ``CKM_RSA_PKCS_PSS``, ``CKM_ECDSA``), so the hash is computed by the
caller, as with every other store.

Two details of PKCS#11 shape this module:

* **Threads.** python-pkcs11 initialises the library with ``C_Initialize(NULL)``,
  which tells it the application will *not* call it from several threads at once
  (PKCS#11 v2.40 base §5.4; usage guide §2.5.3), yet releases the GIL during
  every call. SoftHSM2 then turns its own locks off. This module therefore
  initialises the library itself with ``CKF_OS_LOCKING_OK`` (see
  :class:`_Module`); when it cannot, every call into that library is serialised
  by one lock instead. Each session is used by one thread at a time (the pool).
* **Login is per application, not per session** (PKCS#11 v2.40 base §5.6,
  ``C_Login``/``C_CloseSession``): one ``C_Login`` puts every session of the
  process into the user state, closing the last session logs out. The pool
  logs in once, through ``C_Login`` on a session handle (python-pkcs11 never sees
  the PIN, and never calls ``C_Logout`` behind our back).

Foreign exceptions are translated here; error messages carry PKCS#11 error
names, never a PIN.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import queue
import secrets
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, Final, TypeVar, cast

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from pkcs11 import (
    MGF,
    Attribute,
    KeyType,
    Mechanism,
    MechanismFlag,
    ObjectClass,
    TokenFlag,
)
from pkcs11 import _pkcs11 as native
from pkcs11 import exceptions as p11
from pkcs11.types import Object, Session, SignMixin, Token
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

from signery.crypto import Hashed, PublicKey, algorithm_of_public_key
from signery.errors import (
    ConfigurationError,
    KeyMaterialMissing,
    KeyStoreError,
    KeyStoreUnavailable,
    SigneryError,
    UnsupportedAlgorithm,
)
from signery.keystores._base import (
    DestroyableKeyStore,
    GeneratedKey,
    HealthCheckedKeyStore,
    KeyContext,
    KeyHandle,
    KeyStore,
    StoreHealth,
)
from signery.keystores._files import read_secret_file
from signery.keystores._settings import Pkcs11Settings
from signery.protocol import Algorithm, DigestAlgorithm, SignatureScheme

log = logging.getLogger("signery.keystores.pkcs11")

T = TypeVar("T")

STORE_NAME: Final = "pkcs11"
# CKA_ID of a key pair: 16 random bytes (the handle's ref is their hex). Random
# rather than derived from the key id, so a ref reveals nothing and two servers
# sharing a token never collide.
CKA_ID_BYTES: Final = 16
# PKCS#11 sets no limit on CKA_LABEL; tools and some tokens truncate long ones.
LABEL_MAX_BYTES: Final = 128
LABEL_PREFIX: Final = "signery"
# How long a caller waits for a free session before the token counts as busy.
SESSION_WAIT_SECONDS: Final = 30.0
HEALTH_WAIT_SECONDS: Final = 2.0
# Objects of one class erased per destroy; a pair has one of each.
DESTROY_LIMIT: Final = 16
# Private-key objects remembered per session (see _PooledSession).
KEY_CACHE_SIZE: Final = 1024
KEY_CACHE_SECONDS: Final = 300.0
# Public exponent 65537: FIPS 186-5 §A.1.1 and what every verifier expects.
RSA_PUBLIC_EXPONENT: Final = b"\x01\x00\x01"

_RSA_BITS: Final = {Algorithm.RSA_2048: 2048, Algorithm.RSA_3072: 3072, Algorithm.RSA_4096: 4096}
_CURVES: Final = {
    Algorithm.EC_P256: "secp256r1",
    Algorithm.EC_P384: "secp384r1",
    Algorithm.EC_P521: "secp521r1",
}
# Length in bytes of the curve order n (nLen), which is the length of r and of s.
_EC_ORDER_BYTES: Final = {Algorithm.EC_P256: 32, Algorithm.EC_P384: 48, Algorithm.EC_P521: 66}

# RFC 8017 §9.2 note 1: the DER DigestInfo prefix of each hash. CKM_RSA_PKCS only
# pads (EMSA-PKCS1-v1_5 block type 01) what it is given; the DigestInfo, which
# binds the hash algorithm into the signature, is ours to build.
_DIGEST_INFO_PREFIX: Final = {
    DigestAlgorithm.SHA256: bytes.fromhex("3031300d060960864801650304020105000420"),
    DigestAlgorithm.SHA384: bytes.fromhex("3041300d060960864801650304020205000430"),
    DigestAlgorithm.SHA512: bytes.fromhex("3051300d060960864801650304020305000440"),
}
_PSS_HASH: Final = {
    DigestAlgorithm.SHA256: (Mechanism.SHA256, MGF.SHA256),
    DigestAlgorithm.SHA384: (Mechanism.SHA384, MGF.SHA384),
    DigestAlgorithm.SHA512: (Mechanism.SHA512, MGF.SHA512),
}

# The session or its login is gone: open a new session (and log in) and retry once.
_SESSION_LOST = (p11.SessionHandleInvalid, p11.SessionClosed)
# The token or the device behind it failed: the store is unavailable, not wrong.
_DEVICE_ERRORS = (
    p11.DeviceError,
    p11.DeviceMemory,
    p11.DeviceRemoved,
    p11.TokenNotPresent,
    p11.TokenNotRecognised,
    p11.SessionCount,
    p11.HostMemory,
    p11.GeneralError,
    p11.FunctionCancelled,
)
# The object a handle names is gone (destroyed between the search and the use).
_OBJECT_GONE = (p11.NoSuchKey, p11.ObjectHandleInvalid, p11.KeyHandleInvalid)
# The token does not do what was asked (mechanism, key size, curve).
_NOT_OFFERED = (
    p11.MechanismInvalid,
    p11.MechanismParamInvalid,
    p11.KeySizeRange,
    p11.DomainParamsInvalid,
)


# ---------------------------------------------------------------- C interface
#
# The few calls python-pkcs11 does not offer, made through ctypes on the same
# loaded library: C_Initialize with arguments, C_Login without handing the PIN
# to python-pkcs11, and C_GetSessionInfo to check a session before lending it.
# Structures follow
# pkcs11t.h; on Unix they use the platform's natural alignment (pkcs11.h packs
# them to 1 byte on Windows only, which Signery does not run on).

CK_ULONG = ctypes.c_ulong
CKR_OK: Final = 0x000
CKR_CANT_LOCK: Final = 0x00A
CKR_PIN_INCORRECT: Final = 0x0A0
CKR_PIN_INVALID: Final = 0x0A1
CKR_PIN_LEN_RANGE: Final = 0x0A2
CKR_PIN_EXPIRED: Final = 0x0A3
CKR_PIN_LOCKED: Final = 0x0A4
CKR_SESSION_CLOSED: Final = 0x0B0
CKR_SESSION_HANDLE_INVALID: Final = 0x0B3
CKR_TOKEN_NOT_PRESENT: Final = 0x0E0
CKR_DEVICE_ERROR: Final = 0x030
CKR_DEVICE_REMOVED: Final = 0x032
CKR_USER_ALREADY_LOGGED_IN: Final = 0x100
CKR_USER_PIN_NOT_INITIALIZED: Final = 0x102
CKR_CRYPTOKI_ALREADY_INITIALIZED: Final = 0x191
CKF_OS_LOCKING_OK: Final = 0x002
CKU_USER: Final = 1
# CK_STATE values in which the application is logged in as the normal user.
CKS_RO_USER_FUNCTIONS: Final = 1
CKS_RW_USER_FUNCTIONS: Final = 3

_CKR_NAMES: Final = {
    CKR_CANT_LOCK: "CKR_CANT_LOCK",
    CKR_PIN_INCORRECT: "CKR_PIN_INCORRECT",
    CKR_PIN_INVALID: "CKR_PIN_INVALID",
    CKR_PIN_LEN_RANGE: "CKR_PIN_LEN_RANGE",
    CKR_PIN_EXPIRED: "CKR_PIN_EXPIRED",
    CKR_PIN_LOCKED: "CKR_PIN_LOCKED",
    CKR_SESSION_CLOSED: "CKR_SESSION_CLOSED",
    CKR_SESSION_HANDLE_INVALID: "CKR_SESSION_HANDLE_INVALID",
    CKR_TOKEN_NOT_PRESENT: "CKR_TOKEN_NOT_PRESENT",
    CKR_DEVICE_ERROR: "CKR_DEVICE_ERROR",
    CKR_DEVICE_REMOVED: "CKR_DEVICE_REMOVED",
    CKR_USER_ALREADY_LOGGED_IN: "CKR_USER_ALREADY_LOGGED_IN",
    CKR_USER_PIN_NOT_INITIALIZED: "CKR_USER_PIN_NOT_INITIALIZED",
    CKR_CRYPTOKI_ALREADY_INITIALIZED: "CKR_CRYPTOKI_ALREADY_INITIALIZED",
}


def _ckr_name(rv: int) -> str:
    return _CKR_NAMES.get(rv, f"CKR 0x{rv:08X}")


class _CkVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_ubyte), ("minor", ctypes.c_ubyte)]


class _CkInitializeArgs(ctypes.Structure):
    _fields_ = [
        ("CreateMutex", ctypes.c_void_p),
        ("DestroyMutex", ctypes.c_void_p),
        ("LockMutex", ctypes.c_void_p),
        ("UnlockMutex", ctypes.c_void_p),
        ("flags", CK_ULONG),
        ("pReserved", ctypes.c_void_p),
    ]


class _CkSessionInfo(ctypes.Structure):
    _fields_ = [
        ("slotID", CK_ULONG),
        ("state", CK_ULONG),
        ("flags", CK_ULONG),
        ("ulDeviceError", CK_ULONG),
    ]


_C_Initialize = ctypes.CFUNCTYPE(CK_ULONG, ctypes.c_void_p)
_C_GetSessionInfo = ctypes.CFUNCTYPE(CK_ULONG, CK_ULONG, ctypes.POINTER(_CkSessionInfo))
_C_Login = ctypes.CFUNCTYPE(CK_ULONG, CK_ULONG, CK_ULONG, ctypes.c_char_p, CK_ULONG)


class _CkFunctionListHead(ctypes.Structure):
    """The first entries of CK_FUNCTION_LIST, in the order of pkcs11f.h (the
    same in v2.x and in the v3.0 CK_FUNCTION_LIST_3_0)."""

    _fields_ = [
        ("version", _CkVersion),
        ("C_Initialize", _C_Initialize),
        ("C_Finalize", ctypes.c_void_p),
        ("C_GetInfo", ctypes.c_void_p),
        ("C_GetFunctionList", ctypes.c_void_p),
        ("C_GetSlotList", ctypes.c_void_p),
        ("C_GetSlotInfo", ctypes.c_void_p),
        ("C_GetTokenInfo", ctypes.c_void_p),
        ("C_GetMechanismList", ctypes.c_void_p),
        ("C_GetMechanismInfo", ctypes.c_void_p),
        ("C_InitToken", ctypes.c_void_p),
        ("C_InitPIN", ctypes.c_void_p),
        ("C_SetPIN", ctypes.c_void_p),
        ("C_OpenSession", ctypes.c_void_p),
        ("C_CloseSession", ctypes.c_void_p),
        ("C_CloseAllSessions", ctypes.c_void_p),
        ("C_GetSessionInfo", _C_GetSessionInfo),
        ("C_GetOperationState", ctypes.c_void_p),
        ("C_SetOperationState", ctypes.c_void_p),
        ("C_Login", _C_Login),
    ]


class _CkCallFailed(Exception):
    """A ctypes-level PKCS#11 call returned an error code (translated by the caller)."""

    def __init__(self, rv: int) -> None:
        self.rv = rv
        super().__init__(_ckr_name(rv))


# ---------------------------------------------------------------- the library


class _Module:
    """One loaded PKCS#11 library, shared by every store of the process.

    ``C_Initialize`` may be called once per process (PKCS#11 v2.40 base §5.4),
    so libraries are cached by path and never finalised.
    """

    _loaded: dict[str, _Module] = {}
    _loaded_lock = threading.Lock()

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            dll = ctypes.CDLL(path)
        except OSError as e:
            # dlerror() names the file and the reason (no such file, wrong ELF...).
            raise ConfigurationError(
                f"PKCS#11 module {path} cannot be loaded: {e}".rstrip()
            ) from None
        try:
            get_function_list = dll.C_GetFunctionList
        except AttributeError:
            raise ConfigurationError(
                f"{path} is not a PKCS#11 library (it has no C_GetFunctionList)"
            ) from None
        functions = ctypes.POINTER(_CkFunctionListHead)()
        rv = get_function_list(ctypes.byref(functions))
        if rv != CKR_OK or not functions:
            raise ConfigurationError(
                f"PKCS#11 module {path}: C_GetFunctionList failed ({_ckr_name(rv)})"
            )
        self._dll = dll  # keeps the library mapped while the function list is used
        self._functions = functions.contents
        self.os_locking = False
        module = self

        class _Lib(native.lib):
            # python-pkcs11's lib() calls self.initialize() once, from __init__,
            # and would pass NULL. Initialising here instead declares the truth:
            # several threads call the library at once (each on its own session).
            def initialize(self) -> None:
                module._initialize()

        try:
            self.lib: native.lib = _Lib(path)
        except p11.PKCS11Error as e:
            raise ConfigurationError(
                f"PKCS#11 module {path} failed to start: {type(e).__name__}"
            ) from e
        # Without OS locking, one lock serialises every call into the library,
        # which is what C_Initialize(NULL) promises the library.
        # Reentrant: a health check asks for the session state inside an operation.
        self._serial: AbstractContextManager[Any] = (
            nullcontext() if self.os_locking else threading.RLock()
        )

    @classmethod
    def load(cls, path: Path) -> _Module:
        """The module at ``path``, loaded and initialised once per process."""
        key = str(path.resolve())
        with cls._loaded_lock:
            module = cls._loaded.get(key)
            if module is None:
                module = cls._loaded[key] = cls(str(path))
            return module

    def _initialize(self) -> None:
        # PKCS#11 v2.40 base §5.4, case 2: flag set, no mutex functions = the
        # library uses the operating system's locks for multi-threaded access.
        args = _CkInitializeArgs(None, None, None, None, CKF_OS_LOCKING_OK, None)
        rv = self._functions.C_Initialize(ctypes.byref(args))
        if rv == CKR_OK:
            self.os_locking = True
            return
        if rv == CKR_CRYPTOKI_ALREADY_INITIALIZED:
            # Someone else in this process (another library binding) initialised
            # it, in a mode we cannot know: serialise our calls.
            log.warning(
                "PKCS#11 module already initialised by another component; "
                "calls to it are serialised",
                extra={"pkcs11_module": self.path},
            )
            return
        if rv == CKR_CANT_LOCK:
            rv = self._functions.C_Initialize(None)
            if rv == CKR_OK:
                log.warning(
                    "PKCS#11 module cannot lock for threads; calls to it are serialised",
                    extra={"pkcs11_module": self.path},
                )
                return
        raise ConfigurationError(
            f"PKCS#11 module {self.path}: C_Initialize failed ({_ckr_name(rv)})"
        )

    def serialised(self) -> AbstractContextManager[Any]:
        """Held around every call into the library (a no-op with OS locking)."""
        return self._serial

    def login(self, session: Session, pin: _Pin) -> None:
        """``C_Login(CKU_USER)`` on ``session``: logs the whole process in."""
        handle = session.handle  # type: ignore[attr-defined]
        with self.serialised():
            rv = self._functions.C_Login(handle, CKU_USER, pin.value, len(pin.value))
        if rv != CKR_OK:
            raise _CkCallFailed(rv)

    def session_state(self, session: Session) -> int:
        """``C_GetSessionInfo``: the session's CK_STATE (raises if it is gone)."""
        info = _CkSessionInfo()
        handle = session.handle  # type: ignore[attr-defined]
        with self.serialised():
            rv = self._functions.C_GetSessionInfo(handle, ctypes.byref(info))
        if rv != CKR_OK:
            raise _CkCallFailed(rv)
        return int(info.state)


# ---------------------------------------------------------------- configuration


class _Pin:
    """The user PIN, kept for logging in again; its repr shows nothing."""

    __slots__ = ("value",)

    def __init__(self, value: bytes) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "_Pin(***)"


def _read_pin(settings: Pkcs11Settings) -> _Pin:
    """The user PIN, from the settings or from a file only its owner can read."""
    if settings.pin is not None:
        pin = settings.pin.get_secret_value()
    else:
        assert settings.pin_file is not None  # Pkcs11Settings requires one of them
        # Same rule as the master key file: a secret others can read is refused.
        pin = read_secret_file(settings.pin_file, "PKCS#11 PIN file")
        # Line breaks around it are the file's, not the PIN's (spaces may be the PIN's).
        pin = pin.strip("\r\n")
    if not pin:
        raise ConfigurationError("the PKCS#11 user PIN is empty")
    return _Pin(pin.encode("utf-8"))


def _object_label(context: KeyContext) -> str:
    """``signery:<label>:<key id>:v<version>``: the key id and version are kept
    whole, the human label is cut (on a character boundary) to fit."""
    suffix = f":{context.key_id}:v{context.version}"
    name = "".join(c if c.isprintable() else "?" for c in context.label)
    budget = max(0, LABEL_MAX_BYTES - len(LABEL_PREFIX) - 1 - len(suffix.encode()))
    name = name.encode()[:budget].decode("utf-8", "ignore")
    return f"{LABEL_PREFIX}:{name}{suffix}"


def _ref_to_id(handle: KeyHandle) -> bytes:
    try:
        cka_id = bytes.fromhex(handle.ref)
    except ValueError:
        raise KeyMaterialMissing("not a pkcs11 key reference") from None
    if len(cka_id) != CKA_ID_BYTES:
        raise KeyMaterialMissing("not a pkcs11 key reference")
    return cka_id


def _key_type(algorithm: Algorithm) -> KeyType:
    return KeyType.RSA if algorithm.is_rsa else KeyType.EC


def _find(session: Session, template: dict[Attribute, Any], limit: int = 2) -> list[Object]:
    """At most ``limit`` objects matching ``template``. The search is always
    finished (C_FindObjectsFinal): a session allows one active search
    (PKCS#11 v2.40 base §5.7), and a dangling one blocks every later operation."""
    objects = cast(Generator[Object, None, None], session.get_objects(template))
    try:
        return list(itertools.islice(objects, limit))
    finally:
        objects.close()


# ---------------------------------------------------------------- sessions


class _PooledSession:
    """One slot of the pool: a session (None until opened, or after it was lost)
    and the private-key objects found through it.

    Object handles stay valid while the session and the object exist (PKCS#11
    v2.40 usage guide, "Session handles and object handles"), so a key found
    once is signed with directly, saving the search (three calls, and a network
    round trip each on a network HSM). Entries are dropped when this process
    destroys any key (``epoch``), after ``KEY_CACHE_SECONDS``, and when the
    token says the handle is invalid (another process destroyed the key).
    Signery verifies every signature against the key's recorded public key
    before returning it, so even a library that reused a stale handle could not
    hand out a wrong signature."""

    __slots__ = ("epoch", "keys", "session")

    def __init__(self) -> None:
        self.session: Session | None = None
        self.keys: dict[bytes, tuple[SignMixin, float]] = {}
        self.epoch = 0

    @property
    def live(self) -> Session:
        """The open session (the pool opens one before lending the slot)."""
        assert self.session is not None
        return self.session

    def cached_key(self, cka_id: bytes) -> SignMixin | None:
        entry = self.keys.get(cka_id)
        if entry is None or time.monotonic() - entry[1] >= KEY_CACHE_SECONDS:
            return None
        return entry[0]

    def remember(self, cka_id: bytes, key: SignMixin) -> None:
        if len(self.keys) >= KEY_CACHE_SIZE:
            self.keys.clear()
        self.keys[cka_id] = (key, time.monotonic())


class _SessionPool:
    """A fixed number of R/W sessions on one token, each lent to one thread at
    a time: a session runs one operation at a time, and concurrent calls on one
    session are undefined (PKCS#11 v2.40 usage guide, "Capabilities of
    sessions"). A lost session is replaced by a fresh one on its next borrow."""

    def __init__(self, module: _Module, token: Token, pin: _Pin, size: int) -> None:
        self._module = module
        self._token = token
        self._pin = pin
        self.label = token.label
        self.size = size
        self._idle: queue.LifoQueue[_PooledSession] = queue.LifoQueue(maxsize=size)
        self._lock = threading.Lock()
        self._closed = False
        self.epoch = 0
        # Set when the token refused the PIN at runtime: never try it again, so a
        # changed PIN does not burn the token's retry counter down to a lock.
        self.login_refused: str | None = None

    def open(self) -> None:
        """Open every session and log in; on failure nothing is left open."""
        slots = [_PooledSession() for _ in range(self.size)]
        try:
            for slot in slots:
                slot.session = self._open_session()
            assert slots[0].session is not None
            self._login(slots[0].session, at_start=True)
        except BaseException:
            for slot in slots:
                self.drop(slot)
            self._closed = True
            raise
        for slot in slots:
            self._idle.put_nowait(slot)

    def _open_session(self) -> Session:
        # R/W: generating and destroying token objects needs a R/W session.
        with self._module.serialised():
            return self._token.open(rw=True)

    def _login(self, session: Session, *, at_start: bool) -> None:
        if self.login_refused is not None:
            raise KeyStoreUnavailable(self.login_refused)
        try:
            self._module.login(session, self._pin)
        except _CkCallFailed as e:
            if e.rv == CKR_USER_ALREADY_LOGGED_IN and not at_start:
                return  # another of our sessions logged the process in meanwhile
            message = self._login_failure(e.rv)
            if at_start:
                raise ConfigurationError(message) from None
            if e.rv in (CKR_PIN_INCORRECT, CKR_PIN_LOCKED, CKR_PIN_EXPIRED):
                self.login_refused = message
            raise KeyStoreUnavailable(message) from None

    def _login_failure(self, rv: int) -> str:
        head = f"PKCS#11 login failed for token {self.label!r}"
        reasons = {
            CKR_PIN_INCORRECT: "the user PIN is incorrect",
            CKR_PIN_INVALID: "the user PIN has characters the token refuses",
            CKR_PIN_LEN_RANGE: "the user PIN is too long or too short for this token",
            CKR_PIN_EXPIRED: "the user PIN has expired; set a new one",
            CKR_PIN_LOCKED: "the user PIN is locked; the token's SO must unlock it",
            CKR_USER_PIN_NOT_INITIALIZED: "the token has no user PIN yet",
            CKR_USER_ALREADY_LOGGED_IN: (
                "this process is already logged in to it (configure one pkcs11 key store per token)"
            ),
        }
        return f"{head}: {reasons.get(rv, _ckr_name(rv))}"

    def ensure_logged_in(self, session: Session) -> None:
        """Log in again if the process lost its login (e.g. the token was reset)."""
        try:
            state = self._module.session_state(session)
        except _CkCallFailed as e:
            raise KeyStoreUnavailable(
                f"PKCS#11 token {self.label!r}: C_GetSessionInfo failed ({_ckr_name(e.rv)})"
            ) from None
        if state not in (CKS_RO_USER_FUNCTIONS, CKS_RW_USER_FUNCTIONS):
            self._login(session, at_start=False)

    def _make_ready(self, slot: _PooledSession) -> None:
        """Check the slot's session with C_GetSessionInfo (a few µs) before it is
        used: a session the token dropped while idle is replaced, and a lost login
        restored, before any operation starts on it. (python-pkcs11's search
        finaliser raises from ``__del__`` when its session is already gone.)"""
        if slot.session is not None:
            try:
                state = self._module.session_state(slot.session)
            except _CkCallFailed as e:
                log.warning(
                    "PKCS#11 session lost; opening another",
                    extra={"token": self.label, "error": _ckr_name(e.rv)},
                )
                self.drop(slot)
            else:
                if state not in (CKS_RO_USER_FUNCTIONS, CKS_RW_USER_FUNCTIONS):
                    self._login(slot.session, at_start=False)
                return
        try:
            slot.session = self._open_session()
        except p11.PKCS11Error as e:
            raise KeyStoreUnavailable(
                f"PKCS#11 token {self.label!r}: no new session ({type(e).__name__})"
            ) from e
        self.ensure_logged_in(slot.session)

    @contextmanager
    def borrow(self, wait: float = SESSION_WAIT_SECONDS) -> Iterator[_PooledSession]:
        """A session for the caller alone, given back afterwards. Its ``session``
        is open and logged in; the caller calls :meth:`drop` if the token lost it."""
        if self._closed:
            raise KeyStoreUnavailable("the pkcs11 key store is closed")
        try:
            slot = self._idle.get(timeout=wait)
        except queue.Empty:
            raise KeyStoreUnavailable(
                f"all {self.size} PKCS#11 sessions of token {self.label!r} stayed busy "
                f"for {wait:g} s"
            ) from None
        try:
            self._make_ready(slot)
            if slot.epoch != self.epoch:
                slot.keys.clear()
                slot.epoch = self.epoch
            yield slot
        finally:
            with self._lock:
                if self._closed:
                    self.drop(slot)
                else:
                    self._idle.put_nowait(slot)

    def forget_keys(self) -> None:
        """Every slot drops its cached key objects on its next borrow."""
        with self._lock:
            self.epoch += 1

    def drop(self, slot: _PooledSession) -> None:
        """Close the slot's session (if any) and forget what was found through it."""
        slot.keys.clear()
        session, slot.session = slot.session, None
        if session is None:
            return
        try:
            with self._module.serialised():
                session.close()
        except p11.PKCS11Error as e:
            # A lost session's handle is already invalid; nothing more to release.
            log.debug("PKCS#11 session close failed", extra={"error": type(e).__name__})

    def close(self) -> None:
        """Close every idle session; sessions still lent are closed on return.
        Closing the last session logs the process out (PKCS#11 v2.40 base §5.6)."""
        with self._lock:
            self._closed = True
            while True:
                try:
                    slot = self._idle.get_nowait()
                except queue.Empty:
                    break
                self.drop(slot)


# ---------------------------------------------------------------- the store


class Pkcs11KeyStore(DestroyableKeyStore, HealthCheckedKeyStore):
    """Keys generated and used inside one PKCS#11 token."""

    kind = "pkcs11"
    supported_algorithms = frozenset(Algorithm)

    def __init__(self, module: _Module, pool: _SessionPool, *, name: str = STORE_NAME) -> None:
        super().__init__(name)
        self._module = module
        self._pool = pool

    def __repr__(self) -> str:
        return (
            f"Pkcs11KeyStore(name={self.name!r}, module={self._module.path!r}, "
            f"token={self._pool.label!r}, sessions={self._pool.size})"
        )

    def signs_inline(self, algorithm: Algorithm) -> bool:
        # Every operation is a blocking call into a library (often over a network
        # to the HSM): it runs in a worker thread, never on the event loop.
        return False

    def close(self) -> None:
        self._pool.close()

    # ------------------------------------------------------------ backend hooks

    def _generate(self, algorithm: Algorithm, context: KeyContext) -> GeneratedKey:
        cka_id = secrets.token_bytes(CKA_ID_BYTES)
        label = _object_label(context)

        def generate(slot: _PooledSession) -> GeneratedKey:
            public, private = self._generate_pair(slot.live, algorithm, cka_id, label)
            try:
                self._check_private_attributes(private)
                public_key = self._read_public_key(public, algorithm)
            except BaseException:
                for obj in (private, public):
                    obj.destroy()
                raise
            return GeneratedKey(KeyHandle(self.name, cka_id.hex(), algorithm, context), public_key)

        return self._call("generating a key pair", generate)

    def _sign(self, handle: KeyHandle, hashed: Hashed, scheme: SignatureScheme) -> bytes:
        cka_id = _ref_to_id(handle)
        mechanism, data, param = self._mechanism(handle.algorithm, hashed, scheme)

        def sign(slot: _PooledSession) -> bytes:
            cached = slot.cached_key(cka_id)
            if cached is not None:
                try:
                    return cached.sign(data, mechanism=mechanism, mechanism_param=param)
                except _OBJECT_GONE:
                    # Destroyed by another process: look for it once more.
                    del slot.keys[cka_id]
            key = self._private_key(slot.live, cka_id, handle.algorithm)
            slot.remember(cka_id, key)
            return key.sign(data, mechanism=mechanism, mechanism_param=param)

        signature = self._call("signing", sign)
        if handle.algorithm.is_ec:
            return self._ecdsa_der(handle.algorithm, signature)
        return signature

    def _public_key(self, handle: KeyHandle) -> PublicKey:
        cka_id = _ref_to_id(handle)

        def read(slot: _PooledSession) -> PublicKey:
            found = _find(
                slot.live,
                {
                    Attribute.CLASS: ObjectClass.PUBLIC_KEY,
                    Attribute.KEY_TYPE: _key_type(handle.algorithm),
                    Attribute.ID: cka_id,
                },
            )
            if len(found) != 1:
                raise self._not_one(handle.ref, found)
            return self._read_public_key(found[0], handle.algorithm)

        return self._call("reading a public key", read)

    def _destroy(self, handle: KeyHandle) -> None:
        cka_id = _ref_to_id(handle)

        def destroy(slot: _PooledSession) -> None:
            # The private key first: it is the one that must not outlive the call.
            # Only key objects are touched, even if other objects share the CKA_ID.
            for object_class in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
                template = {Attribute.CLASS: object_class, Attribute.ID: cka_id}
                for obj in _find(slot.live, template, limit=DESTROY_LIMIT):
                    obj.destroy()
            slot.keys.pop(cka_id, None)

        try:
            self._call("destroying a key pair", destroy)
        finally:
            self._pool.forget_keys()

    def _health(self) -> StoreHealth:
        if self._pool.login_refused is not None:
            return StoreHealth(False, self._pool.login_refused)

        def check(slot: _PooledSession) -> StoreHealth:
            # Lending the slot asked the token for the session's state: the token
            # answers and the process is logged in.
            mode = "" if self._module.os_locking else ", calls serialised"
            return StoreHealth(
                True, f"token {self._pool.label!r}, {self._pool.size} sessions{mode}"
            )

        try:
            return self._call("checking health", check, wait=HEALTH_WAIT_SECONDS)
        except SigneryError as e:
            return StoreHealth(False, e.detail)

    # ------------------------------------------------------------ internals

    def _call(
        self,
        action: str,
        op: Callable[[_PooledSession], T],
        *,
        wait: float = SESSION_WAIT_SECONDS,
    ) -> T:
        """Run ``op`` on a borrowed session; translate PKCS#11 errors. A lost
        session or login is replaced and the operation tried once more (every
        operation here fails before it changes anything when its session is gone)."""
        for attempt in (1, 2):
            with self._pool.borrow(wait) as slot:
                try:
                    with self._module.serialised():
                        return op(slot)
                except _SESSION_LOST as e:
                    self._pool.drop(slot)
                    if attempt == 2:
                        raise self._unavailable(action, e) from e
                    log.warning(
                        "PKCS#11 session lost; opening another",
                        extra={"token": self._pool.label, "error": type(e).__name__},
                    )
                except p11.UserNotLoggedIn as e:
                    if attempt == 2:
                        raise self._unavailable(action, e) from e
                    log.warning(
                        "PKCS#11 login lost; logging in again", extra={"token": self._pool.label}
                    )
                    self._pool.ensure_logged_in(slot.live)
                except _DEVICE_ERRORS as e:
                    self._pool.drop(slot)
                    raise self._unavailable(action, e) from e
                except _OBJECT_GONE as e:
                    raise KeyMaterialMissing(
                        f"the key pair is no longer on token {self._pool.label!r}"
                    ) from e
                except _NOT_OFFERED as e:
                    raise UnsupportedAlgorithm(
                        f"token {self._pool.label!r} refused {action}: {type(e).__name__}"
                    ) from e
                except p11.PKCS11Error as e:
                    raise KeyStoreError(f"PKCS#11 {action} failed: {type(e).__name__}") from e
        raise AssertionError("unreachable")  # pragma: no cover

    def _unavailable(self, action: str, e: Exception) -> SigneryError:
        return KeyStoreUnavailable(
            f"PKCS#11 token {self._pool.label!r} is unavailable ({action}: {type(e).__name__})"
        )

    @staticmethod
    def _not_one(ref: str, found: list[Object]) -> SigneryError:
        if found:
            return KeyStoreError(f"several key objects on the token share the CKA_ID {ref}")
        return KeyMaterialMissing(f"key material {ref} is missing or was destroyed")

    def _generate_pair(
        self, session: Session, algorithm: Algorithm, cka_id: bytes, label: str
    ) -> tuple[Object, Object]:
        # PKCS#11 v2.40 base §4.4 / §4.9 (storage and private key attributes).
        # Each security attribute is spelled out, even where it is a default.
        private_template: dict[Attribute, Any] = {
            Attribute.TOKEN: True,  # persistent: survives the session
            Attribute.PRIVATE: True,  # visible only after C_Login
            Attribute.SENSITIVE: True,  # never revealed in plaintext
            Attribute.EXTRACTABLE: False,  # cannot be wrapped out, ever (one-way)
            Attribute.SIGN: True,
            Attribute.SIGN_RECOVER: False,
            Attribute.DECRYPT: False,  # a signing key does nothing else
            Attribute.UNWRAP: False,
            Attribute.DERIVE: False,
        }
        public_template: dict[Attribute, Any] = {
            Attribute.TOKEN: True,
            Attribute.PRIVATE: False,
            Attribute.VERIFY: True,
            Attribute.ENCRYPT: False,
            Attribute.WRAP: False,
        }
        key_type: KeyType
        if algorithm.is_rsa:
            key_type, mechanism = KeyType.RSA, Mechanism.RSA_PKCS_KEY_PAIR_GEN
            public_template[Attribute.PUBLIC_EXPONENT] = RSA_PUBLIC_EXPONENT
            public_template[Attribute.MODULUS_BITS] = _RSA_BITS[algorithm]
        else:
            key_type, mechanism = KeyType.EC, Mechanism.EC_KEY_PAIR_GEN
            # A named curve (RFC 5480 §2.1.1): CKA_EC_PARAMS is its DER OID.
            public_template[Attribute.EC_PARAMS] = encode_named_curve_parameters(_CURVES[algorithm])
        public, private = session.generate_keypair(
            key_type,
            _RSA_BITS.get(algorithm),
            id=cka_id,
            label=label,
            store=True,
            capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
            mechanism=mechanism,
            public_template=public_template,
            private_template=private_template,
        )
        return public, private

    def _check_private_attributes(self, private: Object) -> None:
        """Refuse a key the token created with weaker attributes than asked
        (a token must fail instead, but the cost of trusting that is the key)."""
        got = private.get_attributes(
            [Attribute.TOKEN, Attribute.SENSITIVE, Attribute.EXTRACTABLE, Attribute.PRIVATE]
        )
        expected = {
            Attribute.TOKEN: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.PRIVATE: True,
        }
        if any(bool(got.get(k)) is not v for k, v in expected.items()):
            raise KeyStoreError(
                f"token {self._pool.label!r} did not create a sensitive, non-extractable key"
            )

    def _private_key(self, session: Session, cka_id: bytes, algorithm: Algorithm) -> SignMixin:
        found = _find(
            session,
            {
                Attribute.CLASS: ObjectClass.PRIVATE_KEY,
                Attribute.KEY_TYPE: _key_type(algorithm),
                Attribute.ID: cka_id,
            },
        )
        if len(found) != 1:
            raise self._not_one(cka_id.hex(), found)
        key = found[0]
        if not isinstance(key, SignMixin):
            raise KeyStoreError(f"the private key {cka_id.hex()} is not allowed to sign")
        return key

    def _read_public_key(self, public: Object, algorithm: Algorithm) -> PublicKey:
        loaded: object
        if algorithm.is_rsa:
            values = public.get_attributes([Attribute.MODULUS, Attribute.PUBLIC_EXPONENT])
            loaded = rsa.RSAPublicNumbers(
                int.from_bytes(values[Attribute.PUBLIC_EXPONENT], "big"),
                int.from_bytes(values[Attribute.MODULUS], "big"),
            ).public_key()
        else:
            # CKA_EC_PARAMS + CKA_EC_POINT (PKCS#11 v2.40 mechanisms §2.3.3) as a
            # SubjectPublicKeyInfo.
            der = encode_ec_public_key(cast(Any, public))
            loaded = serialization.load_der_public_key(der)
        if not isinstance(loaded, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
            raise KeyStoreError("the token returned a public key of an unexpected type")
        try:
            matches = algorithm_of_public_key(loaded) is algorithm
        except UnsupportedAlgorithm:
            matches = False
        if not matches:
            raise KeyMaterialMissing(f"the key object on the token is not a {algorithm.value} key")
        return loaded

    @staticmethod
    def _mechanism(
        algorithm: Algorithm, hashed: Hashed, scheme: SignatureScheme
    ) -> tuple[Mechanism, bytes, Any]:
        """The raw mechanism, its input and its parameter for one signature."""
        if scheme is SignatureScheme.RSA_PKCS1V15:
            # PKCS#11 v2.40 mechanisms §2.1.6: CKM_RSA_PKCS signs what it is given
            # with block type 01 padding; we give it DigestInfo || digest.
            return Mechanism.RSA_PKCS, _DIGEST_INFO_PREFIX[hashed.algorithm] + hashed.digest, None
        if scheme is SignatureScheme.RSA_PSS:
            # CKM_RSA_PKCS_PSS over the digest; CK_RSA_PKCS_PSS_PARAMS: the same
            # hash for the message and MGF1, salt as long as the digest (RFC 8017
            # §9.1, what AWS KMS and signery.crypto.signature_padding use).
            hash_mechanism, mgf = _PSS_HASH[hashed.algorithm]
            return Mechanism.RSA_PKCS_PSS, hashed.digest, (hash_mechanism, mgf, len(hashed.digest))
        # CKM_ECDSA takes the hash itself. ECDSA uses its leftmost bits, as many
        # as the curve order has (FIPS 186-5 §6.4.1): for P-256 and P-384 that is
        # a whole number of bytes, so cutting here is the same computation, and
        # strict tokens refuse longer input instead of cutting it themselves.
        # (P-521's 66 bytes are longer than any digest here: nothing is cut.)
        return Mechanism.ECDSA, hashed.digest[: _EC_ORDER_BYTES[algorithm]], None

    @staticmethod
    def _ecdsa_der(algorithm: Algorithm, raw: bytes) -> bytes:
        """PKCS#11 returns r || s, each nLen bytes (mechanisms §2.3.1); X.509,
        CMS and every verifier want the DER ECDSA-Sig-Value (RFC 3279 §2.2.3)."""
        size = _EC_ORDER_BYTES[algorithm]
        if len(raw) != 2 * size:
            raise KeyStoreError(
                f"the token returned a {len(raw)}-byte ECDSA signature for {algorithm.value}"
            )
        r, s = int.from_bytes(raw[:size], "big"), int.from_bytes(raw[size:], "big")
        return encode_dss_signature(r, s)


def open_store(settings: Pkcs11Settings) -> KeyStore:
    """Load the module, find the token, log in and open the session pool.

    Every problem is one ConfigurationError naming what to fix; the PIN is read
    here and appears in no message, log line or repr."""
    if sys.platform == "win32":  # pragma: no cover - the C structures assume Unix
        raise ConfigurationError("the pkcs11 key store runs on Linux and macOS")
    path = settings.module.expanduser()
    if not path.is_absolute():
        raise ConfigurationError(f"PKCS#11 module path {path} must be absolute")
    if not path.is_file():
        raise ConfigurationError(f"PKCS#11 module {path} does not exist")
    pin = _read_pin(settings)
    module = _Module.load(path)
    token = _find_token(module, settings.token_label)
    pool = _SessionPool(module, token, pin, settings.sessions)
    try:
        pool.open()
    except p11.PKCS11Error as e:
        raise ConfigurationError(
            f"PKCS#11 token {settings.token_label!r}: {settings.sessions} sessions could not "
            f"be opened ({type(e).__name__})"
        ) from e
    log.info(
        "pkcs11 key store open",
        extra={
            "pkcs11_module": str(path),
            "token": settings.token_label,
            "sessions": settings.sessions,
            "os_locking": module.os_locking,
        },
    )
    return Pkcs11KeyStore(module, pool)


def _find_token(module: _Module, label: str) -> Token:
    try:
        with module.serialised():
            tokens = list(module.lib.get_tokens())
    except p11.PKCS11Error as e:
        raise ConfigurationError(
            f"PKCS#11 module {module.path}: the slots cannot be listed ({type(e).__name__})"
        ) from e
    matching = [t for t in tokens if t.label == label]
    if not matching:
        present = sorted({t.label for t in tokens if t.label})
        raise ConfigurationError(
            f"no PKCS#11 token labelled {label!r} in {module.path}; tokens present: "
            + (", ".join(repr(p) for p in present) or "none")
        )
    if len(matching) > 1:
        raise ConfigurationError(
            f"{len(matching)} PKCS#11 tokens are labelled {label!r}; labels must be unique"
        )
    token = matching[0]
    flags = token.flags
    if not flags & TokenFlag.TOKEN_INITIALIZED:
        raise ConfigurationError(f"PKCS#11 token {label!r} is not initialised")
    if flags & TokenFlag.USER_PIN_LOCKED:
        raise ConfigurationError(
            f"PKCS#11 login failed for token {label!r}: the user PIN is locked; "
            "the token's SO must unlock it"
        )
    if flags & TokenFlag.USER_PIN_FINAL_TRY:
        # One more wrong PIN locks the token; a server that restarts by itself
        # must not be the one to try. A successful manual login resets the count.
        raise ConfigurationError(
            f"PKCS#11 token {label!r} allows one more PIN try only; log in once by hand "
            "(pkcs11-tool --login) with the right PIN, then start the server"
        )
    return token
