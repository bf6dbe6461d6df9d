"""The ``jar`` signature format with RemoteSigners of a real ``signery serve``
process, checked by the real verifier: ``jarsigner -verify -strict`` with the
built-in CA's root in a truststore, timestamps from the same server's TSA."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import tracemalloc
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from signery.client import Client, RemoteSigner
from signery.client._timestamp import request_timestamp
from signery.crypto import Hashed
from signery.errors import ClientError
from signery.formats import (
    CorruptJar,
    InvalidManifest,
    JarFormat,
    NotAJar,
    SignOptions,
    Timestamper,
    get_format,
)
from signery.formats._jar import (
    LINE_LIMIT,
    encode_section,
    parse_manifest,
    signer_name,
)
from signery.formats._signeddata import CertificateRequired, FormatSchemeUnsupported
from signery.protocol import Algorithm, SignatureScheme
from tests.support import (
    SIGNERY,
    Account,
    Api,
    Installation,
    ServerProcess,
    new_installation,
    require_tool,
)

pytestmark = pytest.mark.e2e

ALGORITHMS = [Algorithm.RSA_2048, Algorithm.RSA_3072, Algorithm.EC_P256, Algorithm.EC_P384]
JAR_DIGEST = {
    Algorithm.RSA_2048: "SHA-256",
    Algorithm.RSA_3072: "SHA-256",
    Algorithm.EC_P256: "SHA-256",
    Algorithm.EC_P384: "SHA-384",
}
STOREPASS = "truststore-pass"
JAVA_TIMEOUT = 120
JAR = JarFormat()

# The archive every test signs: an existing manifest with custom main attributes
# and a per-entry section (both must survive), deflated and stored entries, a
# directory, and a UTF-8 name long enough to be wrapped in the manifest.
LONG_NAME = "res/" + "données-très-longues-" * 4 + "ü.txt"
ENTRIES: dict[str, tuple[bytes, int]] = {
    "META-INF/": (b"", zipfile.ZIP_STORED),
    "com/example/Main.class": (b"\xca\xfe\xba\xbe" + os.urandom(3000), zipfile.ZIP_DEFLATED),
    "com/example/": (b"", zipfile.ZIP_STORED),
    "res/stored.txt": (b"stored, not compressed\n" * 20, zipfile.ZIP_STORED),
    LONG_NAME: ("UTF-8 name ✓\n".encode() * 50, zipfile.ZIP_DEFLATED),
}
MANIFEST = (
    b"Manifest-Version: 1.0\r\n"
    b"Main-Class: com.example.Main\r\n"
    b"X-Custom-Attribute: kept\r\n"
    b"\r\n"
    b"Name: com/example/Main.class\r\n"
    b"X-Entry-Attribute: also kept\r\n"
    b"\r\n"
)


@pytest.fixture(scope="module")
def installation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installation]:
    # The format runs on the build machine; the database behind the server does
    # not change a byte of a JAR, so one backend (SQLite) is enough here.
    with new_installation("sqlite", tmp_path_factory.mktemp("signery-jar")) as inst:
        yield inst


@dataclass
class World:
    signers: dict[Algorithm, RemoteSigner]
    no_certificate: RemoteSigner
    account: Account
    keys: dict[Algorithm, dict[str, Any]]


@pytest.fixture(scope="module")
def world(server: ServerProcess, server_api: Api) -> Iterator[World]:
    tsg = server_api.create_tsg()
    account = server_api.create_account(tsg["id"])
    keys = {a: server_api.create_key(tsg["id"], a.value, ca="builtin") for a in ALGORITHMS}
    bare = server_api.create_key(tsg["id"], "EC_P256", ca="none")
    with Client(server.url, credentials=account.credentials()) as client:
        yield World(
            {a: client.signer(key["name"]) for a, key in keys.items()},
            client.signer(bare["name"]),
            account,
            keys,
        )


@pytest.fixture(scope="module")
def tsa(server: ServerProcess) -> Timestamper:
    url = f"{server.url}/api/v1/tsa"

    def timestamp(imprint: Hashed) -> bytes:
        return request_timestamp(url, imprint)[1].token

    return timestamp


@pytest.fixture(scope="module")
def truststore(world: World, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A JKS truststore holding only the built-in root CA (the signing keys' and the
    TSA's), the way a Java user trusts a private CA."""
    directory = tmp_path_factory.mktemp("truststore")
    root = next(iter(world.signers.values())).certificate_chain[-1]
    assert root.issuer == root.subject, "the chain must end with the self-signed root"
    pem = directory / "root.pem"
    pem.write_bytes(root.public_bytes(serialization.Encoding.PEM))
    store = directory / "truststore.jks"
    keytool = [require_tool("keytool"), "-importcert", "-noprompt", "-alias", "signery-root"]
    store_options = ["-keystore", str(store), "-storetype", "JKS", "-storepass", STOREPASS]
    subprocess.run(
        [*keytool, "-file", str(pem), *store_options],
        check=True,
        capture_output=True,
        timeout=JAVA_TIMEOUT,
    )
    return store


