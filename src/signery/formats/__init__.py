"""Signature formats, by name. Each writes a real format from a remote signature.

A format hashes the file locally, asks a :class:`Signer` (``signery.client.RemoteSigner``
for a key held by a Signery server) for the signature of that digest, and writes
the format; ``verify`` checks one offline against public keys. The errors are
the ones a caller may want to tell apart (each carries a stable ``code``)."""

from signery.errors import ClientError
from signery.formats._authenticode import (
    AuthenticodeFormat,
    AuthenticodeSignatureRequired,
    CorruptCertificateTable,
    NotPortableExecutable,
    TruncatedPortableExecutable,
)
from signery.formats._base import (
    SignatureFormat,
    Signer,
    SignOptions,
    SignResult,
    Timestamper,
    VerifyResult,
    write_atomically,
)
from signery.formats._cms import CmsFormat, NotACmsSignature, OutputIsInput
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
    export_public_key,
)
from signery.formats._raw import RawFormat
from signery.formats._signeddata import (
    CertificateRequired,
    FormatSchemeUnsupported,
    KeyChangedWhileSigning,
)

FORMATS: dict[str, SignatureFormat] = {
    f.name: f
    for f in (RawFormat(), CmsFormat(), AuthenticodeFormat(), JarFormat(), OpenPgpFormat())
}


class UnknownFormat(ClientError):
    code = "unknown_format"
    title = "Unknown signature format"


def get_format(name: str) -> SignatureFormat:
    """The format called ``name`` (a key of :data:`FORMATS`)."""
    try:
        return FORMATS[name]
    except KeyError:
        raise UnknownFormat(f"format must be one of: {', '.join(sorted(FORMATS))}") from None


__all__ = [
    "FORMATS",
    "AuthenticodeFormat",
    "AuthenticodeSignatureRequired",
    "CertificateRequired",
    "CmsFormat",
    "CorruptCertificateTable",
    "CorruptJar",
    "FormatSchemeUnsupported",
    "InvalidManifest",
    "JarFormat",
    "KeyChangedWhileSigning",
    "NotACmsSignature",
    "NotAJar",
    "NotPortableExecutable",
    "OpenPgpFormat",
    "OpenPgpInvalidUserId",
    "OpenPgpKey",
    "OpenPgpKeyChanged",
    "OpenPgpKeyTimeUnknown",
    "OpenPgpKeyUnsupported",
    "OpenPgpMalformed",
    "OpenPgpPublicKey",
    "OpenPgpTimestampUnsupported",
    "OutputIsInput",
    "RawFormat",
    "SignOptions",
    "SignResult",
    "SignatureFormat",
    "Signer",
    "Timestamper",
    "TruncatedPortableExecutable",
    "UnknownFormat",
    "VerifyResult",
    "export_public_key",
    "get_format",
    "write_atomically",
]
