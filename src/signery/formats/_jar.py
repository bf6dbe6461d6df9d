"""``jar``: a signed JAR (JAR File Specification, "Signed JAR File"), for .jar,
.war and .aar files alike (all are zips).

Signing writes three files into ``META-INF/``:

- ``MANIFEST.MF``: the existing manifest (main attributes and per-entry sections
  kept byte for byte where nothing changes) plus a ``SHA-256-Digest`` (or the
  chosen digest's name) of every entry that is not a directory or a signature
  file;
- ``SIGNER.SF``: the digest of the whole manifest, of its main attributes and of
  each per-entry section (the raw bytes, trailing blank line included);
- ``SIGNER.RSA`` / ``SIGNER.EC``: a detached CMS SignedData over the .SF bytes
  (signery.formats._signeddata), with the whole certificate chain and, with
  ``--timestamp``, an RFC 3161 token as the unsigned attribute
  id-aa-timeStampToken over the signature value, as jarsigner writes it.

The new archive is written beside the output and renamed over it: the input is
never half-rewritten. Entry contents are streamed, never read whole.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import secrets
import stat
import struct
import time
import zipfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from signery import __version__
from signery.crypto import HASH_CHUNK, PublicKey, hash_bytes
from signery.errors import ClientError
from signery.formats._base import Signer, SignOptions, SignResult, VerifyResult
from signery.formats._signeddata import (
    SignedDataSpec,
    build_signed_data,
    check_signer,
    choose,
    parse_content_info,
    signing_certificate,
)
from signery.protocol import DigestAlgorithm

MANIFEST_NAME = "META-INF/MANIFEST.MF"
LINE_LIMIT = 72  # JAR File Specification, "Notes on Manifest and Signature Files"
SIGNER_NAME_LENGTH = 8  # jarsigner: the -sigfile default is the alias cut to 8 characters
MAX_MANIFEST_BYTES = 64 * 1024 * 1024  # manifests and .SF files grow with the entries
MAX_BLOCK_BYTES = 1024 * 1024  # a SignedData with a chain and a token is a few KiB
CREATED_BY = f"{__version__} (Signery)"

# The JAR names of the digest algorithms (Java Security Standard Algorithm Names):
# they prefix the manifest and .SF attributes, e.g. SHA-256-Digest.
JAR_DIGEST_NAMES = {
    DigestAlgorithm.SHA256: "SHA-256",
    DigestAlgorithm.SHA384: "SHA-384",
    DigestAlgorithm.SHA512: "SHA-512",
}
_BY_JAR_NAME = {name.upper(): algorithm for algorithm, name in JAR_DIGEST_NAMES.items()}
# JAR File Specification, "Signature File": the block file's extension names the
# key type. Java maps RSASSA-PSS keys to .RSA as well; DSA is never produced here.
_BLOCK_EXTENSIONS = (".RSA", ".EC", ".DSA")
_HEADER_NAME = re.compile(rb"[A-Za-z0-9][A-Za-z0-9_-]{0,69}")
_UTF8_FLAG = 0x800  # APPNOTE.TXT 4.4.4 bit 11: the name is UTF-8
_ENCRYPTED_FLAG = 0x1  # APPNOTE.TXT 4.4.4 bit 0
_ZIP64_EXTRA = 0x0001  # APPNOTE.TXT 4.5.3: zipfile writes its own when needed
# java.util.zip reads only these two methods.
_JAVA_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
# What zipfile raises on damaged input: bad headers and CRCs, truncated streams,
# undecodable names (UnicodeDecodeError is a ValueError), seeks outside the file
# (OSError EINVAL), unknown methods.
_READ_ERRORS = (
    zipfile.BadZipFile,
    zlib.error,
    EOFError,
    ValueError,
    NotImplementedError,
    RuntimeError,
)


class NotAJar(ClientError):
    """The file is not a zip, or a zip that cannot be a signed JAR (see docs/formats/jar.md)."""

    code = "not_a_jar"
    title = "Not a JAR file"


class CorruptJar(ClientError):
    """The zip's structure or an entry's data is damaged."""

    code = "corrupt_jar"
    title = "The JAR file is corrupt"


class InvalidManifest(ClientError):
    """META-INF/MANIFEST.MF does not follow the manifest syntax."""

    code = "invalid_manifest"
    title = "The JAR manifest is invalid"


# ------------------------------------------------------------------ names


def signer_name(key_name: str) -> str:
    """The signature file base name for a key, by jarsigner's rule for an alias:
    upper-cased, characters outside [A-Z0-9_-] replaced by ``_``, cut to 8."""
    # Per character, so that no upper-casing ("ß" -> "SS") makes the name longer.
    return "".join(
        c.upper() if c.isascii() and (c.isalnum() or c in "-_") else "_"
        for c in key_name[:SIGNER_NAME_LENGTH]
    )


def is_signature_related(name: str) -> bool:
    """The manifest and the signature files directly in META-INF (JAR File
    Specification, "Signed JAR File"): never digested into the manifest."""
    upper = name.upper()
    if upper == MANIFEST_NAME:
        return True
    if not upper.startswith("META-INF/") or "/" in upper[len("META-INF/") :]:
        return False
    base = upper[len("META-INF/") :]
    return base.startswith("SIG-") or base.endswith((".SF", *_BLOCK_EXTENSIONS))


def _check_entry_name(info: zipfile.ZipInfo) -> None:
    name = info.filename
    # zipfile cuts a name at NUL (orig_filename keeps it); Java would not.
    if not name or any(c in info.orig_filename for c in "\0\r\n"):
        # A manifest "Name:" value cannot hold NUL, CR or LF.
        raise NotAJar(f"entry name {name!r} cannot be named in a manifest")
    parts = name.rstrip("/").split("/")
    if name.startswith("/") or "\\" in name or any(p in ("", ".", "..") for p in parts):
        raise NotAJar(f"entry name {name!r} is not a safe relative path")
    if not name.isascii() and not info.flag_bits & _UTF8_FLAG:
        # Java reads every name as UTF-8; without the flag Python reads CP437: the
        # manifest would name a different entry than the one Java finds.
        raise NotAJar(f"entry name {name!r} is not ASCII and not marked as UTF-8")
    if info.flag_bits & _ENCRYPTED_FLAG:
        raise NotAJar(f"entry {name!r} is encrypted")
    if info.compress_type not in _JAVA_METHODS:
        raise NotAJar(
            f"entry {name!r} uses compression method {info.compress_type}; "
            "Java reads only stored and deflated entries"
        )


# ------------------------------------------------------------------ manifests


@dataclass(frozen=True, slots=True)
class Section:
    """One manifest or .SF section: its raw bytes (trailing blank line included,
    what the .SF digests cover) and its attributes, in order."""

    raw: bytes
    attributes: tuple[tuple[str, str], ...]

    @property
    def name(self) -> str | None:
        """The ``Name:`` of a per-entry section; None for the main section."""
        if self.attributes and self.attributes[0][0].lower() == "name":
            return self.attributes[0][1]
        return None

    def get(self, key: str) -> str | None:
        """An attribute's value; attribute names are case-insensitive."""
        wanted = key.lower()
        return next((v for k, v in self.attributes if k.lower() == wanted), None)