def make_jar(path: Path, manifest: bytes | None = MANIFEST) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        if manifest is not None:
            z.writestr("META-INF/MANIFEST.MF", manifest, compress_type=zipfile.ZIP_DEFLATED)
        for name, (data, method) in ENTRIES.items():
            z.writestr(name, data, compress_type=method)
    return path


def jarsigner(jar: Path, truststore: Path) -> subprocess.CompletedProcess[str]:
    verify = [require_tool("jarsigner"), "-verify", "-strict", "-verbose", "-certs"]
    return subprocess.run(
        [*verify, "-keystore", str(truststore), "-storepass", STOREPASS, str(jar)],
        capture_output=True,
        text=True,
        timeout=JAVA_TIMEOUT,
        check=False,
    )


def assert_jarsigner_accepts(jar: Path, truststore: Path) -> str:
    result = jarsigner(jar, truststore)
    output = result.stdout + result.stderr
    # -strict: any warning that makes the signature untrustworthy is a nonzero exit
    # (bit 32: a signer not in the keystore; 4: chain not validated; 16: unsigned entries).
    assert result.returncode == 0, output
    assert "jar verified." in output, output
    return output


def assert_jarsigner_rejects(jar: Path, truststore: Path) -> str:
    result = jarsigner(jar, truststore)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "jar verified." not in output, output
    return output


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def b64_digest(name: str, data: bytes) -> str:
    return base64.b64encode(hashlib.new(name.replace("-", "").lower(), data).digest()).decode()


# ------------------------------------------------------------------ names and manifests


def test_registered_under_its_name_and_signs_in_place() -> None:
    assert isinstance(get_format("jar"), JarFormat)
    assert JAR.default_output(Path("dist/app.war"), SignOptions()) == Path("dist/app.war")


@pytest.mark.parametrize(
    ("key_name", "expected"),
    [
        ("release", "RELEASE"),
        ("release-key-2024", "RELEASE-"),
        ("my.key_v2", "MY_KEY_V"),
        ("clé", "CL_"),
        ("straße-key", "STRA_E-K"),
    ],
)
def test_signer_name_follows_jarsigners_alias_rule(key_name: str, expected: str) -> None:
    assert signer_name(key_name) == expected


def test_manifest_lines_wrap_at_72_bytes_between_utf8_characters() -> None:
    value = "é" * 40 + "x" + "€" * 30  # multi-byte characters across every boundary
    section = encode_section([("Name", value), ("SHA-256-Digest", "A" * 44)])
    lines = section.raw.split(b"\r\n")
    assert lines[-2:] == [b"", b""], "a section ends with a blank line"
    assert all(len(line) <= LINE_LIMIT for line in lines)
    assert all(line.startswith(b" ") for line in lines[1:3]), "continuations start with a space"
    for line in lines:
        line.decode("utf-8")  # no line starts or ends inside a character
    main, [parsed] = parse_manifest(b"Manifest-Version: 1.0\r\n\r\n" + section.raw)
    assert parsed.name == value
    assert parsed.raw == section.raw
    assert main.get("manifest-version") == "1.0"


# ------------------------------------------------------------------ interop with jarsigner


