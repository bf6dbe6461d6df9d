"""The PKCS#11 numbers the agent speaks (OASIS PKCS#11 v2.40 base specification,
``pkcs11t.h``): only those it answers with or reads, each under its spec name."""

from __future__ import annotations

from enum import IntEnum, IntFlag
from typing import Final

UNAVAILABLE_INFORMATION: Final = 0xFFFFFFFFFFFFFFFF  # CK_UNAVAILABLE_INFORMATION (~0UL)
EFFECTIVELY_INFINITE: Final = 0  # CK_EFFECTIVELY_INFINITE


class CKR(IntEnum):
    """Return values (§3.6 of pkcs11t.h)."""

    OK = 0x0
    SLOT_ID_INVALID = 0x3
    GENERAL_ERROR = 0x5
    ATTRIBUTE_SENSITIVE = 0x11
    ATTRIBUTE_TYPE_INVALID = 0x12
    DATA_INVALID = 0x20
    DATA_LEN_RANGE = 0x21
    DEVICE_ERROR = 0x30
    FUNCTION_CANCELED = 0x50
    FUNCTION_NOT_SUPPORTED = 0x54
    KEY_HANDLE_INVALID = 0x60
    KEY_TYPE_INCONSISTENT = 0x63
    KEY_FUNCTION_NOT_PERMITTED = 0x68
    MECHANISM_INVALID = 0x70
    MECHANISM_PARAM_INVALID = 0x71
    OBJECT_HANDLE_INVALID = 0x82
    OPERATION_ACTIVE = 0x90
    OPERATION_NOT_INITIALIZED = 0x91
    SESSION_HANDLE_INVALID = 0xB3
    SESSION_PARALLEL_NOT_SUPPORTED = 0xB4
    USER_ALREADY_LOGGED_IN = 0x100
    USER_NOT_LOGGED_IN = 0x101
    USER_TYPE_INVALID = 0x103
    BUFFER_TOO_SMALL = 0x150
    CRYPTOKI_NOT_INITIALIZED = 0x190
    CRYPTOKI_ALREADY_INITIALIZED = 0x191
    FUNCTION_REJECTED = 0x200


class CKO(IntEnum):
    CERTIFICATE = 0x1
    PUBLIC_KEY = 0x2
    PRIVATE_KEY = 0x3


class CKK(IntEnum):
    RSA = 0x0
    EC = 0x3


CKC_X_509: Final = 0x0
CK_CERTIFICATE_CATEGORY_TOKEN_USER: Final = 1
CK_CERTIFICATE_CATEGORY_AUTHORITY: Final = 2


class CKA(IntEnum):
    CLASS = 0x0
    TOKEN = 0x1
    PRIVATE = 0x2
    LABEL = 0x3
    VALUE = 0x11
    CERTIFICATE_TYPE = 0x80
    ISSUER = 0x81
    SERIAL_NUMBER = 0x82
    TRUSTED = 0x86
    CERTIFICATE_CATEGORY = 0x87
    KEY_TYPE = 0x100
    SUBJECT = 0x101
    ID = 0x102
    SENSITIVE = 0x103
    ENCRYPT = 0x104
    DECRYPT = 0x105
    WRAP = 0x106
    UNWRAP = 0x107
    SIGN = 0x108
    SIGN_RECOVER = 0x109
    VERIFY = 0x10A
    VERIFY_RECOVER = 0x10B
    DERIVE = 0x10C
    START_DATE = 0x110
    END_DATE = 0x111
    MODULUS = 0x120
    MODULUS_BITS = 0x121
    PUBLIC_EXPONENT = 0x122
    PUBLIC_KEY_INFO = 0x129
    EXTRACTABLE = 0x162
    LOCAL = 0x163
    NEVER_EXTRACTABLE = 0x164
    ALWAYS_SENSITIVE = 0x165
    MODIFIABLE = 0x170
    COPYABLE = 0x171
    DESTROYABLE = 0x172
    EC_PARAMS = 0x180
    EC_POINT = 0x181
    ALWAYS_AUTHENTICATE = 0x202


class CKM(IntEnum):
    RSA_PKCS = 0x1
    RSA_PKCS_PSS = 0xD
    SHA256_RSA_PKCS = 0x40
    SHA384_RSA_PKCS = 0x41
    SHA512_RSA_PKCS = 0x42
    SHA256 = 0x250
    SHA384 = 0x260
    SHA512 = 0x270
    ECDSA = 0x1041


class CKG(IntEnum):
    """Mask generation functions (CK_RSA_PKCS_MGF_TYPE)."""

    MGF1_SHA256 = 0x2
    MGF1_SHA384 = 0x3
    MGF1_SHA512 = 0x4


class CKU(IntEnum):
    SO = 0
    USER = 1
    CONTEXT_SPECIFIC = 2


class CKS(IntEnum):
    RO_PUBLIC_SESSION = 0
    RO_USER_FUNCTIONS = 1
    RW_PUBLIC_SESSION = 2
    RW_USER_FUNCTIONS = 3


class SlotFlag(IntFlag):
    TOKEN_PRESENT = 0x1


class TokenFlag(IntFlag):
    WRITE_PROTECTED = 0x2
    USER_PIN_INITIALIZED = 0x8
    TOKEN_INITIALIZED = 0x400


class SessionFlag(IntFlag):
    RW_SESSION = 0x2
    SERIAL_SESSION = 0x4


class MechanismFlag(IntFlag):
    SIGN = 0x800
    EC_F_P = 0x100000
    EC_NAMEDCURVE = 0x800000
    EC_UNCOMPRESS = 0x1000000


class Pkcs11Error(Exception):
    """A PKCS#11 call's answer other than CKR_OK, with a line for the agent's log."""

    def __init__(self, rv: CKR, message: str = "") -> None:
        super().__init__(message or rv.name)
        self.rv = rv