def _wrap(line: bytes) -> bytes:
    """One header as 72-byte lines with CRLF, continued by one space, cut between
    UTF-8 characters (JAR File Specification, "Notes on Manifest and Signature
    Files": "No line may be longer than 72 bytes (not characters)")."""
    pieces: list[bytes] = []
    while len(line) > LINE_LIMIT:
        cut = LINE_LIMIT
        while line[cut] & 0xC0 == 0x80:  # never start a line with a UTF-8 continuation byte
            cut -= 1
        pieces.append(line[:cut])
        line = b" " + line[cut:]
    pieces.append(line)
    return b"".join(p + b"\r\n" for p in pieces)


def encode_section(attributes: Iterable[tuple[str, str]]) -> Section:
    """A section from attributes: wrapped lines, then the blank line that ends it."""
    attributes = tuple(attributes)
    raw = b"".join(_wrap(f"{k}: {v}".encode()) for k, v in attributes) + b"\r\n"
    return Section(raw, attributes)


def _split_lines(data: bytes) -> list[bytes]:
    """Lines with their terminators (CRLF, LF or CR, as java.util.jar accepts); a
    last line without one gets CRLF."""
    lines = re.findall(rb"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+$", data)
    if lines and not lines[-1].endswith((b"\n", b"\r")):
        lines[-1] += b"\r\n"
    return lines