@pytest.mark.interop
@pytest.mark.parametrize("timestamped", [False, True], ids=["plain", "timestamped"])
@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=str)
def test_jarsigner_verifies_the_signed_jar(
    world: World,
    tsa: Timestamper,
    truststore: Path,
    tmp_path: Path,
    algorithm: Algorithm,
    timestamped: bool,
) -> None:
    signer = world.signers[algorithm]
    suffix = ("jar", "war", "aar")[ALGORITHMS.index(algorithm) % 3]
    jar = make_jar(tmp_path / f"app.{suffix}")

    options = SignOptions(timestamper=tsa if timestamped else None)
    result = JAR.sign(signer, jar, jar, options)

    assert result.output == jar
    assert result.timestamped is timestamped
    assert result.key_version == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [jar.name], "no temporary file left"
    output = assert_jarsigner_accepts(jar, truststore)
    assert ("Timestamped by" in output) is timestamped, output
    assert f"Digest algorithm: {JAR_DIGEST[algorithm]}" in output
    verified = JAR.verify(jar, jar, [signer.public_key], SignOptions())
    assert verified.valid, verified.detail
    assert ("timestamped" in verified.detail) is timestamped

    base = f"META-INF/{signer_name(signer.key_name)}"
    block = base + (".RSA" if algorithm.is_rsa else ".EC")
    digest = JAR_DIGEST[algorithm]
    with zipfile.ZipFile(jar) as z:
        names = z.namelist()
        # jarsigner's order: the manifest, then the .SF and block, then the rest.
        assert names[:3] == ["META-INF/MANIFEST.MF", base + ".SF", block]
        assert names[3:] == list(ENTRIES)
        for name, (data, method) in ENTRIES.items():
            assert z.read(name) == data
            assert z.getinfo(name).compress_type == method
        manifest = z.read("META-INF/MANIFEST.MF")
        sf = z.read(base + ".SF")
    # Main attributes and the entry's own attribute survive, byte for byte.
    assert manifest.startswith(MANIFEST.split(b"\r\n\r\n")[0] + b"\r\n\r\n")
    main, sections = parse_manifest(manifest)
    by_name = {s.name: s for s in sections}
    assert by_name["com/example/Main.class"].get("X-Entry-Attribute") == "also kept"
    files = {n: d for n, (d, _) in ENTRIES.items() if not n.endswith("/")}
    assert set(by_name) == set(files)
    for name, data in files.items():
        assert by_name[name].get(f"{digest}-Digest") == b64_digest(digest, data)
    assert all(len(line) <= LINE_LIMIT for line in manifest.split(b"\r\n"))
    sf_main, sf_sections = parse_manifest(sf)
    assert sf_main.get("Signature-Version") == "1.0"
    assert sf_main.get(f"{digest}-Digest-Manifest") == b64_digest(digest, manifest)
    assert sf_main.get(f"{digest}-Digest-Manifest-Main-Attributes") == b64_digest(digest, main.raw)
    assert {s.name: s.get(f"{digest}-Digest") for s in sf_sections} == {
        s.name: b64_digest(digest, s.raw) for s in sections
    }


@pytest.mark.interop
def test_rsa_pss_block_is_an_rsa_file_that_jarsigner_accepts(
    world: World, truststore: Path, tmp_path: Path
) -> None:
    signer = world.signers[Algorithm.RSA_2048]
    jar = make_jar(tmp_path / "pss.jar")
    pss = SignOptions(scheme=SignatureScheme.RSA_PSS)
    assert JAR.sign(signer, jar, jar, pss).scheme is SignatureScheme.RSA_PSS
    output = assert_jarsigner_accepts(jar, truststore)
    assert "RSASSA-PSS" in output, output
    with zipfile.ZipFile(jar) as z:
        assert f"META-INF/{signer_name(signer.key_name)}.RSA" in z.namelist()
    assert JAR.verify(jar, jar, [signer.public_key], SignOptions()).valid


def rewrite_entry(jar: Path, name: str, change: Any) -> None:
    """Replace one entry's content (with a correct CRC): what an attacker would do."""
    with zipfile.ZipFile(jar) as z:
        items = [(i, z.read(i)) for i in z.infolist()]
    with zipfile.ZipFile(jar, "w") as z:
        for info, data in items:
            z.writestr(info, change(data) if info.filename == name else data)


