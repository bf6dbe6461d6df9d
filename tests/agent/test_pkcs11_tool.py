"""OpenSC's pkcs11-tool signs through the agent over the real p11-kit-client.so;
openssl verifies every signature with the key's certificate."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from tests.agent.conftest import P11_KIT_CLIENT, Served
from tests.support import missing, require_tool

DATA = b"a release artifact's bytes\n" * 100
SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")


def pkcs11_tool(served: Served, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool("pkcs11-tool"), "--module", str(P11_KIT_CLIENT), *args],
        env=served.env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def key_id(key: dict[str, str]) -> str:
    """The key's CKA_ID as pkcs11-tool takes it (pkcs11-tool picks a key by id only)."""
    return key["id"].replace("-", "")


def certificate_of(served: Served, algorithm: str, tmp_path: Path) -> Path:
    chain = served.api.admin_client.signing_keys.chain(served.keys[algorithm]["id"])
    path = tmp_path / f"{algorithm}.pem"
    path.write_text(chain)
    return path


def openssl_verify(cert: Path, data: Path, signature: Path, *options: str) -> None:
    public = cert.with_suffix(".pub")
    subprocess.run(
        [
            require_tool("openssl"),
            "x509",
            "-in",
            str(cert),
            "-pubkey",
            "-noout",
            "-out",
            str(public),
        ],
        check=True,
    )
    verified = subprocess.run(
        [
            "openssl",
            "dgst",
            "-sha256",
            *options,
            "-verify",
            str(public),
            "-signature",
            str(signature),
            str(data),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verified.returncode == 0, verified.stderr
    assert "Verified OK" in verified.stdout


def test_the_token_and_its_objects_are_listed(served: Served) -> None:
    slots = pkcs11_tool(served, "-L")
    assert slots.returncode == 0, slots.stderr
    assert f"token label        : {served.account.name}" in slots.stdout
    assert "token model        : signery-agent" in slots.stdout
    objects = pkcs11_tool(served, "-O")
    assert objects.returncode == 0, objects.stderr
    for key in served.keys.values():
        # Private key, public key and certificate, under one label and one id.
        assert objects.stdout.count(f"label:      {key['name']}") == 3
        assert objects.stdout.count(f"ID:         {key['id'].replace('-', '')}") == 3
    assert "never extractable" in objects.stdout
    # A key without a certificate: its private and public key, no certificate.
    assert objects.stdout.count(f"label:      {served.bare['name']}") == 2
    assert "Signery Root CA" in objects.stdout  # the chain's CAs too


@pytest.mark.parametrize(
    ("mechanism", "to_sign", "openssl_options"),
    [
        ("SHA256-RSA-PKCS", DATA, ()),
        ("RSA-PKCS", SHA256_DIGEST_INFO + hashlib.sha256(DATA).digest(), ()),
    ],
)
def test_rsa_pkcs1v15_signatures_verify(
    served: Served, tmp_path: Path, mechanism: str, to_sign: bytes, openssl_options: tuple[str, ...]
) -> None:
    data, given, signature = tmp_path / "data", tmp_path / "in", tmp_path / "sig"
    data.write_bytes(DATA)
    given.write_bytes(to_sign)
    key = served.keys["RSA_3072"]
    run = pkcs11_tool(
        served,
        "--sign",
        "--id",
        key_id(key),
        "-m",
        mechanism,
        "--input-file",
        str(given),
        "--output-file",
        str(signature),
    )
    assert run.returncode == 0, run.stderr
    assert len(signature.read_bytes()) == 384
    openssl_verify(certificate_of(served, "RSA_3072", tmp_path), data, signature, *openssl_options)


def test_rsa_pss_signature_verifies(served: Served, tmp_path: Path) -> None:
    data, digest, signature = tmp_path / "data", tmp_path / "digest", tmp_path / "sig"
    data.write_bytes(DATA)
    digest.write_bytes(hashlib.sha256(DATA).digest())
    key = served.keys["RSA_3072"]
    run = pkcs11_tool(
        served,
        "--sign",
        "--id",
        key_id(key),
        "-m",
        "RSA-PKCS-PSS",
        "--hash-algorithm",
        "SHA256",
        "--mgf",
        "MGF1-SHA256",
        "--salt-len",
        "32",
        "--input-file",
        str(digest),
        "--output-file",
        str(signature),
    )
    assert run.returncode == 0, run.stderr
    openssl_verify(
        certificate_of(served, "RSA_3072", tmp_path),
        data,
        signature,
        "-sigopt",
        "rsa_padding_mode:pss",
        "-sigopt",
        "rsa_pss_saltlen:32",
    )


def test_ecdsa_signature_verifies(served: Served, tmp_path: Path) -> None:
    data, digest, signature = tmp_path / "data", tmp_path / "digest", tmp_path / "sig"
    data.write_bytes(DATA)
    digest.write_bytes(hashlib.sha256(DATA).digest())
    key = served.keys["EC_P256"]
    run = pkcs11_tool(
        served,
        "--sign",
        "--id",
        key_id(key),
        "-m",
        "ECDSA",
        "--signature-format",
        "openssl",
        "--input-file",
        str(digest),
        "--output-file",
        str(signature),
    )
    assert run.returncode == 0, run.stderr
    openssl_verify(certificate_of(served, "EC_P256", tmp_path), data, signature)


# ------------------------------------------------------------------ openssl (libp11) and p11tool

LIBP11_ENGINE = Path("/usr/lib/x86_64-linux-gnu/engines-3/pkcs11.so")


def openssl_engine(served: Served, *args: str | Path) -> subprocess.CompletedProcess[str]:
    if not LIBP11_ENGINE.exists():
        missing("OpenSSL's pkcs11 engine (apt-get install libengine-pkcs11-openssl)")
    env = {**served.env(), "PKCS11_MODULE_PATH": str(P11_KIT_CLIENT)}
    return subprocess.run(
        [require_tool("openssl"), *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def uri(key: dict[str, str]) -> str:
    return f"pkcs11:object={key['name']};type=private"


@pytest.mark.parametrize("algorithm", ["RSA_3072", "EC_P256"])
def test_openssl_dgst_signs_with_a_pkcs11_uri(
    served: Served, tmp_path: Path, algorithm: str
) -> None:
    data, signature = tmp_path / "data", tmp_path / "sig"
    data.write_bytes(DATA)
    run = openssl_engine(
        served, "dgst", "-sha256", "-engine", "pkcs11", "-keyform", "engine",
        "-sign", uri(served.keys[algorithm]), "-out", signature, data,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    openssl_verify(certificate_of(served, algorithm, tmp_path), data, signature)


@pytest.mark.parametrize("algorithm", ["RSA_3072", "EC_P256"])
def test_openssl_pkeyutl_signs_a_digest_with_a_pkcs11_uri(
    served: Served, tmp_path: Path, algorithm: str
) -> None:
    data, digest, signature = tmp_path / "data", tmp_path / "digest", tmp_path / "sig"
    data.write_bytes(DATA)
    digest.write_bytes(hashlib.sha256(DATA).digest())
    rsa = ["-pkeyopt", "digest:sha256"] if algorithm.startswith("RSA") else []
    run = openssl_engine(
        served, "pkeyutl", "-engine", "pkcs11", "-keyform", "engine", "-sign",
        "-inkey", uri(served.keys[algorithm]), *rsa, "-in", digest, "-out", signature,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    # The signature of the digest is the signature of the data: dgst verifies it.
    openssl_verify(certificate_of(served, algorithm, tmp_path), data, signature)


def test_p11tool_lists_every_object(served: Served) -> None:
    run = subprocess.run(
        [require_tool("p11tool"), "--provider", str(P11_KIT_CLIENT), "--list-all", "pkcs11:"],
        env=served.env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    for key in served.keys.values():
        assert f"object={key['name']};type=private" in run.stdout
        assert f"object={key['name']};type=cert" in run.stdout
        assert f"object={key['name']};type=public" in run.stdout