def _parse_attributes(lines: Sequence[bytes], what: str) -> tuple[tuple[str, str], ...]:
    headers: list[tuple[bytes, bytearray]] = []
    for line in lines:
        text = line.rstrip(b"\r\n")
        if text.startswith(b" "):
            if not headers:
                raise InvalidManifest(f"{what}: a continuation line without a header")
            headers[-1][1].extend(text[1:])
            continue
        key, sep, value = text.partition(b": ")
        if not sep or not _HEADER_NAME.fullmatch(key):
            raise InvalidManifest(f"{what}: malformed header line {text[:80]!r}")
        headers.append((key, bytearray(value)))
    try:
        # Values are joined as bytes first: a wrapped line may split a character.
        return tuple((k.decode("ascii"), bytes(v).decode("utf-8")) for k, v in headers)
    except UnicodeDecodeError:
        raise InvalidManifest(f"{what}: a header value is not UTF-8") from None


def parse_manifest(data: bytes, what: str = MANIFEST_NAME) -> tuple[Section, list[Section]]:
    """The main section and the per-entry sections of a manifest or .SF file.

    Sections end at a blank line; extra blank lines between sections belong to no
    section (java.util.jar's ManifestDigester skips them too). A per-entry section
    must start with ``Name:`` and name an entry once."""
    groups: list[list[bytes]] = [[]]
    for line in _split_lines(data):
        blank = line in (b"\r\n", b"\n", b"\r")
        if blank and not groups[-1] and len(groups) > 1:
            continue
        groups[-1].append(line)
        if blank:
            groups.append([])
    if groups[-1]:
        groups[-1].append(b"\r\n")  # the last section lacked its blank line
    else:
        groups.pop()
    if not groups:
        return Section(b"", ()), []
    main_lines = groups[0]
    main = Section(b"".join(main_lines), _parse_attributes(main_lines[:-1], what))
    sections: list[Section] = []
    seen: set[str] = set()
    for group in groups[1:]:
        section = Section(b"".join(group), _parse_attributes(group[:-1], what))
        name = section.name
        if name is None:
            raise InvalidManifest(f"{what}: a section does not start with Name:")
        if name in seen:
            raise InvalidManifest(f"{what}: two sections for {name!r}")
        seen.add(name)
        sections.append(section)
    return main, sections


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


# ------------------------------------------------------------------ zip access