def flip_stored_byte(jar: Path, name: str) -> None:
    """Flip one byte of a stored entry inside the file (its CRC no longer matches)."""
    with zipfile.ZipFile(jar) as z:
        info = z.getinfo(name)
    raw = bytearray(jar.read_bytes())
    name_length, extra_length = (
        int.from_bytes(raw[info.header_offset + 26 : info.header_offset + 28], "little"),
        int.from_bytes(raw[info.header_offset + 28 : info.header_offset + 30], "little"),
    )
    raw[info.header_offset + 30 + name_length + extra_length + 5] ^= 0x01
    jar.write_bytes(bytes(raw))


@pytest.mark.interop
@pytest.mark.parametrize("tamper", ["content-one-byte", "raw-byte-in-zip"])
def test_tampering_one_byte_fails_jarsigner_and_verify(
    world: World, truststore: Path, tmp_path: Path, tamper: str
) -> None:
    signer = world.signers[Algorithm.EC_P256]
    jar = make_jar(tmp_path / "tampered.jar")
    JAR.sign(signer, jar, jar, SignOptions())
    if tamper == "content-one-byte":
        rewrite_entry(jar, "res/stored.txt", lambda d: d[:7] + bytes([d[7] ^ 1]) + d[8:])
    else:
        flip_stored_byte(jar, "res/stored.txt")
    output = assert_jarsigner_rejects(jar, truststore)
    assert "res/stored.txt" in output or "CRC" in output or "digest" in output, output
    result = JAR.verify(jar, jar, [signer.public_key], SignOptions())
    assert not result.valid
    assert "res/stored.txt" in result.detail


@pytest.mark.interop
def test_a_second_signer_keeps_the_first_and_resigning_replaces_it(
    world: World, truststore: Path, tmp_path: Path
) -> None:
    rsa, ec = world.signers[Algorithm.RSA_3072], world.signers[Algorithm.EC_P256]
    jar = make_jar(tmp_path / "two.jar")
    JAR.sign(rsa, jar, jar, SignOptions())
    with zipfile.ZipFile(jar) as z:
        first_sections = parse_manifest(z.read("META-INF/MANIFEST.MF"))[1]
    # An entry added after the first signature: only the second signer covers it,
    # and the manifest grows, so the first .SF's whole-manifest digest no longer
    # matches and verifiers fall back to its per-section digests.
    with zipfile.ZipFile(jar, "a") as z:
        z.writestr("com/example/Added.class", b"\xca\xfe\xba\xbe added later")
    JAR.sign(ec, jar, jar, SignOptions())
    JAR.sign(ec, jar, jar, SignOptions())  # the same signer again: replaced, not added
    with zipfile.ZipFile(jar) as z:
        signature_files = sorted(n for n in z.namelist() if n.endswith((".SF", ".RSA", ".EC")))
        manifest = z.read("META-INF/MANIFEST.MF")
    rsa_base = f"META-INF/{signer_name(rsa.key_name)}"
    ec_base = f"META-INF/{signer_name(ec.key_name)}"
    assert signature_files == sorted(
        [rsa_base + ".SF", rsa_base + ".RSA", ec_base + ".SF", ec_base + ".EC"]
    )
    # The first signer's sections are kept byte for byte.
    assert manifest.startswith(MANIFEST.split(b"\r\n\r\n")[0])
    assert all(s.raw in manifest for s in first_sections)
    output = assert_jarsigner_accepts(jar, truststore)
    assert output.count("- Signed by") == 2, output
    assert JAR.verify(jar, jar, [ec.public_key], SignOptions()).valid
    # The first signer still vouches for what it signed, not for the added entry.
    first = JAR.verify(jar, jar, [rsa.public_key], SignOptions())
    assert not first.valid
    assert first.detail == "entry 'com/example/Added.class' is not signed"


