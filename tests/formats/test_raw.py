"""The ``raw`` signature format with RemoteSigners of a real ``signery serve``
process, and the real verifier for bare signatures: ``openssl dgst -verify``."""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from signery.client import Client, RemoteSigner
from signery.crypto import HASH_CHUNK
from signery.errors import ClientError, SchemeNotAllowed
from signery.formats import RawFormat, SignOptions, get_format
from signery.protocol import Algorithm, DigestAlgorithm, SignatureScheme
from tests.support import Api, ServerProcess, require_tool

pytestmark = pytest.mark.e2e

ALGORITHMS = [Algorithm.EC_P256, Algorithm.EC_P521, Algorithm.RSA_2048]
# What `openssl dgst` must be told for each key's default digest and scheme.
OPENSSL_DIGEST = {
    Algorithm.EC_P256: "-sha256",
    Algorithm.EC_P521: "-sha512",
    Algorithm.RSA_2048: "-sha256",
}
RAW = RawFormat()


@pytest.fixture(scope="module")
def signers(server: ServerProcess, server_api: Api) -> Iterator[dict[Algorithm, RemoteSigner]]:
    tsg = server_api.create_tsg()
    account = server_api.create_account(tsg["id"])
    keys = {a: server_api.create_key(tsg["id"], a.value, ca="none") for a in ALGORITHMS}
    with Client(server.url, credentials=account.credentials()) as client:
        yield {a: client.signer(key["name"]) for a, key in keys.items()}


@pytest.fixture
def ec(signers: dict[Algorithm, RemoteSigner]) -> RemoteSigner:
    return signers[Algorithm.EC_P256]