def _open_zip(file: Path) -> zipfile.ZipFile:
    """The file as a zip whose entries a JAR can hold; NotAJar or CorruptJar otherwise."""
    try:
        zf = zipfile.ZipFile(file)
    except zipfile.BadZipFile as e:
        with file.open("rb") as f:
            magic = f.read(2)
        if magic == b"PK":
            raise CorruptJar(f"{file}: a damaged zip ({e})") from None
        raise NotAJar(f"{file} is not a zip file") from None
    except (OSError, *_READ_ERRORS) as e:
        if isinstance(e, FileNotFoundError | PermissionError | IsADirectoryError):
            raise ClientError(f"cannot read {file}: {e.strerror}") from None
        raise CorruptJar(f"{file}: a damaged zip ({e})") from None
    try:
        infos = zf.infolist()
        if not infos:
            raise NotAJar(f"{file} is an empty zip: nothing to sign")
        names: set[str] = set()
        manifests = 0
        for info in infos:
            _check_entry_name(info)
            if info.filename in names:
                # Which of two same-named entries a reader takes differs between
                # tools: a signature over one could be shown for the other.
                raise NotAJar(f"{file}: the entry {info.filename!r} appears twice")
            names.add(info.filename)
            if info.filename.upper().rstrip("/") == MANIFEST_NAME:
                manifests += 1
                if info.is_dir():
                    raise NotAJar(f"{file}: {info.filename} is a directory")
        if manifests > 1:
            raise NotAJar(f"{file}: more than one {MANIFEST_NAME} (names differing in case)")
    except BaseException:
        zf.close()
        raise
    return zf


def _manifest_info(zf: zipfile.ZipFile) -> zipfile.ZipInfo | None:
    return next((i for i in zf.infolist() if i.filename.upper() == MANIFEST_NAME), None)


def _read_small(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    if info.file_size > limit:
        raise NotAJar(f"{info.filename} is larger than {limit} bytes")
    try:
        with zf.open(info) as f:
            data = f.read(limit + 1)
    except (OSError, *_READ_ERRORS) as e:
        raise CorruptJar(f"entry {info.filename!r}: {e}") from None
    if len(data) > limit:
        raise NotAJar(f"{info.filename} is larger than {limit} bytes")
    _check_size(info, len(data))
    return data


def _check_size(info: zipfile.ZipInfo, size: int) -> None:
    # zipfile checks the CRC-32 but not the size the central directory declares;
    # java.util.zip does, so a mismatch would make Java read other bytes than ours.
    if size != info.file_size:
        raise CorruptJar(
            f"entry {info.filename!r} holds {size} bytes, the zip directory says {info.file_size}"
        )


def _entry_digest(
    zf: zipfile.ZipFile,
    info: zipfile.ZipInfo,
    algorithm: DigestAlgorithm,
    options: SignOptions,
) -> bytes:
    """The digest of an entry's uncompressed content, read in chunks (zipfile
    checks the CRC-32 at the end), stopping at the first chunk after an
    interrupt. Progress counts the entry's stored bytes, so it adds up to about
    the file's size."""
    digest = hashlib.new(algorithm.value)
    size = 0
    try:
        with zf.open(info) as f:
            while chunk := f.read(HASH_CHUNK):
                options.check_interrupted()
                digest.update(chunk)
                size += len(chunk)
    except (OSError, *_READ_ERRORS) as e:
        raise CorruptJar(f"entry {info.filename!r}: {e}") from None
    _check_size(info, size)
    if options.progress is not None:
        options.progress(info.compress_size)
    return digest.digest()


def _copy_info(info: zipfile.ZipInfo) -> zipfile.ZipInfo:
    """A new header for an entry that is copied: same name, time, method,
    attributes, comment and extra fields (minus the ZIP64 one, which zipfile
    writes itself when the entry needs it)."""
    new = zipfile.ZipInfo(info.filename, info.date_time)
    new.compress_type = info.compress_type
    new.comment = info.comment
    new.extra = _strip_extra(info.extra, _ZIP64_EXTRA)
    new.create_system = info.create_system
    new.external_attr = info.external_attr
    new.internal_attr = info.internal_attr
    new.file_size = info.file_size  # zipfile decides on ZIP64 from it
    return new


def _strip_extra(extra: bytes, header_id: int) -> bytes:
    """The extra field without the blocks of one header id (APPNOTE.TXT 4.5.1)."""
    kept = bytearray()
    i = 0
    while i + 4 <= len(extra):
        hid, size = struct.unpack("<HH", extra[i : i + 4])
        block = extra[i : i + 4 + size]
        if hid != header_id:
            kept.extend(block)
        i += 4 + size
    return bytes(kept)


def _new_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, time.localtime()[:6])
    info.compress_type = zipfile.ZIP_DEFLATED
    # No Unix mode bits, as jarsigner writes them: jarsigner -verify warns about
    # POSIX attributes, which no signature covers.
    info.create_system = 0
    info.external_attr = 0
    return info


