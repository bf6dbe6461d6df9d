"""``authenticode``: a PE32 / PE32+ file (.exe, .dll, .sys) signed in place.

The layout follows Microsoft's "Windows Authenticode Portable Executable Signature
Format" (Authenticode_PE.docx, 2008; cited below as *Authenticode PE*) and the PE
format specification (*PE/COFF*, "The Attribute Certificate Table (Image Only)"):

* the **image hash** covers the whole file in order, except the optional header's
  CheckSum field, the Certificate Table data directory entry and the certificate
  table itself, with the file zero-padded to a multiple of 8 bytes. That is the
  spec's header + sections + trailing data for every well-formed file; it is hashed
  linearly, as osslsigncode (the reference verifier here) and signtool do;
* ``SpcIndirectDataContent`` carries that hash (DigestInfo) for an
  ``SPC_PE_IMAGE_DATAOBJ`` with ``SpcPeImageData`` byte for byte as osslsigncode
  writes it (flags includeResources, file link ``<<<Obsolete>>>``);
* a SignedData version 1 with the content as ``[0] EXPLICIT SpcIndirectDataContent``
  (built by the shared ``build_signed_data``), whose signed ``messageDigest``
  covers the DER *contents* of SpcIndirectDataContent (*Authenticode PE*,
  "Authenticode-Specific Structures"); signed attributes contentType, signingTime,
  messageDigest, SpcSpOpusInfo and SpcStatementType (individual code signing), as
  osslsigncode and signtool write them (no CMS algorithm protection: RFC 6211 is
  not part of Authenticode);
* the SignedData goes into a ``WIN_CERTIFICATE`` (revision 2.0, type
  PKCS_SIGNED_DATA) padded to 8 bytes at the 8-aligned end of the file; the
  Certificate Table entry points at it (a file offset, not an RVA) and the PE
  checksum is recomputed over the result.

``--timestamp`` adds an RFC 3161 token over the SignerInfo's signature value as
the unsigned attribute 1.3.6.1.4.1.311.3.3.1 (what signtool /tr writes). Signing a
signed file replaces its signature; ``--append`` nests the new SignedData in the
first SignerInfo's unsigned attribute SPC_NESTED_SIGNATURE instead (signtool /as).

The file is read once, in chunks: it is hashed while the signed copy is written
to a temporary file beside the output, which replaces the output only when the
signature is complete. A file that is not a PE, is truncated, or has a corrupt
certificate table is refused before anything is sent to the server, and the input
is never modified.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from asn1crypto import algos, cms, core, tsp  # type: ignore[import-untyped]
from asn1crypto import parser as asn1_parser
from cryptography import x509

from signery.crypto import HASH_CHUNK, Hashed, PublicKey, hash_bytes
from signery.errors import ClientError
from signery.formats._base import Signer, SignOptions, SignResult, VerifyResult, open_atomically
from signery.formats._signeddata import (
    ID_AA_TIMESTAMP_TOKEN,
    SignedDataSpec,
    build_signed_data,
    check_signer,
    choose,
    signing_certificate,
)
from signery.protocol import DigestAlgorithm

# ------------------------------------------------------------------ PE/COFF layout

DOS_MAGIC = b"MZ"
PE_SIGNATURE = b"PE\0\0"
DOS_HEADER_SIZE = 64
E_LFANEW_OFFSET = 0x3C
COFF_HEADER_SIZE = 20
PE32_MAGIC = 0x10B
PE32_PLUS_MAGIC = 0x20B
# Offsets inside the optional header (PE/COFF "Optional Header Windows-Specific Fields").
SIZE_OF_HEADERS_OFFSET = 60
CHECKSUM_OFFSET = 64
NUMBER_OF_RVA_AND_SIZES_OFFSET = {PE32_MAGIC: 92, PE32_PLUS_MAGIC: 108}
DATA_DIRECTORIES_OFFSET = {PE32_MAGIC: 96, PE32_PLUS_MAGIC: 112}
DATA_DIRECTORY_SIZE = 8
CERTIFICATE_TABLE_INDEX = 4  # PE/COFF "Optional Header Data Directories"
SECTION_HEADER_SIZE = 40
# A PE header further into the file than this is not a real executable; the
# headers are read into memory, so their size is bounded.
MAX_HEADER_OFFSET = 1024 * 1024
# Attribute certificates are a few KiB; a nested signature or two stays far below.
MAX_CERTIFICATE_TABLE = 16 * 1024 * 1024

# PE/COFF "The Attribute Certificate Table": WIN_CERTIFICATE {dwLength, wRevision,
# wCertificateType} then bCertificate, each entry 8-byte aligned (quadword).
WIN_CERTIFICATE = struct.Struct("<IHH")
WIN_CERT_REVISION_2_0 = 0x0200
WIN_CERT_TYPE_PKCS_SIGNED_DATA = 0x0002
ALIGNMENT = 8

# ------------------------------------------------------------------ Authenticode OIDs

SPC_INDIRECT_DATA_OBJID = "1.3.6.1.4.1.311.2.1.4"
SPC_PE_IMAGE_DATAOBJ = "1.3.6.1.4.1.311.2.1.15"
SPC_STATEMENT_TYPE_OBJID = "1.3.6.1.4.1.311.2.1.11"
SPC_SP_OPUS_INFO_OBJID = "1.3.6.1.4.1.311.2.1.12"
SPC_INDIVIDUAL_SP_KEY_PURPOSE_OBJID = "1.3.6.1.4.1.311.2.1.21"
SPC_NESTED_SIGNATURE_OBJID = "1.3.6.1.4.1.311.2.4.1"
SPC_RFC3161_OBJID = "1.3.6.1.4.1.311.3.3.1"
# The file link every signer writes in SpcPeImageData (Authenticode PE: "the
# SpcLink ... should be set to the Unicode string <<<Obsolete>>>").
OBSOLETE_LINK = "<<<Obsolete>>>"

_DIGEST_NAMES = {
    DigestAlgorithm.SHA256: "sha256",
    DigestAlgorithm.SHA384: "sha384",
    DigestAlgorithm.SHA512: "sha512",
}
_DECODE_ERRORS = (ValueError, TypeError, KeyError, IndexError, OverflowError, AttributeError)


# ------------------------------------------------------------------ errors


class NotPortableExecutable(ClientError):
    """The file is not a PE32 / PE32+ image (no MZ header, no PE signature, an
    unknown optional header)."""

    code = "not_a_pe_file"
    title = "Not a PE file"


class TruncatedPortableExecutable(ClientError):
    """Headers or section data lie beyond the end of the file."""

    code = "pe_file_truncated"
    title = "Truncated PE file"


class CorruptCertificateTable(ClientError):
    """The Certificate Table entry or the WIN_CERTIFICATE entries it points at are
    inconsistent: beyond the end of the file, overlapping the image, not at the
    end, or of an unknown revision or type."""

    code = "pe_certificate_table_corrupt"
    title = "Corrupt PE certificate table"


class AuthenticodeSignatureRequired(ClientError):
    """``verify`` reads the signature from the PE file itself."""

    code = "authenticode_signature_embedded"
    title = "Authenticode signatures are embedded in the file"


# ------------------------------------------------------------------ ASN.1 (Authenticode PE)


class SpcString(core.Choice):  # type: ignore[misc]
    """SpcString ::= CHOICE { unicode [0] IMPLICIT BMPSTRING, ascii [1] IMPLICIT IA5STRING }"""

    _alternatives = [
        ("unicode", core.BMPString, {"implicit": 0}),
        ("ascii", core.IA5String, {"implicit": 1}),
    ]


class SpcSerializedObject(core.Sequence):  # type: ignore[misc]
    _fields = [("class_id", core.OctetString), ("serialized_data", core.OctetString)]


class SpcLink(core.Choice):  # type: ignore[misc]
    """SpcLink ::= CHOICE { url [0] IMPLICIT IA5STRING, moniker [1] IMPLICIT
    SpcSerializedObject, file [2] EXPLICIT SpcString }"""

    _alternatives = [
        ("url", core.IA5String, {"implicit": 0}),
        ("moniker", SpcSerializedObject, {"implicit": 1}),
        ("file", SpcString, {"explicit": 2}),
    ]


class SpcPeImageFlags(core.BitString):  # type: ignore[misc]
    _map = {0: "include_resources", 1: "include_debug_info", 2: "include_import_address_table"}


class SpcPeImageData(core.Sequence):  # type: ignore[misc]
    """SpcPeImageData ::= SEQUENCE { flags SpcPeImageFlags DEFAULT { includeResources },
    file [0] EXPLICIT SpcLink OPTIONAL }. The flags are written although they equal
    the default, as osslsigncode and signtool do: verifiers compare nothing here,
    but byte-identical output is the easiest to reason about."""

    _fields = [
        ("flags", SpcPeImageFlags),
        ("file", SpcLink, {"explicit": 0, "optional": True}),
    ]


class SpcAttributeTypeAndOptionalValue(core.Sequence):  # type: ignore[misc]
    _fields = [
        ("type", core.ObjectIdentifier),
        ("value", core.Any, {"optional": True}),
    ]


class SpcIndirectDataContent(core.Sequence):  # type: ignore[misc]
    """SpcIndirectDataContent ::= SEQUENCE { data SpcAttributeTypeAndOptionalValue,
    messageDigest DigestInfo }"""

    _fields = [
        ("data", SpcAttributeTypeAndOptionalValue),
        ("message_digest", algos.DigestInfo),
    ]


class SpcSpOpusInfo(core.Sequence):  # type: ignore[misc]
    """SpcSpOpusInfo ::= SEQUENCE { programName [0] EXPLICIT SpcString OPTIONAL,
    moreInfo [1] EXPLICIT SpcLink OPTIONAL }: empty, as signtool writes it without /d."""

    _fields = [
        ("program_name", SpcString, {"explicit": 0, "optional": True}),
        ("more_info", SpcLink, {"explicit": 1, "optional": True}),
    ]


class SpcStatementType(core.SequenceOf):  # type: ignore[misc]
    _child_spec = core.ObjectIdentifier


# ------------------------------------------------------------------ the PE layout


@dataclass(frozen=True, slots=True)
class PeLayout:
    """Where the fields that Authenticode skips or rewrites are, in one PE file."""

    pe32_plus: bool
    checksum_offset: int
    certificate_entry_offset: int
    file_size: int
    table_offset: int  # 0 when unsigned
    table_size: int

    @property
    def signed(self) -> bool:
        return self.table_size > 0

    @property
    def image_end(self) -> int:
        """Where the image (everything the hash covers) ends: the certificate table
        when there is one, else the end of the file."""
        return self.table_offset if self.signed else self.file_size

    @property
    def padded_end(self) -> int:
        """The image end rounded up to 8 bytes: the hash covers the zero padding and
        the certificate table starts there (PE/COFF: quadword aligned)."""
        return _align(self.image_end)


def _align(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def _read_at(f: BinaryIO, offset: int, size: int) -> bytes:
    f.seek(offset)
    return f.read(size)


def read_layout(f: BinaryIO, size: int) -> PeLayout:
    """Parse the headers of a PE file and check that they are complete and that the
    certificate table, if any, is sound. Reads only the headers."""
    dos = _read_at(f, 0, DOS_HEADER_SIZE)
    if dos[:2] != DOS_MAGIC:
        raise NotPortableExecutable("not a PE file: no MZ header")
    if len(dos) < DOS_HEADER_SIZE:
        raise TruncatedPortableExecutable("truncated PE file: the DOS header is incomplete")
    (pe_offset,) = struct.unpack_from("<I", dos, E_LFANEW_OFFSET)
    if pe_offset > MAX_HEADER_OFFSET:
        raise NotPortableExecutable("not a PE file: the PE header offset is implausible")
    if pe_offset + len(PE_SIGNATURE) + COFF_HEADER_SIZE > size:
        raise TruncatedPortableExecutable("truncated PE file: the PE header is beyond the end")
    coff = _read_at(f, pe_offset, len(PE_SIGNATURE) + COFF_HEADER_SIZE)
    if coff[:4] != PE_SIGNATURE:
        raise NotPortableExecutable("not a PE file: no PE signature (an MZ-only DOS file?)")
    sections, optional_size = struct.unpack_from("<H12xH", coff, 6)
    optional_offset = pe_offset + len(PE_SIGNATURE) + COFF_HEADER_SIZE
    section_table_end = optional_offset + optional_size + sections * SECTION_HEADER_SIZE
    if section_table_end > size:
        raise TruncatedPortableExecutable("truncated PE file: the section table is beyond the end")
    headers = _read_at(f, optional_offset, optional_size + sections * SECTION_HEADER_SIZE)
    if optional_size < 2:
        raise NotPortableExecutable("not a PE image: no optional header (an object file?)")
    (magic,) = struct.unpack_from("<H", headers, 0)
    if magic not in DATA_DIRECTORIES_OFFSET:
        raise NotPortableExecutable(f"not a PE32 or PE32+ image (optional header magic {magic:#x})")
    directories = DATA_DIRECTORIES_OFFSET[magic]
    entry = directories + CERTIFICATE_TABLE_INDEX * DATA_DIRECTORY_SIZE
    if optional_size < entry + DATA_DIRECTORY_SIZE:
        raise NotPortableExecutable("not a signable PE image: the optional header is too short")
    (directory_count,) = struct.unpack_from("<I", headers, NUMBER_OF_RVA_AND_SIZES_OFFSET[magic])
    if directory_count <= CERTIFICATE_TABLE_INDEX:
        raise NotPortableExecutable("not a signable PE image: it has no Certificate Table entry")
    (size_of_headers,) = struct.unpack_from("<I", headers, SIZE_OF_HEADERS_OFFSET)
    if size_of_headers > size:
        raise TruncatedPortableExecutable("truncated PE file: SizeOfHeaders is beyond the end")
    table_offset, table_size = struct.unpack_from("<II", headers, entry)

    # Every section's raw data must be in the file, before any certificate table.
    data_end = max(section_table_end, size_of_headers)
    for index in range(sections):
        base = optional_size + index * SECTION_HEADER_SIZE
        raw_size, raw_pointer = struct.unpack_from("<II", headers, base + 16)
        if raw_size == 0:
            continue
        end = raw_pointer + raw_size
        if end > size:
            name = headers[base : base + 8].rstrip(b"\0").decode("ascii", "replace")
            raise TruncatedPortableExecutable(
                f"truncated PE file: section {name!r} ends at {end}, the file at {size}"
            )
        data_end = max(data_end, end)

    layout = PeLayout(
        pe32_plus=magic == PE32_PLUS_MAGIC,
        checksum_offset=optional_offset + CHECKSUM_OFFSET,
        certificate_entry_offset=optional_offset + entry,
        file_size=size,
        table_offset=table_offset if table_size else 0,
        table_size=table_size,
    )
    if (table_offset == 0) != (table_size == 0):
        raise CorruptCertificateTable(
            f"corrupt certificate table entry (offset {table_offset}, size {table_size})"
        )
    if table_size:
        # PE/COFF: the table is at a file offset, quadword aligned, after the
        # image; every signer appends it last, and a hash that skips it is only
        # sound if nothing of the image follows it.
        if table_offset + table_size > size:
            raise CorruptCertificateTable("corrupt certificate table: it points beyond the file")
        if table_offset < data_end:
            raise CorruptCertificateTable(
                "corrupt certificate table: it overlaps the headers or section data"
            )
        if table_offset % ALIGNMENT:
            raise CorruptCertificateTable("corrupt certificate table: not 8-byte aligned")
        if table_offset + table_size != size:
            raise CorruptCertificateTable(
                "corrupt certificate table: it is not at the end of the file"
            )
        if table_size > MAX_CERTIFICATE_TABLE:
            raise CorruptCertificateTable("corrupt certificate table: implausibly large")
    return layout


def read_certificates(f: BinaryIO, layout: PeLayout) -> list[bytes]:
    """The bCertificate of every WIN_CERTIFICATE in the table (PKCS#7 SignedData
    DER, possibly followed by padding), checked for revision 2.0 and type
    PKCS_SIGNED_DATA."""
    table = _read_at(f, layout.table_offset, layout.table_size)
    if len(table) != layout.table_size:
        raise CorruptCertificateTable("corrupt certificate table: the file changed while reading")
    certificates: list[bytes] = []
    position = 0
    while position < len(table):
        if position + WIN_CERTIFICATE.size > len(table):
            raise CorruptCertificateTable("corrupt certificate table: a truncated entry")
        length, revision, kind = WIN_CERTIFICATE.unpack_from(table, position)
        if length <= WIN_CERTIFICATE.size or position + length > len(table):
            raise CorruptCertificateTable(f"corrupt certificate table: an entry of length {length}")
        if revision != WIN_CERT_REVISION_2_0 or kind != WIN_CERT_TYPE_PKCS_SIGNED_DATA:
            raise CorruptCertificateTable(
                f"corrupt certificate table: revision {revision:#06x}, type {kind} "
                "(expected WIN_CERT_REVISION_2_0, WIN_CERT_TYPE_PKCS_SIGNED_DATA)"
            )
        certificates.append(table[position + WIN_CERTIFICATE.size : position + length])
        position += _align(length)
    return certificates


def win_certificate(der: bytes) -> bytes:
    """One WIN_CERTIFICATE holding ``der``, zero-padded to 8 bytes. dwLength counts
    the padding too, as signtool and osslsigncode write it, so that the table
    ends exactly where the Certificate Table entry says."""
    length = _align(WIN_CERTIFICATE.size + len(der))
    header = WIN_CERTIFICATE.pack(length, WIN_CERT_REVISION_2_0, WIN_CERT_TYPE_PKCS_SIGNED_DATA)
    return (header + der).ljust(length, b"\0")


# ------------------------------------------------------------------ hashing and checksum


class PeChecksum:
    """The PE image checksum (imagehlp ``CheckSumMappedFile``): the 16-bit
    ones'-complement sum of the file's little-endian words, the CheckSum field
    counted as zero, plus the file length.

    End-around-carry addition is addition modulo 0xFFFF, and since 2**16 = 1
    (mod 0xFFFF) a whole chunk's words sum to ``int.from_bytes(chunk) % 0xFFFF``,
    at C speed. The only difference from the folded sum: a non-zero total that is
    a multiple of 0xFFFF folds to 0xFFFF, not 0."""

    MODULUS = 0xFFFF

    def __init__(self) -> None:
        self._sum = 0
        self._nonzero = False

    def add(self, offset: int, data: bytes) -> None:
        """Count ``data`` found at file ``offset`` (an odd offset shifts its bytes
        into the high halves of the words)."""
        value = int.from_bytes(data, "little")
        if value:
            self._nonzero = True
            if offset & 1:
                value <<= 8
            self._sum = (self._sum + value % self.MODULUS) % self.MODULUS

    def value(self, file_size: int) -> int:
        folded = self._sum or (self.MODULUS if self._nonzero else 0)
        return (folded + file_size) & 0xFFFFFFFF


def stream_image(
    source: BinaryIO,
    layout: PeLayout,
    algorithms: Sequence[DigestAlgorithm],
    *,
    target: BinaryIO | None = None,
    checksum: PeChecksum | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[DigestAlgorithm, Hashed]:
    """Authenticode image hashes of ``source`` in one pass over the file, in chunks.

    With ``target``, the image is copied there as well, zero-padded to 8 bytes and
    with the CheckSum and the Certificate Table entry zeroed (the signer fills them
    in last), and ``checksum`` counts what is written. Reading and hashing the same
    bytes that are written means the signature covers exactly the output, even if
    the input changes meanwhile."""
    hashers = {a: hashlib.new(a.value) for a in algorithms}
    skipped = (
        (layout.checksum_offset, layout.checksum_offset + 4),
        (layout.certificate_entry_offset, layout.certificate_entry_offset + DATA_DIRECTORY_SIZE),
    )
    source.seek(0)
    position = 0
    end = layout.image_end
    while position < end:
        chunk = source.read(min(HASH_CHUNK, end - position))
        if not chunk:
            raise TruncatedPortableExecutable("the file became shorter while it was read")
        if progress is not None:
            progress(len(chunk))
        chunk_end = position + len(chunk)
        if any(start < chunk_end and stop > position for start, stop in skipped):
            # Authenticode PE, "Calculating the PE Image Hash" steps 4-8: hash up to
            # the CheckSum, skip it, hash up to the Certificate Table entry, skip it.
            masked = bytearray(chunk)
            pieces: list[bytes] = []
            cursor = position
            for start, stop in skipped:
                lo, hi = max(start, position), min(stop, chunk_end)
                if lo >= hi:
                    continue
                pieces.append(chunk[cursor - position : lo - position])
                masked[lo - position : hi - position] = bytes(hi - lo)
                cursor = hi
            pieces.append(chunk[cursor - position :])
            for h in hashers.values():
                for piece in pieces:
                    h.update(piece)
            written = bytes(masked)
        else:
            for h in hashers.values():
                h.update(chunk)
            written = chunk
        if target is not None:
            target.write(written)
        if checksum is not None:
            checksum.add(position, written)
        position = chunk_end
    # osslsigncode and signtool hash the file zero-padded to a multiple of 8 bytes
    # (the padding that precedes the quadword-aligned certificate table).
    padding = bytes(layout.padded_end - end)
    for h in hashers.values():
        h.update(padding)
    if target is not None:
        target.write(padding)
    return {a: Hashed(a, h.digest()) for a, h in hashers.items()}


# ------------------------------------------------------------------ Authenticode content


def indirect_data_content(image_hash: Hashed) -> bytes:
    """The DER SpcIndirectDataContent for a PE image hash."""
    image_data = SpcPeImageData(
        {
            "flags": {"include_resources"},
            "file": SpcLink(name="file", value=SpcString(name="unicode", value=OBSOLETE_LINK)),
        }
    )
    content = SpcIndirectDataContent(
        {
            "data": {"type": SPC_PE_IMAGE_DATAOBJ, "value": core.Any.load(image_data.dump())},
            "message_digest": {
                "digest_algorithm": {"algorithm": _DIGEST_NAMES[image_hash.algorithm]},
                "digest": image_hash.digest,
            },
        }
    )
    return bytes(content.dump())


def _content_digest(content_der: bytes, algorithm: DigestAlgorithm) -> Hashed:
    """Authenticode PE: the messageDigest covers the value of SpcIndirectDataContent,
    its DER without the outer SEQUENCE tag and length."""
    return hash_bytes(bytes(SpcIndirectDataContent.load(content_der).contents), algorithm)


def _attribute(oid: str, value_der: bytes) -> bytes:
    return bytes(cms.CMSAttribute({"type": oid, "values": [core.Any.load(value_der)]}).dump())


# SpcStatementType: individual (not commercial) code signing, and an empty
# SpcSpOpusInfo (no program name, no link: `30 00`), as signtool writes them
# without /d and /du. (asn1crypto cannot dump a SEQUENCE with no fields set.)
AUTHENTICODE_SIGNED_ATTRIBUTES = (
    _attribute(SPC_SP_OPUS_INFO_OBJID, SpcSpOpusInfo.load(b"\x30\x00").dump()),
    _attribute(
        SPC_STATEMENT_TYPE_OBJID,
        SpcStatementType([SPC_INDIVIDUAL_SP_KEY_PURPOSE_OBJID]).dump(),
    ),
)
# The SignedData embedded in a PE file: it carries the SpcIndirectDataContent,
# no CMSAlgorithmProtection and no RSA-PSS (Windows' verifier knows neither),
# and its timestamp goes into Microsoft's RFC 3161 attribute.
SIGNED_DATA = SignedDataSpec(
    "authenticode",
    content_type=SPC_INDIRECT_DATA_OBJID,
    extra_signed_attributes=AUTHENTICODE_SIGNED_ATTRIBUTES,
    signing_time=True,
    algorithm_protection=False,
    timestamp_attribute=SPC_RFC3161_OBJID,
    version="v1",
    allow_pss=False,
)


@dataclass(frozen=True, slots=True)
class _Tlv:
    """One BER/DER value as asn1crypto.parser reads it: class, method, tag, the
    whole encoding and its contents."""

    class_: int
    method: int
    tag: int
    encoded: bytes
    contents: bytes


def _tlvs(contents: bytes) -> list[_Tlv]:
    """The values encoded one after another in ``contents``."""
    found: list[_Tlv] = []
    position = 0
    while position < len(contents):
        class_, method, tag, header, body, trailer = asn1_parser.parse(contents[position:])
        size = len(header) + len(body) + len(trailer)
        found.append(_Tlv(class_, method, tag, contents[position : position + size], body))
        position += size
    return found


def _only(der: bytes) -> _Tlv:
    (value,) = _tlvs(der)
    return value


def _emit(value: _Tlv, contents: bytes) -> bytes:
    return bytes(asn1_parser.emit(value.class_, value.method, value.tag, contents))


def _der_set(encodings: Sequence[bytes]) -> bytes:
    """The contents of a DER SET OF: its elements in ascending order (X.690 §11.6)."""
    return b"".join(sorted(encodings))


@dataclass(frozen=True, slots=True)
class _FirstSigner:
    """The path from a ContentInfo's bytes down to its first SignerInfo's fields."""

    content_info: _Tlv
    oid: _Tlv
    explicit: _Tlv
    signed_data: _Tlv
    fields: list[_Tlv]  # SignedData's fields; the last is signerInfos
    first: _Tlv
    others: list[_Tlv]  # the other SignerInfos
    parts: list[_Tlv]  # the first SignerInfo's fields

    @classmethod
    def of(cls, der: bytes) -> _FirstSigner:
        content_info = _only(der)
        oid, explicit = _tlvs(content_info.contents)
        signed_data = _only(explicit.contents)
        fields = _tlvs(signed_data.contents)
        first, *others = _tlvs(fields[-1].contents)
        return cls(content_info, oid, explicit, signed_data, fields, first, others,
                   _tlvs(first.contents))  # fmt: skip

    @property
    def unsigned(self) -> list[_Tlv]:
        """The unsigned attributes ([1] IMPLICIT SET OF Attribute, the last field)."""
        last = self.parts[-1]
        return _tlvs(last.contents) if last.class_ == 2 and last.tag == 1 else []

    def nested(self) -> list[bytes]:
        """The DER of each SPC_NESTED_SIGNATURE value."""
        for attribute in self.unsigned:
            kind, values = _tlvs(attribute.contents)
            if cms.ContentType.load(kind.encoded).dotted == SPC_NESTED_SIGNATURE_OBJID:
                return [v.encoded for v in _tlvs(values.contents)]
        return []

    def with_unsigned(self, attributes: Sequence[bytes]) -> bytes:
        """The whole ContentInfo again, the first SignerInfo's unsigned attributes
        replaced; every other byte as it was."""
        kept = self.parts[:-1] if self.unsigned else self.parts
        unsigned = bytes(asn1_parser.emit(2, 1, 1, _der_set(attributes)))  # [1] IMPLICIT
        first = _emit(self.first, b"".join(p.encoded for p in kept) + unsigned)
        infos = _emit(self.fields[-1], first + b"".join(o.encoded for o in self.others))
        signed = _emit(self.signed_data, b"".join(f.encoded for f in self.fields[:-1]) + infos)
        return _emit(self.content_info, self.oid.encoded + _emit(self.explicit, signed))


def nest_signature(primary_der: bytes, nested_der: bytes) -> bytes:
    """``primary_der`` with ``nested_der`` added to its first SignerInfo's unsigned
    SPC_NESTED_SIGNATURE attribute (one attribute, one value per nested signature,
    as osslsigncode -nest writes it).

    Spliced at the byte level with asn1crypto's parser: only the enclosing headers
    are re-encoded, every other byte (the primary's signed attributes, certificates,
    timestamp tokens) is kept as it was. Re-dumping the modified tree with
    asn1crypto instead can take minutes: it re-encodes whole subtrees of a value
    whose length header happens to end in 0x80 (wbond/asn1crypto#249), and nested
    signatures with timestamp tokens are deep."""
    try:
        signer = _FirstSigner.of(primary_der)
        unsigned = signer.unsigned
        _only(nested_der)  # one well-formed value
        values = [*signer.nested(), nested_der]
    except (*_DECODE_ERRORS, AttributeError):
        raise CorruptCertificateTable("the existing signature cannot be extended") from None
    # Attribute ::= SEQUENCE { type OID, values SET OF ContentInfo } (universal,
    # constructed: SEQUENCE is tag 16, SET tag 17).
    oid_der = bytes(cms.ContentType(SPC_NESTED_SIGNATURE_OBJID).dump())
    nested = bytes(
        asn1_parser.emit(0, 1, 16, oid_der + asn1_parser.emit(0, 1, 17, _der_set(values)))
    )
    others = [
        a.encoded
        for a in unsigned
        if cms.ContentType.load(_tlvs(a.contents)[0].encoded).dotted != SPC_NESTED_SIGNATURE_OBJID
    ]
    return signer.with_unsigned([*others, nested])


# ------------------------------------------------------------------ the format


class AuthenticodeFormat:
    """Authenticode signatures embedded in PE32 / PE32+ files."""

    name = SIGNED_DATA.format_name

    def default_output(self, file: Path, options: SignOptions) -> Path:
        """The file itself: the signature lives inside it, replaced atomically."""
        return file

    def sign(self, signer: Signer, file: Path, output: Path, options: SignOptions) -> SignResult:
        """Sign ``file`` and write the signed image to ``output`` (which may be
        ``file``); a signed input has its signature replaced, or with
        ``options.append`` gets the new one nested in it."""
        # Refuse what Authenticode cannot carry before reading or sending anything:
        # no certificate to name the signer, or RSA-PSS (osslsigncode and Windows
        # refuse it).
        signing_certificate(signer, self.name)
        digest_algorithm, _ = choose(signer, options, SIGNED_DATA)
        with file.open("rb") as source:
            info = os.fstat(source.fileno())
            layout = read_layout(source, info.st_size)
            kept: list[bytes] = []
            primary: bytes | None = None
            if layout.signed:
                certificates = read_certificates(source, layout)
                if options.append:
                    primary = _signed_data_der(certificates[0])
                    kept = certificates[1:]
            with open_atomically(
                output, stat.S_IMODE(info.st_mode), before_commit=options.check_interrupted
            ) as target:
                checksum = PeChecksum()
                image_hash = stream_image(
                    source,
                    layout,
                    [digest_algorithm],
                    target=target,
                    checksum=checksum,
                    progress=options.on_chunk,
                )[digest_algorithm]
                content = indirect_data_content(image_hash)
                signed = build_signed_data(
                    signer,
                    options,
                    SIGNED_DATA,
                    _content_digest(content, digest_algorithm),
                    content=content,
                )
                der = signed.der if primary is None else nest_signature(primary, signed.der)
                table = b"".join(win_certificate(d) for d in (der, *kept))
                _finish(target, layout, table, checksum)
        return SignResult(
            file=file,
            output=output,
            digest_algorithm=digest_algorithm,
            digest=image_hash.hex,
            key_name=signer.key_name,
            key_version=signed.key_version,
            scheme=signed.scheme,
            timestamped=signed.timestamped,
        )

    def verify(
        self, file: Path, signature: Path, public_keys: list[PublicKey], options: SignOptions
    ) -> VerifyResult:
        """Check the embedded signatures (the primary and any nested ones): the
        image hash in SpcIndirectDataContent against the file, the signed
        messageDigest against SpcIndirectDataContent, and the signature against
        ``public_keys``. Valid when at least one signature is fully valid with one
        of the keys; the detail names what every signature gave."""
        if signature != file:
            raise AuthenticodeSignatureRequired(
                f"the Authenticode signature is inside {file}; give no separate signature"
            )
        try:
            with file.open("rb") as source:
                layout = read_layout(source, os.fstat(source.fileno()).st_size)
                if not layout.signed:
                    return VerifyResult(file, signature, False, "the file is not signed")
                der = _signed_data_der(read_certificates(source, layout)[0])
                signatures = _signatures(der)
                algorithms = sorted({a for _, a, _ in signatures}, key=lambda a: a.value)
                hashes = stream_image(source, layout, algorithms, progress=options.on_chunk)
        except (NotPortableExecutable, TruncatedPortableExecutable, CorruptCertificateTable) as e:
            return VerifyResult(file, signature, False, f"{e.code}: {e.detail}")
        except OSError as e:
            raise ClientError(f"cannot read {file}: {e.strerror or e}") from None
        details: list[str] = []
        valid = False
        for index, (signed_data, algorithm, problem) in enumerate(signatures):
            label = "signature 1" if index == 0 else f"nested signature {index}"
            ok, detail = _check_one(signed_data, algorithm, problem, hashes, public_keys)
            valid = valid or ok
            details.append(f"{label}: {detail}")
        return VerifyResult(file, signature, valid, "; ".join(details))


def _finish(target: BinaryIO, layout: PeLayout, table: bytes, checksum: PeChecksum) -> None:
    """Append the certificate table, point the Certificate Table entry at it and
    write the checksum of the whole result (PE/COFF: the CheckSum covers the
    certificate table too, so it comes last)."""
    target.write(table)
    checksum.add(layout.padded_end, table)
    entry = struct.pack("<II", layout.padded_end, len(table))
    target.seek(layout.certificate_entry_offset)
    target.write(entry)
    checksum.add(layout.certificate_entry_offset, entry)
    target.seek(layout.checksum_offset)
    target.write(struct.pack("<I", checksum.value(layout.padded_end + len(table))))


def _signed_data_der(certificate: bytes) -> bytes:
    """The SignedData DER at the start of a bCertificate (without its padding)."""
    try:
        der = bytes(core.Asn1Value.load(certificate).dump())  # one value; padding follows
        load_signed_data(der)
    except (*_DECODE_ERRORS, ClientError):
        raise CorruptCertificateTable(
            "corrupt certificate table: the entry is not a PKCS#7 SignedData"
        ) from None
    return der


def load_signed_data(der: bytes) -> Any:
    """A ContentInfo holding a SignedData with at least one SignerInfo, parsed as
    far as this module reads it. (``parse_content_info`` would do, but it turns
    the whole SignerInfo into Python values, which takes asn1crypto up to a
    second for one with a timestamp token: too slow for nested signatures.)"""
    info = cms.ContentInfo.load(der)
    if info["content_type"].native != "signed_data":
        raise ValueError("not SignedData")
    signer_info = info["content"]["signer_infos"][0]
    signer_info["signed_attrs"].native  # noqa: B018 - parse now, not later
    signer_info["signature"].native  # noqa: B018
    return info


def _signatures(der: bytes) -> list[tuple[Any, DigestAlgorithm, str | None]]:
    """The primary SignedData and those nested in its first SignerInfo, each with
    the digest algorithm of its image hash, or the reason it cannot be checked."""
    found: list[tuple[Any, DigestAlgorithm, str | None]] = []
    primary = load_signed_data(der)
    candidates = [primary]
    try:
        # The nested values' bytes as they are in the file (never re-encoded).
        candidates.extend(load_signed_data(d) for d in _FirstSigner.of(der).nested())
    except (*_DECODE_ERRORS, AttributeError, ClientError):
        pass  # a malformed nested signature is not one; the primary is still checked
    for info in candidates:
        signed_data = info["content"]
        try:
            content = _indirect_data(signed_data)
            name = content["message_digest"]["digest_algorithm"]["algorithm"].native
            found.append((signed_data, DigestAlgorithm(name), None))
        except _DECODE_ERRORS:
            found.append(
                (signed_data, DigestAlgorithm.SHA256, "no SpcIndirectDataContent for a PE image")
            )
    return found


def _indirect_data(signed_data: Any) -> Any:
    encapsulated = signed_data["encap_content_info"]
    if encapsulated["content_type"].dotted != SPC_INDIRECT_DATA_OBJID:
        raise ValueError("not SpcIndirectDataContent")
    # The content is [0] EXPLICIT SpcIndirectDataContent (no OCTET STRING).
    content = SpcIndirectDataContent.load(encapsulated["content"].dump(), explicit=0)
    if content["data"]["type"].dotted != SPC_PE_IMAGE_DATAOBJ:
        raise ValueError("not a PE image")
    # Parse the DigestInfo now, inside the caller's error handling (the
    # SpcPeImageData value stays opaque: nothing in it is checked).
    content["message_digest"].native  # noqa: B018
    return content


def _check_one(
    signed_data: Any,
    algorithm: DigestAlgorithm,
    problem: str | None,
    hashes: dict[DigestAlgorithm, Hashed],
    public_keys: Sequence[PublicKey],
) -> tuple[bool, str]:
    if problem is not None:
        return False, problem
    content = _indirect_data(signed_data)
    signed_hash = bytes(content["message_digest"]["digest"].native)
    if signed_hash != hashes[algorithm].digest:
        return (
            False,
            f"the file was modified after signing (the {algorithm.value} image hash differs)",
        )
    check = check_signer(signed_data, public_keys)
    if not check.valid or check.digest_algorithm is None:
        return False, check.detail
    # Authenticode PE: the messageDigest covers the DER contents of
    # SpcIndirectDataContent, without its outer tag and length.
    covered = hash_bytes(bytes(content.contents), check.digest_algorithm)
    if check.message_digest != covered.digest:
        return False, "the signed messageDigest does not cover the SpcIndirectDataContent"
    if not check.timestamped:
        return True, check.detail
    stamp = _check_timestamp(signed_data["signer_infos"][0])
    if stamp is not None:
        return False, f"{check.detail}, but {stamp}"
    return True, f"{check.detail}, timestamped"


def _check_timestamp(signer_info: Any) -> str | None:
    """None if the RFC 3161 token is intact: its imprint is the hash of this
    SignerInfo's signature (RFC 3161 Appendix A), its TSTInfo is what the TSA
    signed, and the TSA's signature verifies with the certificate in the token.
    Whether that TSA is trusted is for a verifier with trust anchors (osslsigncode
    -TSA-CAfile, Windows); this catches a token altered or moved from another file."""
    try:
        (token_der,) = [
            v.dump()
            for a in signer_info["unsigned_attrs"]
            if a["type"].dotted in (SPC_RFC3161_OBJID, ID_AA_TIMESTAMP_TOKEN)
            for v in a["values"]
        ]
        token = load_signed_data(token_der)["content"]
        encapsulated = token["encap_content_info"]
        tst_der = bytes(encapsulated["content"].contents)
        tst = tsp.TSTInfo.load(tst_der)
        imprint = tst["message_imprint"]
        algorithm = DigestAlgorithm(imprint["hash_algorithm"]["algorithm"].native)
        signed_imprint = bytes(imprint["hashed_message"].native)
        sid = token["signer_infos"][0]["sid"].chosen
        certificate = next(
            c.chosen
            for c in token["certificates"]
            if c.chosen.issuer == sid["issuer"]
            and c.chosen.serial_number == sid["serial_number"].native
        )
        tsa_key = x509.load_der_x509_certificate(certificate.dump()).public_key()
    except (*_DECODE_ERRORS, ClientError, StopIteration):
        return "the timestamp token is malformed"
    if signed_imprint != hash_bytes(bytes(signer_info["signature"].native), algorithm).digest:
        return "the timestamp token is not over this signature"
    check = check_signer(token, [tsa_key])  # type: ignore[list-item]
    if not check.valid or check.digest_algorithm is None:
        return "the timestamp token's signature does not verify"
    if check.message_digest != hash_bytes(tst_der, check.digest_algorithm).digest:
        return "the timestamp token's messageDigest does not cover its TSTInfo"
    return None


__all__ = [
    "AuthenticodeFormat",
    "AuthenticodeSignatureRequired",
    "CorruptCertificateTable",
    "NotPortableExecutable",
    "PeChecksum",
    "PeLayout",
    "TruncatedPortableExecutable",
    "indirect_data_content",
    "read_certificates",
    "read_layout",
    "stream_image",
    "win_certificate",
]
