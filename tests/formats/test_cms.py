"""The ``cms`` format (detached CMS SignedData, ``FILE.p7s``) with RemoteSigners of a
real ``signery serve`` process, checked by the real verifiers: ``openssl cms
-verify`` for the signature and ``openssl ts -verify`` for the embedded RFC 3161
token, which Signery's own TSA (``/api/v1/tsa`` of the same server) issues."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from asn1crypto import cms, pem, tsp  # noqa: F401 - tsp registers TSTInfo
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from signery.client import Client, RemoteSigner, request_timestamp
from signery.crypto import HASH_CHUNK, Hashed
from signery.errors import ClientError, SchemeNotAllowed
from signery.formats import CmsFormat, SignOptions, get_format
from signery.formats._cms import NotACmsSignature, OutputIsInput
from signery.formats._signeddata import (
    ID_AA_TIMESTAMP_TOKEN,
    CertificateRequired,
    FormatSchemeUnsupported,
    KeyChangedWhileSigning,
    SignedDataSpec,
    choose,
)
from signery.protocol import Algorithm, DigestAlgorithm, SignatureScheme
from tests.support import SIGNERY, Api, ServerProcess, require_tool

pytestmark = pytest.mark.e2e

ALGORITHMS = [Algorithm.RSA_2048, Algorithm.RSA_3072, Algorithm.EC_P256, Algorithm.EC_P384]
CMS = CmsFormat()
TIMEOUT = 60


@dataclass
class World:
    server: ServerProcess
    api: Api
    tsg_id: str
    client: Client
    signers: dict[Algorithm, RemoteSigner]
    no_certificate: RemoteSigner
    account_id: str
    account_key_file: Path
    client_id: str
    root: Path  # the built-in root CA: trust anchor of the signing keys and the TSA
    work: Path

    @property
    def tsa_url(self) -> str:
        return f"{self.server.url}/api/v1/tsa"

    def timestamper(self, imprint: Hashed) -> bytes:
        return request_timestamp(self.tsa_url, imprint)[1].token


@pytest.fixture(scope="module")
def world(
    server: ServerProcess, server_api: Api, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    work = tmp_path_factory.mktemp("cms")
    tsg = server_api.create_tsg()
    account = server_api.create_account(tsg["id"])
    keys = {a: server_api.create_key(tsg["id"], a.value, ca="builtin") for a in ALGORITHMS}
    bare = server_api.create_key(tsg["id"], "EC_P256", ca="none")
    key_file = work / "account.pem"
    key_file.write_text(account.private_key_pem)
    key_file.chmod(0o600)
    with Client(server.url, credentials=account.credentials()) as client:
        signers = {a: client.signer(key["name"]) for a, key in keys.items()}
        chain = signers[Algorithm.EC_P256].certificate_chain
        root = work / "root.pem"
        root.write_bytes(chain[-1].public_bytes(serialization.Encoding.PEM))
        yield World(
            server=server,
            api=server_api,
            tsg_id=tsg["id"],
            client=client,
            signers=signers,
            no_certificate=client.signer(bare["name"]),
            account_id=account.id,
            account_key_file=key_file,
            client_id=account.client_id,
            root=root,
            work=work,
        )


def openssl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool("openssl"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def openssl_cms_verify(
    file: Path, signature: Path, root: Path, inform: str = "DER"
) -> subprocess.CompletedProcess[str]:
    """The issue's invocation: the file is the detached content, only the root is
    trusted (the intermediate must come from the signature), any purpose (the
    leaf's only EKU is codeSigning; ECOSYSTEM-FACTS.md)."""
    return openssl(
        "cms", "-verify", "-binary", "-content", file, "-inform", inform, "-in", signature,
        "-CAfile", root, "-purpose", "any", "-out", os.devnull,
    )  # fmt: skip


def assert_openssl_accepts(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Verification successful" in result.stderr


def signer_info(signature: Path) -> Any:
    data = signature.read_bytes()
    if pem.detect(data):
        data = pem.unarmor(data)[2]
    return cms.ContentInfo.load(data)["content"]["signer_infos"][0]


def embedded_token(signature: Path, directory: Path) -> Path:
    """The id-aa-timeStampToken value, as `openssl ts -verify -token_in` reads it."""
    info = signer_info(signature)
    tokens = [
        a["values"][0] for a in info["unsigned_attrs"] if a["type"].dotted == ID_AA_TIMESTAMP_TOKEN
    ]
    assert len(tokens) == 1
    path = directory / f"{signature.name}.token.der"
    path.write_bytes(tokens[0].dump())
    return path


def openssl_ts_verify(
    token: Path, digest: DigestAlgorithm, imprint: bytes, root: Path
) -> subprocess.CompletedProcess[str]:
    return openssl(
        "ts", "-verify", "-token_in", "-in", token, f"-{digest.value}", "-digest", imprint.hex(),
        "-CAfile", root,
    )  # fmt: skip


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_registered_under_its_name() -> None:
    assert isinstance(get_format("cms"), CmsFormat)
    assert CMS.default_output(Path("dist/app.tar.gz"), SignOptions()) == Path("dist/app.tar.gz.p7s")


# ------------------------------------------------------------------ interop


@pytest.mark.interop
@pytest.mark.parametrize("timestamped", [False, True], ids=["plain", "timestamp"])
@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=str)
def test_openssl_verifies_the_signature_and_its_timestamp(
    world: World, tmp_path: Path, algorithm: Algorithm, timestamped: bool
) -> None:
    signer = world.signers[algorithm]
    data = os.urandom(30_000)
    file = write(tmp_path / "app.bin", data)
    output = CMS.default_output(file, SignOptions())
    options = SignOptions(timestamper=world.timestamper if timestamped else None)

    result = CMS.sign(signer, file, output, options)

    digest = DigestAlgorithm.SHA384 if algorithm is Algorithm.EC_P384 else DigestAlgorithm.SHA256
    assert result.digest_algorithm is digest
    assert result.digest == hashlib.new(digest.value, data).hexdigest()
    assert result.scheme is (
        SignatureScheme.RSA_PKCS1V15 if algorithm.is_rsa else SignatureScheme.ECDSA
    )
    assert result.key_version == 1
    assert result.timestamped is timestamped
    assert file.read_bytes() == data, "a detached signature leaves the file alone"

    # What the issue asks the SignedData to hold: detached id-data, the four signed
    # attributes, and the whole chain (leaf, intermediate, root).
    signed_data = cms.ContentInfo.load(output.read_bytes())["content"]
    assert signed_data["encap_content_info"]["content_type"].native == "data"
    assert signed_data["encap_content_info"]["content"].native is None
    certificates = [c.chosen.dump() for c in signed_data["certificates"]]
    chain = [c.public_bytes(serialization.Encoding.DER) for c in signer.certificate_chain]
    # A SET OF: DER sorts it (X.690 §11.6), so compare without order.
    assert sorted(certificates) == sorted(chain)
    assert len(chain) == 3
    info = signed_data["signer_infos"][0]
    attributes = {a["type"].native: a["values"][0].native for a in info["signed_attrs"]}
    assert set(attributes) == {
        "content_type",
        "message_digest",
        "signing_time",
        "cms_algorithm_protection",
    }
    assert attributes["message_digest"] == hashlib.new(digest.value, data).digest()

    assert_openssl_accepts(openssl_cms_verify(file, output, world.root))
    ours = CMS.verify(file, output, [signer.public_key], SignOptions())
    assert ours.valid, ours.detail
    assert ("timestamped 20" in ours.detail) is timestamped
    assert ("not timestamped" in ours.detail) is not timestamped

    if timestamped:
        # RFC 3161 Appendix A: the token's imprint is the hash of the signature value.
        token = embedded_token(output, tmp_path)
        signature_value = info["signature"].native
        imprint = hashlib.new(digest.value, signature_value).digest()
        checked = openssl_ts_verify(token, digest, imprint, world.root)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert "Verification: OK" in checked.stdout
        # openssl really compares the imprint: the file's digest is not what was stamped.
        other = openssl_ts_verify(
            token, digest, hashlib.new(digest.value, data).digest(), world.root
        )
        assert other.returncode != 0
        assert "Verification: OK" not in other.stdout
    else:
        assert info["unsigned_attrs"].native is None

    # One changed byte of the file: both verifiers refuse.
    flip_one_byte(file)
    tampered = openssl_cms_verify(file, output, world.root)
    assert tampered.returncode != 0
    assert "Verification successful" not in tampered.stderr
    assert "content verify error" in tampered.stderr
    refused = CMS.verify(file, output, [signer.public_key], SignOptions())
    assert not refused.valid
    assert "not the signed one" in refused.detail


@pytest.mark.interop
@pytest.mark.parametrize("timestamped", [False, True], ids=["plain", "timestamp"])
def test_rsa_pss_signature_verifies_with_openssl(
    world: World, tmp_path: Path, timestamped: bool
) -> None:
    """PSS is fine in plain CMS. With a timestamp too: the token is signed by the
    TSA's own (ECDSA) key, so the PSS refusal of timestamp verifiers does not
    apply; `openssl ts -verify` accepts the token over a PSS signature value."""
    signer = world.signers[Algorithm.RSA_3072]
    file = write(tmp_path / "pss.bin", b"pss payload\n" * 100)
    output = CMS.default_output(file, SignOptions())
    options = SignOptions(
        scheme=SignatureScheme.RSA_PSS, timestamper=world.timestamper if timestamped else None
    )

    result = CMS.sign(signer, file, output, options)

    assert result.scheme is SignatureScheme.RSA_PSS
    assert result.timestamped is timestamped
    info = signer_info(output)
    assert info["signature_algorithm"]["algorithm"].native == "rsassa_pss"
    assert_openssl_accepts(openssl_cms_verify(file, output, world.root))
    assert CMS.verify(file, output, [signer.public_key], SignOptions()).valid
    if timestamped:
        imprint = hashlib.sha256(info["signature"].native).digest()
        token = embedded_token(output, tmp_path)
        checked = openssl_ts_verify(token, DigestAlgorithm.SHA256, imprint, world.root)
        assert "Verification: OK" in checked.stdout, checked.stdout + checked.stderr


@pytest.mark.interop
def test_pem_output_verifies_with_openssl(world: World, tmp_path: Path) -> None:
    signer = world.signers[Algorithm.EC_P256]
    file = write(tmp_path / "doc.txt", b"PEM, please\n")
    output = CMS.default_output(file, SignOptions())
    CMS.sign(signer, file, output, SignOptions(pem=True))

    text = output.read_text("ascii")
    assert text.startswith("-----BEGIN CMS-----\n")  # RFC 7468 §9
    assert text.endswith("-----END CMS-----\n")
    assert_openssl_accepts(openssl_cms_verify(file, output, world.root, inform="PEM"))
    assert CMS.verify(file, output, [signer.public_key], SignOptions()).valid
    # The older label that openssl's `-outform PEM` of PKCS#7 writes is read as well.
    output.write_bytes(pem.armor("PKCS7", pem.unarmor(output.read_bytes())[2]))
    assert CMS.verify(file, output, [signer.public_key], SignOptions()).valid


@pytest.mark.interop
def test_digest_algorithm_option_overrides_the_key_default(world: World, tmp_path: Path) -> None:
    signer = world.signers[Algorithm.EC_P256]
    file = write(tmp_path / "sha512.bin", b"explicit digest")
    output = CMS.default_output(file, SignOptions())
    options = SignOptions(digest_algorithm=DigestAlgorithm.SHA512)
    result = CMS.sign(signer, file, output, options)
    assert result.digest == hashlib.sha512(b"explicit digest").hexdigest()
    assert signer_info(output)["digest_algorithm"]["algorithm"].native == "sha512"
    assert_openssl_accepts(openssl_cms_verify(file, output, world.root))
    assert CMS.verify(file, output, [signer.public_key], options).valid
    expecting_sha256 = CMS.verify(
        file, output, [signer.public_key], SignOptions(digest_algorithm=DigestAlgorithm.SHA256)
    )
    assert not expecting_sha256.valid
    assert "signed with sha512, not sha256" in expecting_sha256.detail


@pytest.mark.interop
def test_large_file_is_hashed_in_chunks_with_progress(world: World, tmp_path: Path) -> None:
    signer = world.signers[Algorithm.EC_P256]
    size = 2 * HASH_CHUNK + 4321
    file = tmp_path / "large.bin"
    with file.open("wb") as f:
        for _ in range(size // 65536):
            f.write(os.urandom(65536))
        f.write(os.urandom(size % 65536))
    progress: list[int] = []
    CMS.sign(
        signer, file, CMS.default_output(file, SignOptions()), SignOptions(progress=progress.append)
    )
    assert progress == [HASH_CHUNK, HASH_CHUNK, 4321]
    checked: list[int] = []
    options = SignOptions(progress=checked.append)
    assert CMS.verify(
        file, CMS.default_output(file, SignOptions()), [signer.public_key], options
    ).valid
    assert sum(checked) == size
    assert_openssl_accepts(
        openssl_cms_verify(file, CMS.default_output(file, SignOptions()), world.root)
    )


# ------------------------------------------------------------------ refusals


def test_key_without_certificate_is_refused_before_any_sign_request(
    world: World, tmp_path: Path
) -> None:
    file = write(tmp_path / "app.bin", b"no certificate, no cms")
    seq = world.api.last_seq()
    usage = world.api.usage()

    with pytest.raises(CertificateRequired) as refused:
        CMS.sign(world.no_certificate, file, CMS.default_output(file, SignOptions()), SignOptions())

    assert refused.value.code == "certificate_required"
    assert world.no_certificate.key_name in refused.value.detail
    assert world.api.events_after(seq) == [], "nothing may reach the server"
    assert world.api.usage() == usage
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.bin"]
    assert file.read_bytes() == b"no certificate, no cms"


def test_key_changed_while_signing_writes_nothing(world: World, tmp_path: Path) -> None:
    """The key is listed (its chain is what the SignerInfo will name), then an
    administrator renews its certificate before the signature is made: the
    signature would name a certificate that is no longer the key's, so nothing is
    written. Listing the key again gives a signer that works."""
    key = world.api.create_key(world.tsg_id, "EC_P256", ca="builtin")
    stale = world.client.signer(key["name"])
    renewed = world.api.ok(
        world.api.http.post(f"/api/v1/keys/{key['id']}/renew", json={}, headers=world.api.admin)
    )
    assert renewed["certificate_chain"][0] != key["certificate_chain"][0]
    file = write(tmp_path / "app.bin", b"signed across a renewal")
    output = CMS.default_output(file, SignOptions())
    output.write_bytes(b"previous signature")

    with pytest.raises(KeyChangedWhileSigning) as refused:
        CMS.sign(stale, file, output, SignOptions())

    assert refused.value.code == "key_changed_while_signing"
    assert output.read_bytes() == b"previous signature"
    assert file.read_bytes() == b"signed across a renewal"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.bin", "app.bin.p7s"]

    fresh = world.client.signer(key["name"])
    CMS.sign(fresh, file, output, SignOptions())
    assert CMS.verify(file, output, [fresh.public_key], SignOptions()).valid
    assert_openssl_accepts(openssl_cms_verify(file, output, world.root))


def test_output_that_is_the_input_is_refused(world: World, tmp_path: Path) -> None:
    file = write(tmp_path / "app.bin", b"do not overwrite me")
    with pytest.raises(OutputIsInput):
        CMS.sign(world.signers[Algorithm.EC_P256], file, tmp_path / "." / "app.bin", SignOptions())
    assert file.read_bytes() == b"do not overwrite me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.bin"]


def test_an_existing_signature_is_replaced_without_leftovers(world: World, tmp_path: Path) -> None:
    signer = world.signers[Algorithm.EC_P256]
    file = write(tmp_path / "app.bin", b"sign me twice")
    output = CMS.default_output(file, SignOptions())
    output.write_bytes(b"an old signature that must be replaced")
    CMS.sign(signer, file, output, SignOptions())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.bin", "app.bin.p7s"]
    assert CMS.verify(file, output, [signer.public_key], SignOptions()).valid


def test_pss_for_an_ec_key_is_refused_before_sending_and_writes_nothing(
    world: World, tmp_path: Path
) -> None:
    file = write(tmp_path / "app.bin", b"wrong scheme")
    with pytest.raises(SchemeNotAllowed) as refused:
        CMS.sign(
            world.signers[Algorithm.EC_P256],
            file,
            CMS.default_output(file, SignOptions()),
            SignOptions(scheme=SignatureScheme.RSA_PSS),
        )
    assert refused.value.code == "scheme_not_allowed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.bin"]