def _write_jar(
    source: zipfile.ZipFile,
    output: Path,
    first: Sequence[tuple[str, bytes]],
    copied: Sequence[zipfile.ZipInfo],
    check_interrupted: Callable[[], None],
) -> None:
    """The signed archive: ``first`` (manifest, .SF, block: the order jarsigner
    writes and JarInputStream expects), then ``copied`` from ``source`` with their
    compression method and content, streamed. ``check_interrupted`` runs after
    each chunk and before the rename: an interrupted copy never replaces the
    input (a JAR is signed in place)."""

    def write(f: IO[bytes]) -> None:
        with zipfile.ZipFile(f, "w") as out:
            for name, data in first:
                out.writestr(_new_info(name), data)
            for info in copied:
                new = _copy_info(info)
                if info.is_dir():
                    out.writestr(new, b"")
                    continue
                try:
                    with source.open(info) as r, out.open(new, "w") as w:
                        while chunk := r.read(HASH_CHUNK):
                            check_interrupted()
                            w.write(chunk)
                except _READ_ERRORS as e:
                    raise CorruptJar(f"entry {info.filename!r}: {e}") from None
            out.comment = source.comment

    _replace_atomically(output, write, check_interrupted)


def _replace_atomically(
    path: Path, write: Callable[[IO[bytes]], None], before_commit: Callable[[], None]
) -> None:
    """Stream into a temporary file beside ``path``, then rename it over ``path``
    (formats.write_atomically, for output too large to hold in memory), unless
    ``before_commit`` raises. A file that is replaced keeps its permissions."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        mode = None
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w+b") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        before_commit()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------ signing


def updated_manifest(
    existing: bytes | None, digests: Sequence[tuple[str, str]], attribute: str
) -> tuple[Section, list[Section]]:
    """The manifest with ``attribute`` (e.g. ``SHA-256-Digest``) set for every
    (name, base64 digest); everything else kept. A section whose digest is already
    right keeps its raw bytes, so other signers' .SF section digests still match."""
    if existing is None or not existing.strip():
        main = encode_section([("Manifest-Version", "1.0"), ("Created-By", CREATED_BY)])
        sections: list[Section] = []
    else:
        main, sections = parse_manifest(existing)
        if main.get("Manifest-Version") is None:
            # JAR File Specification, "Main Attributes": Manifest-Version comes first.
            main = encode_section([("Manifest-Version", "1.0"), *main.attributes])
    index = {s.name: i for i, s in enumerate(sections)}
    wanted = attribute.lower()
    for name, value in digests:
        at = index.get(name)
        if at is None:
            index[name] = len(sections)
            sections.append(encode_section([("Name", name), (attribute, value)]))
            continue
        section = sections[at]
        if section.get(attribute) == value:
            continue
        attributes = [(k, v) for k, v in section.attributes if k.lower() != wanted]
        sections[at] = encode_section([*attributes, (attribute, value)])
    return main, sections


def signature_file(
    manifest: bytes, main: Section, sections: Sequence[Section], algorithm: DigestAlgorithm
) -> bytes:
    """The .SF file (JAR File Specification, "Signature File"): digests of the whole
    manifest, of its main section and of each per-entry section, all over raw bytes
    with the section's trailing blank line."""
    jar = JAR_DIGEST_NAMES[algorithm]
    head = encode_section(
        [
            ("Signature-Version", "1.0"),
            ("Created-By", CREATED_BY),
            (f"{jar}-Digest-Manifest", _b64(hash_bytes(manifest, algorithm).digest)),
            (
                f"{jar}-Digest-Manifest-Main-Attributes",
                _b64(hash_bytes(main.raw, algorithm).digest),
            ),
        ]
    )
    body = (
        encode_section(
            [("Name", s.name or ""), (f"{jar}-Digest", _b64(hash_bytes(s.raw, algorithm).digest))]
        ).raw
        for s in sections
    )
    return head.raw + b"".join(body)


