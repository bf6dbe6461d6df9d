"""The ``authenticode`` format with RemoteSigners of a real ``signery serve``
process, checked by the real verifier: ``osslsigncode verify``.

The PE files are made here: byte by byte (PE32 and PE32+, one section, optional
trailing data; no compiler needed, so the format is always tested) and, when the
MinGW-w64 cross compilers are installed, compiled from C (x86_64-w64-mingw32-gcc
for PE32+, i686-w64-mingw32-gcc for PE32). Timestamps come from the same
server's RFC 3161 TSA, whose root is the signing keys' root.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import struct
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from asn1crypto import cms
from cryptography.hazmat.primitives import serialization

from devtools.pe import build_pe
from signery.client import Client, RemoteSigner, request_timestamp
from signery.crypto import HASH_CHUNK
from signery.errors import ClientError
from signery.formats import AuthenticodeFormat, SignOptions, get_format
from signery.formats._authenticode import (
    SPC_NESTED_SIGNATURE_OBJID,
    SPC_RFC3161_OBJID,
    CorruptCertificateTable,
    NotPortableExecutable,
    PeChecksum,
    TruncatedPortableExecutable,
    _signed_data_der,
    nest_signature,
    read_certificates,
    read_layout,
    win_certificate,
)
from signery.formats._signeddata import CertificateRequired, FormatSchemeUnsupported
from signery.protocol import Algorithm, SignatureScheme
from tests.support import (
    SIGNERY,
    Api,
    Installation,
    ServerProcess,
    new_installation,
    require_tool,
)

pytestmark = pytest.mark.e2e

ALGORITHMS = [Algorithm.RSA_2048, Algorithm.RSA_3072, Algorithm.EC_P256, Algorithm.EC_P384]
FORMAT = AuthenticodeFormat()
TOOL_TIMEOUT = 60

HELLO_C = b'#include <stdio.h>\nint main(void) { puts("signed by signery"); return 0; }\n'


# ------------------------------------------------------------------ PE files


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], bytes]:
    """A real PE from the MinGW-w64 cross compiler (``pe32`` or ``pe32plus``)."""
    directory = tmp_path_factory.mktemp("mingw")
    source = directory / "hello.c"
    source.write_bytes(HELLO_C)
    made: dict[str, bytes] = {}

    def compile_for(kind: str) -> bytes:
        if kind not in made:
            compiler = {"pe32": "i686-w64-mingw32-gcc", "pe32plus": "x86_64-w64-mingw32-gcc"}
            exe = directory / f"hello-{kind}.exe"
            subprocess.run(
                [require_tool(compiler[kind]), "-O2", "-o", str(exe), str(source)],
                check=True,
                capture_output=True,
                timeout=TOOL_TIMEOUT,
            )
            made[kind] = exe.read_bytes()
        return made[kind]

    return compile_for


# ------------------------------------------------------------------ server, keys, tools


@pytest.fixture(scope="module", params=["sqlite"])
def installation(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Installation]:
    """One database is enough here: the format sees a RemoteSigner, never the
    database (the key and TSA services run against both in their own tests)."""
    with new_installation(request.param, tmp_path_factory.mktemp("signery-authenticode")) as inst:
        yield inst


@dataclass
class World:
    signers: dict[Algorithm, RemoteSigner]
    uncertified: RemoteSigner
    account: Any
    keys: dict[Algorithm, dict[str, Any]]
    tsa_url: str
    root_pem: Path
    directory: Path

    def timestamper(self, imprint: Any) -> bytes:
        return request_timestamp(self.tsa_url, imprint)[1].token


@pytest.fixture(scope="module")
def world(
    server: ServerProcess, server_api: Api, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    tsg = server_api.create_tsg()
    account = server_api.create_account(tsg["id"])
    keys = {a: server_api.create_key(tsg["id"], a.value, ca="builtin") for a in ALGORITHMS}
    bare = server_api.create_key(tsg["id"], Algorithm.EC_P256.value, ca="none")
    directory = tmp_path_factory.mktemp("authenticode")
    with Client(server.url, credentials=account.credentials()) as client:
        signers = {a: client.signer(k["name"]) for a, k in keys.items()}
        chain = signers[Algorithm.EC_P256].certificate_chain
        assert len(chain) >= 2, "the built-in CA issues a chain up to its root"
        root = directory / "root.pem"
        # The TSA's root is the same built-in root CA (tests/formats brief).
        root.write_bytes(chain[-1].public_bytes(serialization.Encoding.PEM))
        yield World(
            signers,
            client.signer(bare["name"]),
            account,
            keys,
            f"{server.url}/api/v1/tsa",
            root,
            directory,
        )


@dataclass
class Verdict:
    ok: bool
    output: str

    @property
    def signatures(self) -> int:
        found = re.search(r"Number of verified signatures: (\d+)", self.output)
        return int(found.group(1)) if found else 0


def osslsigncode(world: World, file: Path) -> Verdict:
    """``osslsigncode verify`` with the built-in root as the only trust anchor for
    the signer and for the TSA (osslsigncode 2.9 takes them separately)."""
    result = subprocess.run(
        [
            require_tool("osslsigncode"), "verify",
            "-CAfile", str(world.root_pem),
            "-TSA-CAfile", str(world.root_pem),
            "-in", str(file),
        ],
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT,
        check=False,
    )  # fmt: skip
    return Verdict(result.returncode == 0, result.stdout + result.stderr)


def write(directory: Path, name: str, data: bytes) -> Path:
    path = directory / name
    path.write_bytes(data)
    return path


def sign(world: World, algorithm: Algorithm, file: Path, **options: Any) -> Any:
    return FORMAT.sign(world.signers[algorithm], file, file, SignOptions(**options))


def verify(world: World, algorithm: Algorithm, file: Path) -> Any:
    key = world.signers[algorithm].public_key
    return FORMAT.verify(file, file, [key], SignOptions())


def unpatched(data: bytes, layout: Any) -> bytes:
    """``data`` without the two header fields that signing rewrites."""
    checksum, entry = layout.checksum_offset, layout.certificate_entry_offset
    return data[:checksum] + data[checksum + 4 : entry] + data[entry + 8 :]


def embedded_signed_data(file: Path) -> Any:
    """The first WIN_CERTIFICATE's SignedData, parsed independently of the format
    (plain struct reads of the PE/COFF fields)."""
    data = file.read_bytes()
    (pe,) = struct.unpack_from("<I", data, 0x3C)
    (magic,) = struct.unpack_from("<H", data, pe + 24)
    entry = pe + 24 + (112 if magic == 0x20B else 96) + 4 * 8
    offset, size = struct.unpack_from("<II", data, entry)
    assert offset % 8 == 0
    assert offset + size == len(data)
    length, revision, kind = struct.unpack_from("<IHH", data, offset)
    assert (length, revision, kind) == (size, 0x0200, 2)
    return cms.ContentInfo.load(data[offset + 8 : offset + length], strict=False)["content"]


# ------------------------------------------------------------------ basics


def test_registered_under_its_name() -> None:
    assert isinstance(get_format("authenticode"), AuthenticodeFormat)
    exe = Path("dist/app.exe")
    assert FORMAT.default_output(exe, SignOptions()) == exe  # signed in place


@pytest.mark.parametrize("pe32_plus", [False, True], ids=["pe32", "pe32plus"])
def test_checksum_matches_the_linkers_and_the_minimal_pe_parses(
    compiled: Callable[[str], bytes], tmp_path: Path, pe32_plus: bool
) -> None:
    """The checksum is checked against an independent implementation: GNU ld's,
    in every MinGW-w64 executable."""
    data = compiled("pe32plus" if pe32_plus else "pe32")
    file = write(tmp_path, "hello.exe", data)
    with file.open("rb") as f:
        layout = read_layout(f, len(data))
    assert layout.pe32_plus is pe32_plus
    assert not layout.signed
    stored = struct.unpack_from("<I", data, layout.checksum_offset)[0]
    assert stored != 0
    checksum = PeChecksum()
    zeroed = bytearray(data)
    zeroed[layout.checksum_offset : layout.checksum_offset + 4] = bytes(4)
    checksum.add(0, bytes(zeroed[:1001]))  # an odd split: words straddle the chunks
    checksum.add(1001, bytes(zeroed[1001:]))
    assert checksum.value(len(data)) == stored

    built = write(tmp_path, "built.exe", build_pe(pe32_plus=pe32_plus))
    with built.open("rb") as f:
        assert read_layout(f, built.stat().st_size).pe32_plus is pe32_plus


# ------------------------------------------------------------------ interop: osslsigncode


@pytest.mark.interop
@pytest.mark.parametrize("timestamp", [False, True], ids=["plain", "timestamped"])
@pytest.mark.parametrize("pe32_plus", [False, True], ids=["pe32", "pe32plus"])
@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=str)
def test_osslsigncode_verifies_a_built_pe(
    world: World, tmp_path: Path, algorithm: Algorithm, pe32_plus: bool, timestamp: bool
) -> None:
    # An odd-sized overlay: the image is hashed zero-padded to 8 bytes.
    data = build_pe(pe32_plus=pe32_plus, text=b"\xc3" + os.urandom(700), overlay=os.urandom(13))
    file = write(tmp_path, "app.exe", data)
    timestamper = world.timestamper if timestamp else None

    result = sign(world, algorithm, file, timestamper=timestamper)

    assert result.output == file
    assert result.timestamped is timestamp
    assert result.key_version == 1
    assert result.scheme is (
        SignatureScheme.RSA_PKCS1V15 if algorithm.is_rsa else SignatureScheme.ECDSA
    )
    signed = file.read_bytes()
    with file.open("rb") as f:
        layout = read_layout(f, len(signed))
    # Only the CheckSum and the Certificate Table entry change; the table follows
    # the image after zero padding to 8 bytes.
    assert unpatched(signed[: len(data)], layout) == unpatched(data, layout)
    assert signed[len(data) : layout.table_offset] == bytes(layout.table_offset - len(data))
    assert layout.table_offset == len(data) + 3
    assert len(signed) % 8 == 0
    verdict = osslsigncode(world, file)
    assert verdict.ok, verdict.output
    assert verdict.signatures == 1
    assert f"Message digest algorithm: {result.digest_algorithm.value.upper()}" in verdict.output
    assert "MISMATCH" not in verdict.output, "osslsigncode recomputes the PE checksum"
    if timestamp:
        assert "Timestamp Server Signature verification: ok" in verdict.output, verdict.output
    else:
        assert "Timestamp is not available" in verdict.output
    ours = verify(world, algorithm, file)
    assert ours.valid, ours.detail
    assert ("timestamped" in ours.detail) is timestamp


@pytest.mark.interop
@pytest.mark.parametrize("kind", ["pe32", "pe32plus"])
@pytest.mark.parametrize("algorithm", [Algorithm.RSA_3072, Algorithm.EC_P256], ids=str)
def test_osslsigncode_verifies_a_compiled_exe(
    world: World,
    compiled: Callable[[str], bytes],
    tmp_path: Path,
    algorithm: Algorithm,
    kind: str,
) -> None:
    file = write(tmp_path, "hello.exe", compiled(kind))
    sign(world, algorithm, file, timestamper=world.timestamper)
    verdict = osslsigncode(world, file)
    assert verdict.ok, verdict.output
    assert "Timestamp Server Signature verification: ok" in verdict.output
    assert verify(world, algorithm, file).valid


@pytest.mark.interop
def test_the_signature_has_the_authenticode_structure(world: World, tmp_path: Path) -> None:
    """What osslsigncode does not insist on but Windows does: SignedData v1 with
    [0] EXPLICIT SpcIndirectDataContent, the Authenticode signed attributes, no
    CMS algorithm protection, the whole chain, and the RFC 3161 token over the
    signature value under 1.3.6.1.4.1.311.3.3.1."""
    file = write(tmp_path, "app.exe", build_pe(pe32_plus=True))
    sign(world, Algorithm.EC_P384, file, timestamper=world.timestamper)
    signed_data = embedded_signed_data(file)
    assert signed_data["version"].native == "v1"
    assert signed_data["encap_content_info"]["content_type"].dotted == "1.3.6.1.4.1.311.2.1.4"
    assert signed_data["encap_content_info"]["content"].dump()[:1] == b"\xa0"  # no OCTET STRING
    assert len(signed_data["certificates"]) == len(
        world.signers[Algorithm.EC_P384].certificate_chain
    )
    signer_info = signed_data["signer_infos"][0]
    assert signer_info["digest_algorithm"]["algorithm"].native == "sha384"
    signed = {a["type"].dotted for a in signer_info["signed_attrs"]}
    assert signed == {
        "1.2.840.113549.1.9.3",  # contentType
        "1.2.840.113549.1.9.4",  # messageDigest
        "1.2.840.113549.1.9.5",  # signingTime
        "1.3.6.1.4.1.311.2.1.11",  # SpcStatementType
        "1.3.6.1.4.1.311.2.1.12",  # SpcSpOpusInfo
    }
    (token_attribute,) = signer_info["unsigned_attrs"]
    assert token_attribute["type"].dotted == SPC_RFC3161_OBJID
    token = cms.ContentInfo.load(token_attribute["values"][0].dump())
    tst = token["content"]["encap_content_info"]["content"].parsed
    imprint = tst["message_imprint"]
    assert imprint["hash_algorithm"]["algorithm"].native == "sha384"
    assert (
        imprint["hashed_message"].native == hashlib.sha384(signer_info["signature"].native).digest()
    )


def signature_value(file: Path) -> bytes:
    return bytes(embedded_signed_data(file)["signer_infos"][0]["signature"].native)


def token_signature_value(file: Path) -> bytes:
    signer_info = embedded_signed_data(file)["signer_infos"][0]
    token = cms.ContentInfo.load(signer_info["unsigned_attrs"][0]["values"][0].dump())
    return bytes(token["content"]["signer_infos"][0]["signature"].native)


@pytest.mark.interop
@pytest.mark.parametrize("pe32_plus", [False, True], ids=["pe32", "pe32plus"])
@pytest.mark.parametrize(
    "where",
    [
        pytest.param(lambda file, data, table: 0x40, id="dos-stub"),
        pytest.param(lambda file, data, table: 0x200, id="section-data"),
        pytest.param(lambda file, data, table: table - 3, id="overlay"),
        pytest.param(
            lambda file, data, table: data.index(signature_value(file)) + 5, id="signature"
        ),
        pytest.param(
            lambda file, data, table: data.index(token_signature_value(file)) + 5,
            id="timestamp-token",
        ),
    ],
)
def test_one_tampered_byte_fails_both_verifiers(
    request: pytest.FixtureRequest,
    world: World,
    tmp_path: Path,
    pe32_plus: bool,
    where: Callable[[Path, bytes, int], int],
) -> None:
    file = write(tmp_path, "app.exe", build_pe(pe32_plus=pe32_plus, overlay=b"overlay"))
    sign(world, Algorithm.RSA_2048, file, timestamper=world.timestamper)
    assert osslsigncode(world, file).ok
    data = bytearray(file.read_bytes())
    with file.open("rb") as f:
        table = read_layout(f, len(data)).table_offset
    data[where(file, bytes(data), table)] ^= 0x01
    file.write_bytes(bytes(data))
    verdict = osslsigncode(world, file)
    if "timestamp" in request.node.callspec.id:
        # osslsigncode 2.9 reports a broken timestamp but still exits 0 (it then
        # verifies the signature at the current time); signery verify refuses it.
        assert "Timestamp Server Signature verification: failed" in verdict.output
    else:
        assert not verdict.ok, verdict.output
    ours = verify(world, Algorithm.RSA_2048, file)
    assert not ours.valid, ours.detail


def test_verify_reports_an_unsigned_file_and_another_key(world: World, tmp_path: Path) -> None:
    file = write(tmp_path, "app.exe", build_pe(pe32_plus=True))
    unsigned = verify(world, Algorithm.EC_P256, file)
    assert not unsigned.valid
    assert unsigned.detail == "the file is not signed"
    sign(world, Algorithm.EC_P256, file)
    other = verify(world, Algorithm.EC_P384, file)
    assert not other.valid
    assert "does not verify with the key" in other.detail
    with pytest.raises(ClientError, match="inside"):
        FORMAT.verify(file, tmp_path / "app.exe.sig", [], SignOptions())


# ------------------------------------------------------------------ re-signing, nesting


@pytest.mark.interop
def test_signing_a_signed_file_replaces_the_signature(world: World, tmp_path: Path) -> None:
    file = write(tmp_path, "app.exe", build_pe(pe32_plus=True, overlay=b"x" * 5))
    sign(world, Algorithm.RSA_2048, file, timestamper=world.timestamper)
    sign(world, Algorithm.EC_P256, file)

    verdict = osslsigncode(world, file)
    assert verdict.ok, verdict.output
    assert verdict.signatures == 1
    assert "Timestamp is not available" in verdict.output  # the old signature is gone
    ec_leaf = world.signers[Algorithm.EC_P256].certificate_chain[0]
    assert f"{ec_leaf.serial_number:X}" in verdict.output.replace(":", "")
    assert verify(world, Algorithm.EC_P256, file).valid
    assert not verify(world, Algorithm.RSA_2048, file).valid


@pytest.mark.interop
@pytest.mark.parametrize("size", [0x7F, 0x80, 0x180, 0x1080, 0x10080])
def test_nesting_keeps_every_byte_of_both_signatures(
    world: World, tmp_path: Path, size: int
) -> None:
    """nest_signature splices bytes: the primary's encoding outside its unsigned
    attributes and the nested value are kept verbatim, also for values whose length
    header ends in 0x80 (which asn1crypto 1.5 would take for indefinite-length BER
    and re-encode, wbond/asn1crypto#249, at a cost that grows exponentially with
    the depth of nested signatures)."""
    file = write(tmp_path, "app.exe", build_pe(pe32_plus=True))
    sign(world, Algorithm.EC_P256, file, timestamper=world.timestamper)
    with file.open("rb") as f:
        layout = read_layout(f, file.stat().st_size)
        (table,) = read_certificates(f, layout)
    primary = _signed_data_der(table)
    # SEQUENCE { OCTET STRING } whose total contents length is ``size`` (30 81 80 ...,
    # 30 82 01 80 ...: length headers that end in 0x80).
    inner = next(n for n in range(size, 0, -1) if 1 + len(_der_length(n)) + n == size)
    nested = b"\x30" + _der_length(size) + b"\x04" + _der_length(inner) + bytes(inner)
    result = nest_signature(primary, nested)
    assert nested in result
    again = nest_signature(result, nested)
    assert again.count(nested) == 2
    parsed = cms.ContentInfo.load(again)
    signer = parsed["content"]["signer_infos"][0]
    original = cms.ContentInfo.load(primary)["content"]["signer_infos"][0]
    for field in ("sid", "digest_algorithm", "signed_attrs", "signature_algorithm", "signature"):
        assert signer[field].dump() == original[field].dump(), field
    for field in ("digest_algorithms", "encap_content_info", "certificates"):
        assert (
            parsed["content"][field].dump()
            == cms.ContentInfo.load(primary)["content"][field].dump()
        )


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def test_append_nests_signatures_that_osslsigncode_counts(world: World, tmp_path: Path) -> None:
    file = write(tmp_path, "app.exe", build_pe(pe32_plus=False, overlay=b"abc"))
    sign(world, Algorithm.RSA_2048, file, timestamper=world.timestamper)
    primary = embedded_signed_data(file)["signer_infos"][0]["signed_attrs"].dump()

    sign(world, Algorithm.EC_P384, file, append=True, timestamper=world.timestamper)
    verdict = osslsigncode(world, file)
    assert verdict.ok, verdict.output
    assert verdict.signatures == 2
    assert "Message digest algorithm: SHA256" in verdict.output
    assert "Message digest algorithm: SHA384" in verdict.output

    sign(world, Algorithm.EC_P256, file, append=True)
    verdict = osslsigncode(world, file)
    assert verdict.ok, verdict.output
    assert verdict.signatures == 3

    signer_info = embedded_signed_data(file)["signer_infos"][0]
    assert signer_info["signed_attrs"].dump() == primary, "the primary signature is untouched"
    nested = [
        a for a in signer_info["unsigned_attrs"] if a["type"].dotted == SPC_NESTED_SIGNATURE_OBJID
    ]
    assert len(nested) == 1
    assert len(nested[0]["values"]) == 2
    for algorithm in (Algorithm.RSA_2048, Algorithm.EC_P384, Algorithm.EC_P256):
        result = verify(world, algorithm, file)
        assert result.valid, f"{algorithm}: {result.detail}"
    detail = verify(world, Algorithm.EC_P384, file).detail
    # The nested values are a DER SET OF, sorted by encoding: either may come first.
    assert re.search(r"nested signature [12]: signature valid \(ecdsa, sha384", detail), detail
    assert detail.startswith("signature 1: the signature does not verify with the key")


@pytest.mark.interop
def test_append_to_an_unsigned_file_signs_it(world: World, tmp_path: Path) -> None:
    file = write(tmp_path, "app.exe", build_pe(pe32_plus=True))
    sign(world, Algorithm.EC_P256, file, append=True)
    verdict = osslsigncode(world, file)
    assert verdict.ok, verdict.output
    assert verdict.signatures == 1


@pytest.mark.interop
def test_output_elsewhere_leaves_the_input_and_keeps_its_mode(world: World, tmp_path: Path) -> None:
    data = build_pe(pe32_plus=True)
    file = write(tmp_path, "app.exe", data)
    file.chmod(0o750)
    out = tmp_path / "signed" / "app.exe"
    out.parent.mkdir()
    result = FORMAT.sign(world.signers[Algorithm.EC_P256], file, out, SignOptions())
    assert result.output == out
    assert file.read_bytes() == data
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    assert osslsigncode(world, out).ok
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.exe", "signed"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["app.exe"]


@pytest.mark.interop
def test_a_large_pe_is_streamed_in_chunks(world: World, tmp_path: Path) -> None:
    text = b"\xc3" + os.urandom(3 * HASH_CHUNK + 1234)
    file = write(tmp_path, "big.exe", build_pe(pe32_plus=True, text=text))
    size = file.stat().st_size
    progress: list[int] = []
    sign(world, Algorithm.EC_P256, file, progress=progress.append)
    assert sum(progress) == size
    assert max(progress) == HASH_CHUNK
    assert osslsigncode(world, file).ok
    checked: list[int] = []
    assert FORMAT.verify(
        file,
        file,
        [world.signers[Algorithm.EC_P256].public_key],
        SignOptions(progress=checked.append),
    ).valid
    assert sum(checked) == size


# ------------------------------------------------------------------ refusals


def corrupt_table(
    pe32_plus: bool, offset_delta: int = 0, trailer: bytes = b"", **fields: int
) -> bytes:
    """A PE with a certificate table whose entry or header is wrong."""
    image = build_pe(pe32_plus=pe32_plus)
    table = bytearray(win_certificate(b"\x30\x03\x02\x01\x01"))
    if "revision" in fields:
        struct.pack_into("<H", table, 4, fields["revision"])
    if "kind" in fields:
        struct.pack_into("<H", table, 6, fields["kind"])
    data = bytearray(image + table + trailer)
    entry = 0x80 + 24 + (112 if pe32_plus else 96) + 32
    offset = fields.get("offset", len(image)) + offset_delta
    struct.pack_into("<II", data, entry, offset, fields.get("size", len(table)))
    return bytes(data)


REFUSED_FILES: list[Any] = [
    pytest.param(b"#!/bin/sh\necho not a PE\n", NotPortableExecutable, id="text"),
    pytest.param(b"", NotPortableExecutable, id="empty"),
    pytest.param(
        b"MZ" + bytes(0x3A) + struct.pack("<I", 0x40) + b"\xcd\x21" * 64,
        NotPortableExecutable,
        id="mz-without-pe",
    ),
    pytest.param(
        build_pe(pe32_plus=True)[:0x150], TruncatedPortableExecutable, id="cut-in-headers"
    ),
    pytest.param(
        build_pe(pe32_plus=False, text=bytes(0x600))[:0x500],
        TruncatedPortableExecutable,
        id="cut-in-section",
    ),
    pytest.param(b"MZ" + bytes(20), TruncatedPortableExecutable, id="cut-in-dos-header"),
    pytest.param(corrupt_table(True, offset_delta=64), CorruptCertificateTable, id="beyond-eof"),
    pytest.param(corrupt_table(True, offset=0x200), CorruptCertificateTable, id="overlaps"),
    pytest.param(corrupt_table(False, revision=0x0100), CorruptCertificateTable, id="revision"),
    pytest.param(corrupt_table(False, kind=1), CorruptCertificateTable, id="type"),
    pytest.param(corrupt_table(True, offset=0), CorruptCertificateTable, id="size-without-offset"),
    pytest.param(corrupt_table(True, trailer=bytes(8)), CorruptCertificateTable, id="not-at-end"),
]


@pytest.mark.parametrize(("data", "error"), REFUSED_FILES)
def test_a_bad_file_is_refused_untouched_before_anything_is_sent(
    world: World, server_api: Api, tmp_path: Path, data: bytes, error: type[ClientError]
) -> None:
    file = write(tmp_path, "bad.exe", data)
    before = server_api.last_seq()
    with pytest.raises(error) as refused:
        sign(world, Algorithm.EC_P256, file)
    assert refused.value.code in {
        "not_a_pe_file",
        "pe_file_truncated",
        "pe_certificate_table_corrupt",
    }
    assert refused.value.code == error.code
    assert file.read_bytes() == data
    assert [p.name for p in tmp_path.iterdir()] == ["bad.exe"]
    assert server_api.last_seq() == before, "nothing may reach the server"
    if data.startswith(b"MZ") and len(data) > 0x100:
        result = verify(world, Algorithm.EC_P256, file)
        assert not result.valid
        assert error.code in result.detail


def test_append_to_a_signature_that_is_not_signed_data_is_refused(
    world: World, tmp_path: Path
) -> None:
    data = corrupt_table(True)  # a well-formed table holding an INTEGER, not SignedData
    file = write(tmp_path, "app.exe", data)
    with pytest.raises(CorruptCertificateTable, match="not a PKCS#7 SignedData"):
        sign(world, Algorithm.EC_P256, file, append=True)
    assert file.read_bytes() == data
    # Replacing it is fine: the old table is dropped, and the result verifies.
    sign(world, Algorithm.EC_P256, file)
    assert osslsigncode(world, file).ok


@pytest.mark.parametrize(
    ("signer", "options", "error"),
    [
        pytest.param("uncertified", {}, CertificateRequired, id="no-certificate"),
        pytest.param(
            Algorithm.RSA_2048,
            {"scheme": SignatureScheme.RSA_PSS},
            FormatSchemeUnsupported,
            id="rsa-pss",
        ),
    ],
)
def test_a_key_that_cannot_sign_authenticode_is_refused_before_anything_is_sent(
    world: World,
    server_api: Api,
    tmp_path: Path,
    signer: Any,
    options: dict[str, Any],
    error: type[ClientError],
) -> None:
    data = build_pe(pe32_plus=True)
    file = write(tmp_path, "app.exe", data)
    remote = world.uncertified if signer == "uncertified" else world.signers[signer]
    before = server_api.last_seq()
    with pytest.raises(error) as refused:
        FORMAT.sign(remote, file, file, SignOptions(timestamper=world.timestamper, **options))
    assert refused.value.code in {"certificate_required", "format_scheme_unsupported"}
    assert file.read_bytes() == data
    assert [p.name for p in tmp_path.iterdir()] == ["app.exe"]
    assert server_api.last_seq() == before


# ------------------------------------------------------------------ the CLI


@pytest.mark.interop
def test_cli_signs_several_files_and_reports_the_one_that_is_not_a_pe(
    world: World, server: ServerProcess, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    key_file = tmp_path / "account.pem"
    key_file.write_text(world.account.private_key_pem)
    key_file.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIGNERY_")}
    env.update({"SIGNERY_HOME": str(home), "NO_COLOR": "1", "COLUMNS": "200"})

    def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [SIGNERY, *map(str, args)],
            env=env,
            capture_output=True,
            text=True,
            timeout=TOOL_TIMEOUT,
            check=False,
        )

    login = run(
        "login", "--server", server.url,
        "--client-id", world.account.client_id, "--key-file", key_file,
    )  # fmt: skip
    assert login.returncode == 0, login.stderr
    pe32 = write(tmp_path, "tool32.exe", build_pe(pe32_plus=False, overlay=b"1"))
    pe64 = write(tmp_path, "tool64.dll", build_pe(pe32_plus=True))
    notes = b"release notes, not a PE\n"
    text = write(tmp_path, "notes.exe", notes)
    key = world.keys[Algorithm.RSA_3072]["name"]

    signed = run(
        "sign", "--key", key, "--format", "authenticode", "--timestamp", world.tsa_url,
        pe32, text, pe64,
    )  # fmt: skip

    assert signed.returncode == 1, signed.stdout + signed.stderr
    assert "Traceback" not in signed.stderr
    assert f"failed {text}: not_a_pe_file" in signed.stderr
    for exe in (pe32, pe64):
        assert f"signed {exe} -> {exe}" in signed.stdout
        verdict = osslsigncode(world, exe)
        assert verdict.ok, verdict.output
        assert "Timestamp Server Signature verification: ok" in verdict.output
    assert text.read_bytes() == notes
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == [
        "account.pem",
        "notes.exe",
        "tool32.exe",
        "tool64.dll",
    ]

    checked = run("verify", "--format", "authenticode", "--key", key, pe32, pe64)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.count("OK") == 2