def test_large_entries_are_streamed_not_read_whole(world: World, tmp_path: Path) -> None:
    size = 24 * 1024 * 1024
    jar = tmp_path / "big.jar"
    chunk = os.urandom(1024 * 1024)
    with zipfile.ZipFile(jar, "w") as z:
        for name, method in (
            ("big/stored.bin", zipfile.ZIP_STORED),
            ("big/deflated.bin", zipfile.ZIP_DEFLATED),
        ):
            info = zipfile.ZipInfo(name, (2024, 1, 1, 0, 0, 0))
            info.compress_type = method
            with z.open(info, "w") as f:
                for _ in range(size // len(chunk)):
                    f.write(chunk)
    progress: list[int] = []
    tracemalloc.start()
    try:
        JAR.sign(world.signers[Algorithm.EC_P256], jar, jar, SignOptions(progress=progress.append))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Two 24 MiB entries pass through in chunks; reading either whole would show here.
    assert peak < 8 * 1024 * 1024, peak
    with zipfile.ZipFile(jar) as z:
        assert sum(progress) == sum(i.compress_size for i in z.infolist()[3:])
        assert z.getinfo("big/stored.bin").compress_type == zipfile.ZIP_STORED
    assert JAR.verify(jar, jar, [world.signers[Algorithm.EC_P256].public_key], SignOptions()).valid


# ------------------------------------------------------------------ outputs and verify


def test_output_option_writes_a_signed_copy_and_leaves_the_input(
    world: World, tmp_path: Path
) -> None:
    signer = world.signers[Algorithm.EC_P256]
    jar = make_jar(tmp_path / "lib.jar", manifest=None)
    before = jar.read_bytes()
    copy = tmp_path / "lib-signed.jar"
    JAR.sign(signer, jar, copy, SignOptions())
    assert jar.read_bytes() == before
    assert JAR.verify(copy, copy, [signer.public_key], SignOptions()).valid
    with zipfile.ZipFile(copy) as z:
        main, _ = parse_manifest(z.read("META-INF/MANIFEST.MF"))
    # No manifest before: one is made.
    assert main.get("Manifest-Version") == "1.0"
    assert main.get("Created-By")


def test_verify_reports_unsigned_and_wrong_key(world: World, tmp_path: Path) -> None:
    jar = make_jar(tmp_path / "plain.jar")
    unsigned = JAR.verify(jar, jar, [world.signers[Algorithm.EC_P256].public_key], SignOptions())
    assert not unsigned.valid
    assert "not signed" in unsigned.detail
    JAR.sign(world.signers[Algorithm.EC_P256], jar, jar, SignOptions())
    wrong = JAR.verify(jar, jar, [world.signers[Algorithm.EC_P384].public_key], SignOptions())
    assert not wrong.valid
    assert "does not verify" in wrong.detail


def test_an_added_entry_is_reported_unsigned(world: World, tmp_path: Path) -> None:
    signer = world.signers[Algorithm.EC_P256]
    jar = make_jar(tmp_path / "added.jar")
    JAR.sign(signer, jar, jar, SignOptions())
    with zipfile.ZipFile(jar, "a") as z:
        z.writestr("com/example/Evil.class", b"\xca\xfe\xba\xbe")
    result = JAR.verify(jar, jar, [signer.public_key], SignOptions())
    assert not result.valid
    assert "Evil.class" in result.detail
    assert "not signed" in result.detail


# ------------------------------------------------------------------ refusals


def empty_zip(path: Path) -> None:
    with zipfile.ZipFile(path, "w"):
        pass


def duplicated(path: Path) -> None:
    make_jar(path)
    with (
        pytest.warns(UserWarning, match="Duplicate name"),
        zipfile.ZipFile(path, "a") as z,
    ):
        z.writestr("res/stored.txt", b"a second entry with the same name")


def unsafe_name(path: Path) -> None:
    make_jar(path)
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("../outside.txt", b"zip slip")


def bad_manifest(path: Path) -> None:
    make_jar(path, manifest=b"Manifest-Version: 1.0\r\n\r\nNot a name line\r\n\r\n")


def truncated(path: Path) -> None:
    make_jar(path)
    path.write_bytes(path.read_bytes()[:-40])  # the end of central directory is cut


def bad_crc(path: Path) -> None:
    make_jar(path)
    flip_stored_byte(path, "res/stored.txt")


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        pytest.param(
            lambda p: p.write_bytes(b"plain text\n" * 100), NotAJar, "not a zip", id="text"
        ),
        pytest.param(empty_zip, NotAJar, "empty zip", id="empty-zip"),
        pytest.param(duplicated, NotAJar, "appears twice", id="duplicate-name"),
        pytest.param(unsafe_name, NotAJar, "not a safe relative path", id="unsafe-name"),
        pytest.param(bad_manifest, InvalidManifest, "malformed header", id="bad-manifest"),
        pytest.param(truncated, CorruptJar, "damaged zip", id="truncated"),
        pytest.param(bad_crc, CorruptJar, "res/stored.txt", id="bad-crc"),
    ],
)
def test_bad_input_is_refused_and_left_untouched(
    world: World, tmp_path: Path, build: Any, error: type[ClientError], message: str
) -> None:
    jar = tmp_path / "input.jar"
    build(jar)
    before = snapshot(tmp_path)
    with pytest.raises(error, match=message) as raised:
        JAR.sign(world.signers[Algorithm.EC_P256], jar, jar, SignOptions())
    assert raised.value.code in {"not_a_jar", "corrupt_jar", "invalid_manifest"}
    assert snapshot(tmp_path) == before, "input changed or output left behind"