# The signature block: a detached SignedData over the .SF file, content type
# id-data (JAR File Specification, "Digital Signatures").
SIGNED_DATA = SignedDataSpec("jar")


class JarFormat:
    """Signs .jar, .war and .aar files in place (or into a copy with -o)."""

    name = SIGNED_DATA.format_name

    def default_output(self, file: Path, options: SignOptions) -> Path:
        return file

    def sign(self, signer: Signer, file: Path, output: Path, options: SignOptions) -> SignResult:
        # Refuse a key that cannot sign a JAR before reading the file or calling
        # the server: the block file names the signer by its certificate.
        signing_certificate(signer, self.name)
        digest, _ = choose(signer, options, SIGNED_DATA)
        attribute = f"{JAR_DIGEST_NAMES[digest]}-Digest"
        base = f"META-INF/{signer_name(signer.key_name)}"
        block = base + (".RSA" if signer.algorithm.is_rsa else ".EC")
        ours = {(base + ext).upper() for ext in (".SF", *_BLOCK_EXTENSIONS)}
        with _open_zip(file) as zf:
            infos = zf.infolist()
            manifest_info = _manifest_info(zf)
            existing = _read_small(zf, manifest_info, MAX_MANIFEST_BYTES) if manifest_info else None
            entries = [i for i in infos if not i.is_dir() and not is_signature_related(i.filename)]
            if not entries:
                raise NotAJar(f"{file} has no files to sign (only directories or signatures)")
            digests = [(i.filename, _b64(_entry_digest(zf, i, digest, options))) for i in entries]
            main, sections = updated_manifest(existing, digests, attribute)
            manifest = main.raw + b"".join(s.raw for s in sections)
            sf = signature_file(manifest, main, sections, digest)
            sf_digest = hash_bytes(sf, digest)
            signed = build_signed_data(signer, options, SIGNED_DATA, sf_digest)
            other_signatures = [
                i
                for i in infos
                if is_signature_related(i.filename)
                and i.filename.upper() not in ours
                and i.filename.upper() != MANIFEST_NAME
            ]
            rest = [i for i in infos if not is_signature_related(i.filename)]
            _write_jar(
                zf,
                output,
                [(MANIFEST_NAME, manifest), (base + ".SF", sf), (block, signed.der)],
                [*other_signatures, *rest],
                options.check_interrupted,
            )
        return SignResult(
            file=file,
            output=output,
            digest_algorithm=digest,
            digest=sf_digest.hex,
            key_name=signer.key_name,
            key_version=signed.key_version,
            scheme=signed.scheme,
            timestamped=signed.timestamped,
        )

    # -------------------------------------------------------------- verification

    def verify(
        self, file: Path, signature: Path, public_keys: list[PublicKey], options: SignOptions
    ) -> VerifyResult:
        """Check, like ``jarsigner -verify -strict``: a signer whose block verifies with
        one of ``public_keys`` and whose .SF it signs, the .SF digests against the
        manifest, and every entry's digest against its content (an entry the
        signature does not cover is a failure). ``signature`` is the signed JAR."""
        try:
            with _open_zip(signature) as zf:
                return VerifyResult(file, signature, *_verify_jar(zf, public_keys, options))
        except (CorruptJar, InvalidManifest) as e:
            return VerifyResult(file, signature, False, e.detail)