def public_pem(signer: RemoteSigner, directory: Path) -> Path:
    path = directory / f"{signer.key_name}.pub.pem"
    path.write_bytes(
        signer.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


def openssl_verify(digest: str, public_key: Path, signature: Path, file: Path) -> str:
    command = [require_tool("openssl"), "dgst", digest, "-verify", str(public_key)]
    result = subprocess.run(
        [*command, "-signature", str(signature), str(file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return (result.stdout + result.stderr).strip() if result.returncode else result.stdout.strip()


def signed_file(signer: RemoteSigner, directory: Path, data: bytes) -> tuple[Path, Path]:
    file = directory / "artifact.bin"
    file.write_bytes(data)
    output = RAW.default_output(file, SignOptions())
    RAW.sign(signer, file, output, SignOptions())
    return file, output


def test_registered_under_its_name() -> None:
    assert isinstance(get_format("raw"), RawFormat)
    assert RAW.default_output(Path("dist/app.tar.gz"), SignOptions()) == Path("dist/app.tar.gz.sig")


# ------------------------------------------------------------------ sign / verify


@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=str)
def test_sign_then_verify_roundtrip(
    signers: dict[Algorithm, RemoteSigner], tmp_path: Path, algorithm: Algorithm
) -> None:
    signer = signers[algorithm]
    data = os.urandom(10_000)
    file = tmp_path / "app.bin"
    file.write_bytes(data)
    output = tmp_path / "app.bin.sig"

    result = RAW.sign(signer, file, output, SignOptions())

    expected_digest = {Algorithm.EC_P521: "sha512"}.get(algorithm, "sha256")
    assert result.file == file
    assert result.output == output
    assert result.key_name == signer.key_name
    assert result.key_version == 1
    assert result.digest_algorithm.value == expected_digest
    assert result.digest == hashlib.new(expected_digest, data).hexdigest()
    assert result.scheme is (
        SignatureScheme.RSA_PKCS1V15 if algorithm.is_rsa else SignatureScheme.ECDSA
    )
    # The raw format writes exactly the signature octets (verified just below).
    assert 0 < len(output.read_bytes()) <= 512
    verified = RAW.verify(file, output, [signer.public_key], SignOptions())
    assert verified.valid, verified.detail
    assert verified.file == file
    assert verified.signature == output


def test_sign_with_pss_verifies_only_as_pss(
    signers: dict[Algorithm, RemoteSigner], tmp_path: Path
) -> None:
    signer = signers[Algorithm.RSA_2048]
    file = tmp_path / "pss.bin"
    file.write_bytes(b"pss payload")
    output = RAW.default_output(file, SignOptions())
    pss = SignOptions(scheme=SignatureScheme.RSA_PSS)
    assert RAW.sign(signer, file, output, pss).scheme is SignatureScheme.RSA_PSS
    assert RAW.verify(file, output, [signer.public_key], pss).valid
    assert not RAW.verify(file, output, [signer.public_key], SignOptions()).valid


def test_output_is_written_atomically_without_leftovers(ec: RemoteSigner, tmp_path: Path) -> None:
    file = tmp_path / "app.bin"
    file.write_bytes(b"first")
    output = RAW.default_output(file, SignOptions())
    output.write_bytes(b"an old signature that must be replaced")
    RAW.sign(ec, file, output, SignOptions())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.bin", "app.bin.sig"]
    assert RAW.verify(file, output, [ec.public_key], SignOptions()).valid


def test_refused_signature_leaves_the_old_output_untouched(
    ec: RemoteSigner, tmp_path: Path
) -> None:
    file, output = signed_file(ec, tmp_path, b"signed once")
    before = output.read_bytes()
    with pytest.raises(SchemeNotAllowed):
        RAW.sign(ec, file, output, SignOptions(scheme=SignatureScheme.RSA_PSS))
    assert output.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact.bin", "artifact.bin.sig"]


def test_verify_fails_for_a_modified_file(ec: RemoteSigner, tmp_path: Path) -> None:
    file, output = signed_file(ec, tmp_path, b"original bytes")
    file.write_bytes(b"original bytez")
    result = RAW.verify(file, output, [ec.public_key], SignOptions())
    assert not result.valid
    assert "does not verify" in result.detail


@pytest.mark.parametrize(
    "keep",
    [
        pytest.param(lambda n: n - 1, id="last-byte-cut"),
        pytest.param(lambda n: n // 2, id="half"),
        pytest.param(lambda n: 1, id="one-byte"),
    ],
)
def test_verify_fails_for_a_truncated_signature(
    signers: dict[Algorithm, RemoteSigner], tmp_path: Path, keep: Any
) -> None:
    for algorithm, signer in signers.items():
        directory = tmp_path / algorithm.value
        directory.mkdir()
        file, output = signed_file(signer, directory, b"truncate me")
        signature = output.read_bytes()
        output.write_bytes(signature[: keep(len(signature))])
        assert not RAW.verify(file, output, [signer.public_key], SignOptions()).valid, algorithm


def test_verify_fails_for_an_empty_or_oversized_signature(ec: RemoteSigner, tmp_path: Path) -> None:
    file, output = signed_file(ec, tmp_path, b"payload")
    output.write_bytes(b"")
    empty = RAW.verify(file, output, [ec.public_key], SignOptions())
    assert not empty.valid
    assert "empty" in empty.detail
    output.write_bytes(b"\x30" * 4096)
    assert not RAW.verify(file, output, [ec.public_key], SignOptions()).valid


def test_verify_fails_with_another_key_and_finds_the_right_one_among_several(
    signers: dict[Algorithm, RemoteSigner], tmp_path: Path
) -> None:
    ec, p521, rsa = (signers[a] for a in ALGORITHMS)
    file, output = signed_file(p521, tmp_path, b"which key?")
    assert not RAW.verify(file, output, [ec.public_key, rsa.public_key], SignOptions()).valid
    found = RAW.verify(
        file, output, [ec.public_key, rsa.public_key, p521.public_key], SignOptions()
    )
    assert found.valid
    assert "key #3" in found.detail
    assert "sha512" in found.detail


def test_verify_of_a_missing_signature_is_a_client_error(ec: RemoteSigner, tmp_path: Path) -> None:
    file = tmp_path / "unsigned.bin"
    file.write_bytes(b"no signature")
    with pytest.raises(ClientError, match="cannot read signature"):
        RAW.verify(file, RAW.default_output(file, SignOptions()), [ec.public_key], SignOptions())


# ------------------------------------------------------------------ interop


@pytest.mark.interop
@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=str)
def test_openssl_dgst_verifies_the_raw_signature(
    signers: dict[Algorithm, RemoteSigner], tmp_path: Path, algorithm: Algorithm
) -> None:
    signer = signers[algorithm]
    file, output = signed_file(signer, tmp_path, os.urandom(20_000))
    key = public_pem(signer, tmp_path)
    digest = OPENSSL_DIGEST[algorithm]
    assert openssl_verify(digest, key, output, file) == "Verified OK"
    # openssl notices a changed file too: the signature covers the file's digest.
    file.write_bytes(file.read_bytes() + b"\0")
    assert openssl_verify(digest, key, output, file) != "Verified OK"


# ------------------------------------------------------------------ large files


@pytest.mark.interop
def test_large_file_is_hashed_in_chunks_with_progress(ec: RemoteSigner, tmp_path: Path) -> None:
    size = 5 * 1024 * 1024 + 12_345
    file = tmp_path / "large.bin"
    chunk = os.urandom(64 * 1024)
    with file.open("wb") as f:
        for _ in range(size // len(chunk)):
            f.write(chunk)
        f.write(chunk[: size % len(chunk)])
    assert file.stat().st_size == size
    output = RAW.default_output(file, SignOptions())

    progress: list[int] = []
    result = RAW.sign(ec, file, output, SignOptions(progress=progress.append))
    assert sum(progress) == size
    assert len(progress) == math.ceil(size / HASH_CHUNK)
    assert max(progress) == HASH_CHUNK
    assert result.digest == hashlib.sha256(file.read_bytes()).hexdigest()

    verified: list[int] = []
    assert RAW.verify(file, output, [ec.public_key], SignOptions(progress=verified.append)).valid
    assert sum(verified) == size
    assert openssl_verify("-sha256", public_pem(ec, tmp_path), output, file) == "Verified OK"


def test_digest_algorithm_option_overrides_the_key_default(
    ec: RemoteSigner, tmp_path: Path
) -> None:
    file = tmp_path / "sha384.bin"
    file.write_bytes(b"explicit digest")
    output = RAW.default_output(file, SignOptions())
    options = SignOptions(digest_algorithm=DigestAlgorithm.SHA384)
    result = RAW.sign(ec, file, output, options)
    assert result.digest == hashlib.sha384(b"explicit digest").hexdigest()
    assert RAW.verify(file, output, [ec.public_key], options).valid
    assert not RAW.verify(file, output, [ec.public_key], SignOptions()).valid