@pytest.mark.parametrize("case", ["no-certificate", "pss-with-timestamp"])
def test_a_key_that_cannot_sign_is_refused_before_the_server_is_asked(
    world: World, server_api: Api, tsa: Timestamper, tmp_path: Path, case: str
) -> None:
    jar = make_jar(tmp_path / "app.jar")
    before = snapshot(tmp_path)
    seq = server_api.last_seq()
    if case == "no-certificate":
        with pytest.raises(CertificateRequired) as raised:
            JAR.sign(world.no_certificate, jar, jar, SignOptions())
        assert raised.value.code == "certificate_required"
    else:
        options = SignOptions(scheme=SignatureScheme.RSA_PSS, timestamper=tsa)
        with pytest.raises(FormatSchemeUnsupported) as raised:
            JAR.sign(world.signers[Algorithm.RSA_2048], jar, jar, options)
        assert raised.value.code == "format_scheme_unsupported"
    assert server_api.events_after(seq) == [], "nothing may reach the server"
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------ the real CLI


@pytest.mark.interop
def test_cli_signs_and_verifies_a_war_against_a_real_server(
    world: World, server: ServerProcess, truststore: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIGNERY_")}
    env.update({"SIGNERY_HOME": str(home), "NO_COLOR": "1", "COLUMNS": "200"})
    key_file = tmp_path / "account.pem"
    key_file.write_text(world.account.private_key_pem)

    def signery(*args: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [SIGNERY, *map(str, args)],
            env=env,
            capture_output=True,
            text=True,
            timeout=JAVA_TIMEOUT,
            check=False,
        )

    login = signery(
        "login", "--server", server.url, "--client-id", world.account.client_id,
        "--key-file", key_file,
    )  # fmt: skip
    assert login.returncode == 0, login.stderr
    war = make_jar(tmp_path / "webapp.war")
    key = world.keys[Algorithm.EC_P384]["name"]
    tsa_url = f"{server.url}/api/v1/tsa"
    signed = signery("sign", "--key", key, "--format", "jar", "--timestamp", tsa_url, war, "--json")
    assert signed.returncode == 0, signed.stderr
    [answer] = json.loads(signed.stdout)
    assert answer["ok"] is True
    assert answer["output"] == str(war)
    assert answer["timestamped"] is True
    assert answer["digest_algorithm"] == "sha384"
    output = assert_jarsigner_accepts(war, truststore)
    assert "Timestamped by" in output
    verified = signery("verify", "--format", "jar", "--key", key, war)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "OK" in verified.stdout

    text = tmp_path / "notes.jar"
    text.write_text("not a zip")
    refused = signery("sign", "--key", key, "--format", "jar", text)
    assert refused.returncode == 1
    assert "not_a_jar" in refused.stderr or "not a zip" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert text.read_text() == "not a zip"