def _verify_jar(
    zf: zipfile.ZipFile, public_keys: Sequence[PublicKey], options: SignOptions
) -> tuple[bool, str]:
    manifest_info = _manifest_info(zf)
    if manifest_info is None:
        return False, f"not signed: no {MANIFEST_NAME}"
    infos = {i.filename.upper(): i for i in zf.infolist()}
    failures: list[str] = []
    for sf_info in zf.infolist():
        upper = sf_info.filename.upper()
        if not (is_signature_related(upper) and upper.endswith(".SF")):
            continue
        stem = upper[: -len(".SF")]
        block_info = next((infos[stem + e] for e in _BLOCK_EXTENSIONS if stem + e in infos), None)
        if block_info is None:
            failures.append(f"{sf_info.filename} has no signature block")
            continue
        try:
            signed = parse_content_info(_read_small(zf, block_info, MAX_BLOCK_BYTES))
        except ClientError as e:
            failures.append(f"{block_info.filename}: {e.detail}")
            continue
        check = check_signer(signed["content"], public_keys)
        if not check.valid or check.digest_algorithm is None:
            failures.append(f"{block_info.filename}: {check.detail}")
            continue
        sf = _read_small(zf, sf_info, MAX_MANIFEST_BYTES)
        if hash_bytes(sf, check.digest_algorithm).digest != check.message_digest:
            failures.append(f"{sf_info.filename} was changed after it was signed")
            continue
        manifest = _read_small(zf, manifest_info, MAX_MANIFEST_BYTES)
        problem = _check_entries(zf, sf, manifest, sf_info.filename, options)
        if problem is not None:
            return False, problem
        stamp = ", timestamped" if check.timestamped else ""
        return True, f"{check.detail}; signer {sf_info.filename}{stamp}"
    return False, "; ".join(failures) or "not signed: no signature file in META-INF"


def _check_entries(
    zf: zipfile.ZipFile, sf: bytes, manifest: bytes, sf_name: str, options: SignOptions
) -> str | None:
    """Why the .SF does not vouch for every entry's content, or None."""
    sf_main, sf_sections = parse_manifest(sf, sf_name)
    algorithm = next(
        (
            a
            for name, a in _BY_JAR_NAME.items()
            if sf_main.get(f"{name}-Digest-Manifest") is not None
        ),
        None,
    )
    if algorithm is None:
        return f"{sf_name} has no SHA-2 digest of the manifest"
    jar = JAR_DIGEST_NAMES[algorithm]
    main, sections = parse_manifest(manifest)
    by_name = {s.name: s for s in sections}
    whole = sf_main.get(f"{jar}-Digest-Manifest")
    if whole == _b64(hash_bytes(manifest, algorithm).digest):
        covered = set(by_name)
    else:
        # JAR File Specification, "Signature Validation": when the manifest changed
        # (another signer added digests), its main section and each section named
        # in the .SF must still match.
        if sf_main.get(f"{jar}-Digest-Manifest-Main-Attributes") != _b64(
            hash_bytes(main.raw, algorithm).digest
        ):
            return f"the manifest's main attributes changed after {sf_name} was signed"
        covered = set()
        for entry in sf_sections:
            section = by_name.get(entry.name)
            expected = entry.get(f"{jar}-Digest")
            if section is None or expected != _b64(hash_bytes(section.raw, algorithm).digest):
                return f"the manifest section of {entry.name!r} changed after signing"
            covered.add(entry.name)
    attribute = f"{jar}-Digest"
    count = 0
    for info in zf.infolist():
        if info.is_dir() or is_signature_related(info.filename):
            continue
        section = by_name.get(info.filename)
        if info.filename not in covered or section is None or section.get(attribute) is None:
            return f"entry {info.filename!r} is not signed"
        if section.get(attribute) != _b64(_entry_digest(zf, info, algorithm, options)):
            return f"entry {info.filename!r} was changed after signing ({jar} digest mismatch)"
        count += 1
    return None if count else "no signed entries"


__all__ = [
    "CorruptJar",
    "InvalidManifest",
    "JarFormat",
    "NotAJar",
    "Section",
    "encode_section",
    "is_signature_related",
    "parse_manifest",
    "signature_file",
    "signer_name",
    "updated_manifest",
]
