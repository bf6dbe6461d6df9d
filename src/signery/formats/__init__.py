"""Signature formats, by name. Each writes a real format from a remote signature."""

from signery.errors import ClientError
from signery.formats._authenticode import AuthenticodeFormat
from signery.formats._base import (
    SignatureFormat,
    SignOptions,
    SignResult,
    Timestamper,
    VerifyResult,
    open_atomically,
    write_atomically,
)
from signery.formats._cms import CmsFormat
from signery.formats._jar import CorruptJar, InvalidManifest, JarFormat, NotAJar
from signery.formats._openpgp import (
    OpenPgpFormat,
    OpenPgpInvalidUserId,
    OpenPgpKey,
    OpenPgpKeyChanged,
    OpenPgpKeyTimeUnknown,
    OpenPgpKeyUnsupported,
    OpenPgpMalformed,
    OpenPgpPublicKey,
    OpenPgpTimestampUnsupported,
    ParsedSignature,
    export_public_key,
    parse_signature,
)
from signery.formats._raw import RawFormat

FORMATS: dict[str, SignatureFormat] = {
    f.name: f
    for f in (RawFormat(), CmsFormat(), AuthenticodeFormat(), JarFormat(), OpenPgpFormat())
}


class UnknownFormat(ClientError):
    code = "unknown_format"
    title = "Unknown signature format"


def get_format(name: str) -> SignatureFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise UnknownFormat(f"format must be one of: {', '.join(sorted(FORMATS))}") from None


__all__ = [
    "FORMATS",
    "AuthenticodeFormat",
    "CmsFormat",
    "CorruptJar",
    "InvalidManifest",
    "JarFormat",
    "NotAJar",
    "OpenPgpFormat",
    "OpenPgpInvalidUserId",
    "OpenPgpKey",
    "OpenPgpKeyChanged",
    "OpenPgpKeyTimeUnknown",
    "OpenPgpKeyUnsupported",
    "OpenPgpMalformed",
    "OpenPgpPublicKey",
    "OpenPgpTimestampUnsupported",
    "ParsedSignature",
    "RawFormat",
    "SignOptions",
    "SignResult",
    "SignatureFormat",
    "Timestamper",
    "UnknownFormat",
    "VerifyResult",
    "export_public_key",
    "get_format",
    "open_atomically",
    "parse_signature",
    "write_atomically",
]