# ------------------------------------------------------------------ verify


@pytest.fixture(scope="module")
def stamped_pair(world: World, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two files with timestamped P-256 signatures, for tests that edit copies."""
    directory = tmp_path_factory.mktemp("stamped")
    signer = world.signers[Algorithm.EC_P256]
    files = []
    for name in ("a.bin", "b.bin"):
        file = write(directory / name, f"stamped {name}\n".encode())
        CMS.sign(
            signer,
            file,
            CMS.default_output(file, SignOptions()),
            SignOptions(timestamper=world.timestamper),
        )
        files.append(file)
    return files


def test_a_timestamp_token_for_another_signature_is_invalid(
    world: World, stamped_pair: list[Path], tmp_path: Path
) -> None:
    """Unsigned attributes are not covered by the signature, so openssl cms accepts
    a token moved over from another signature; our verify checks the imprint."""
    a, b = stamped_pair
    info_a = cms.ContentInfo.load(CMS.default_output(a, SignOptions()).read_bytes())
    info_b = cms.ContentInfo.load(CMS.default_output(b, SignOptions()).read_bytes())
    signer_a = info_a["content"]["signer_infos"][0]
    signer_a["unsigned_attrs"] = info_b["content"]["signer_infos"][0]["unsigned_attrs"]
    forged = write(tmp_path / "a.bin.p7s", info_a.dump())

    assert_openssl_accepts(openssl_cms_verify(a, forged, world.root))
    result = CMS.verify(a, forged, [world.signers[Algorithm.EC_P256].public_key], SignOptions())
    assert not result.valid
    assert result.detail == "the timestamp token does not cover this signature"


def test_a_garbled_timestamp_token_is_not_a_cms_signature(
    world: World, stamped_pair: list[Path], tmp_path: Path
) -> None:
    """The token is decoded with the rest (parse_content_info), not later: same-length
    garbage inside it keeps the outer DER intact and is still refused up front."""
    a, _ = stamped_pair
    der = CMS.default_output(a, SignOptions()).read_bytes()
    token = embedded_token(CMS.default_output(a, SignOptions()), tmp_path).read_bytes()
    assert der.count(token) == 1
    garbled = token[:4] + b"\xff" * (len(token) - 4)  # keep the token's own header
    signature = write(tmp_path / "garbled.p7s", der.replace(token, garbled))
    with pytest.raises(NotACmsSignature):
        CMS.verify(a, signature, [world.signers[Algorithm.EC_P256].public_key], SignOptions())


def test_pss_with_a_timestamp_stays_refused_for_other_formats(world: World) -> None:
    """cms opts in to PSS with a timestamp; the shared default still refuses it
    (Authenticode, and JAR unless it opts in), before anything is sent."""
    rsa = world.signers[Algorithm.RSA_2048]
    options = SignOptions(scheme=SignatureScheme.RSA_PSS, timestamper=world.timestamper)
    with pytest.raises(FormatSchemeUnsupported, match="with a timestamp"):
        choose(rsa, options, SignedDataSpec("jar"))
    with pytest.raises(FormatSchemeUnsupported):
        choose(
            rsa,
            options,
            SignedDataSpec("authenticode", allow_pss=False, allow_pss_with_timestamp=True),
        )
    assert choose(rsa, options, SignedDataSpec("cms", allow_pss_with_timestamp=True)) == (
        DigestAlgorithm.SHA256,
        SignatureScheme.RSA_PSS,
    )


def test_verify_with_another_key_is_invalid(world: World, stamped_pair: list[Path]) -> None:
    a, _ = stamped_pair
    others = [world.signers[x].public_key for x in (Algorithm.RSA_2048, Algorithm.EC_P384)]
    result = CMS.verify(a, CMS.default_output(a, SignOptions()), others, SignOptions())
    assert not result.valid
    assert "does not verify with the key" in result.detail
    found = CMS.verify(
        a,
        CMS.default_output(a, SignOptions()),
        [*others, world.signers[Algorithm.EC_P256].public_key],
        SignOptions(),
    )
    assert found.valid
    assert "key #3" in found.detail


def test_signature_of_another_file_is_invalid(world: World, stamped_pair: list[Path]) -> None:
    a, b = stamped_pair
    result = CMS.verify(
        a,
        CMS.default_output(b, SignOptions()),
        [world.signers[Algorithm.EC_P256].public_key],
        SignOptions(),
    )
    assert not result.valid
    assert "digest is not the signed one" in result.detail


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\x30\x82\xff\xff garbage", id="truncated-der"),
        pytest.param(os.urandom(300), id="random"),
        pytest.param(b"-----BEGIN CMS-----\n!!!\n-----END CMS-----\n", id="bad-pem"),
        pytest.param(pem.armor("CERTIFICATE", b"\x30\x00"), id="other-pem-label"),
        # A ContentInfo that is not SignedData (id-data).
        pytest.param(cms.ContentInfo({"content_type": "data", "content": b"x"}).dump(), id="data"),
    ],
)
def test_verify_of_garbage_is_a_clear_error(
    world: World, stamped_pair: list[Path], tmp_path: Path, content: bytes
) -> None:
    a, _ = stamped_pair
    signature = write(tmp_path / "garbage.p7s", content)
    with pytest.raises(NotACmsSignature) as refused:
        CMS.verify(a, signature, [world.signers[Algorithm.EC_P256].public_key], SignOptions())
    assert refused.value.code == "not_cms_signature"


def test_verify_of_a_missing_or_huge_signature_is_a_client_error(
    world: World, stamped_pair: list[Path], tmp_path: Path
) -> None:
    a, _ = stamped_pair
    keys = [world.signers[Algorithm.EC_P256].public_key]
    with pytest.raises(ClientError, match="cannot read signature"):
        CMS.verify(a, tmp_path / "missing.p7s", keys, SignOptions())
    huge = tmp_path / "huge.p7s"
    huge.write_bytes(b"\x30" * (1024 * 1024 + 1))
    with pytest.raises(NotACmsSignature, match="larger"):
        CMS.verify(a, huge, keys, SignOptions())


def test_verify_refuses_a_signature_with_embedded_content(world: World, tmp_path: Path) -> None:
    """openssl's own attached signature: cms signatures are detached, and the file
    given to verify must be what was signed."""
    signer_key = tmp_path / "self.key"
    certificate = tmp_path / "self.pem"
    made = openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", signer_key, "-out", certificate, "-subj", "/CN=attached", "-days", "1",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    file = write(tmp_path / "doc.txt", b"attached content")
    signature = tmp_path / "doc.txt.p7s"
    made = openssl("cms", "-sign", "-nodetach", "-binary", "-in", file, "-signer", certificate,
                   "-inkey", signer_key, "-outform", "DER", "-out", signature)  # fmt: skip
    assert made.returncode == 0, made.stderr
    public = x509.load_pem_x509_certificate(certificate.read_bytes()).public_key()
    result = CMS.verify(file, signature, [public], SignOptions())  # type: ignore[list-item]
    assert not result.valid
    assert "embeds its content" in result.detail


# ------------------------------------------------------------------ the real CLI


def run_cli(env: dict[str, str], cwd: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SIGNERY, *map(str, args)],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


@pytest.mark.interop
def test_cli_signs_several_files_and_verifies_them(world: World, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIGNERY_")}
    env.update({"SIGNERY_HOME": str(tmp_path / "home"), "NO_COLOR": "1", "COLUMNS": "200"})
    work = tmp_path / "work"
    work.mkdir()
    login = run_cli(
        env, work, "login", "--server", world.server.url, "--client-id", world.client_id,
        "--key-file", world.account_key_file,
    )  # fmt: skip
    assert login.returncode == 0, login.stderr
    key = world.signers[Algorithm.EC_P384].key_name
    files = [write(work / f"app-{i}.bin", os.urandom(5000 + i)) for i in range(3)]

    signed = run_cli(
        env, work, "sign", "--key", key, "--format", "cms", "--timestamp", world.tsa_url,
        "--json", *files,
    )  # fmt: skip
    assert signed.returncode == 0, signed.stdout + signed.stderr
    results = json.loads(signed.stdout)
    assert [r["file"] for r in results] == [str(f) for f in files]
    for f, r in zip(files, results, strict=True):
        assert r["ok"]
        assert r["timestamped"]
        assert r["output"] == str(f) + ".p7s"
        assert r["digest"] == hashlib.sha384(f.read_bytes()).hexdigest()
        assert_openssl_accepts(openssl_cms_verify(f, Path(r["output"]), world.root))

    pem_signed = run_cli(env, work, "sign", "--key", key, "--format", "cms", "--pem", files[0])
    assert pem_signed.returncode == 0, pem_signed.stderr
    assert (work / "app-0.bin.p7s").read_bytes().startswith(b"-----BEGIN CMS-----")
    assert_openssl_accepts(openssl_cms_verify(files[0], work / "app-0.bin.p7s", world.root, "PEM"))

    verified = run_cli(env, work, "verify", "--format", "cms", "--key", key, *files)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.count("OK") == 3
    assert "timestamped" in verified.stdout

    flip_one_byte(files[1])
    bad = run_cli(env, work, "verify", "--format", "cms", "--key", key, "--json", *files)
    assert bad.returncode == 1
    assert [r["valid"] for r in json.loads(bad.stdout)] == [True, False, True]

    bare = run_cli(
        env, work, "sign", "--key", world.no_certificate.key_name, "--format", "cms", files[2]
    )
    assert bare.returncode == 1
    assert "certificate_required" in bare.stderr
    assert "Traceback" not in bare.stderr


def test_a_fixed_signing_time_signs_the_same_digest_again(world: World, tmp_path: Path) -> None:
    """The signing time is part of what is signed: with the run's fixed time, a file
    signed again after its approval sends the digest that was approved (PKCS#1
    v1.5 is deterministic, so the two outputs are byte for byte the same)."""
    file = tmp_path / "release.tar.gz"
    file.write_bytes(os.urandom(4096))
    moment = datetime(2026, 12, 1, 9, 30, 15, tzinfo=UTC)
    options = SignOptions(scheme=SignatureScheme.RSA_PKCS1V15, signing_time=moment)
    signer = world.signers[Algorithm.RSA_2048]
    first = CMS.sign(signer, file, tmp_path / "first.p7s", options).output.read_bytes()
    second = CMS.sign(signer, file, tmp_path / "second.p7s", options).output.read_bytes()
    assert first == second
    info = signer_info(tmp_path / "first.p7s")
    attributes = {a["type"].native: a["values"][0].native for a in info["signed_attrs"]}
    assert attributes["signing_time"] == moment
