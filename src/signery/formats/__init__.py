"""Signature formats, by name. Each writes a real format from a remote signature."""

from signery.errors import ClientError
from signery.formats._base import (
    SignatureFormat,
    SignOptions,
    SignResult,
    Timestamper,
    VerifyResult,
    write_atomically,
)
from signery.formats._jar import CorruptJar, InvalidManifest, JarFormat, NotAJar
from signery.formats._raw import RawFormat

FORMATS: dict[str, SignatureFormat] = {f.name: f for f in (RawFormat(), JarFormat())}


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
    "CorruptJar",
    "InvalidManifest",
    "JarFormat",
    "NotAJar",
    "RawFormat",
    "SignOptions",
    "SignResult",
    "SignatureFormat",
    "Timestamper",
    "UnknownFormat",
    "VerifyResult",
    "get_format",
    "write_atomically",
]
