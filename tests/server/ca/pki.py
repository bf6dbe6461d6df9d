"""Test PKIs made by the openssl command line, never by Signery's own code: the CAs
that "external CA connectors" talk to, and the TLS certificates of EST servers.

Each CA is a directory with ``ca.pem`` and ``ca.key``; certificates are issued
with ``openssl x509 -req`` and an extension file, the way an administrator
would run a small CA by hand.
"""

from __future__ import annotations

import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.support import require_tool

OPENSSL_TIMEOUT = 60

CODE_SIGNING_EXT = """basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = codeSigning
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""
NO_EKU_EXT = """basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""
# An intermediate as public code-signing PKIs make them: EKU restricted to codeSigning.
INTERMEDIATE_EXT = """basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
extendedKeyUsage = codeSigning
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""
TLS_SERVER_EXT = """basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""
TLS_CLIENT_EXT = """basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


def openssl(*args: str | Path, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool("openssl"), *map(str, args)],
        capture_output=True,
        text=True,
        input=input,
        timeout=OPENSSL_TIMEOUT,
        check=False,
    )


def openssl_ok(*args: str | Path, input: str | None = None) -> str:
    result = openssl(*args, input=input)
    assert result.returncode == 0, f"openssl {' '.join(map(str, args))}: {result.stderr}"
    return result.stdout


@dataclass(frozen=True)
class TestCa:
    """A CA run with openssl: its certificate and key files."""

    __test__ = False  # not a pytest class

    directory: Path
    name: str

    @property
    def cert(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def key(self) -> Path:
        return self.directory / "ca.key"

    @property
    def pem(self) -> str:
        return self.cert.read_text()

    def issue(
        self, csr: Path, out: Path, extensions: str = CODE_SIGNING_EXT, days: int = 30
    ) -> Path:
        """``openssl x509 -req``: a certificate for the CSR, with these extensions."""
        ext = out.with_suffix(".ext")
        ext.write_text(extensions)
        openssl_ok(
            "x509",
            "-req",
            "-in",
            csr,
            "-CA",
            self.cert,
            "-CAkey",
            self.key,
            "-set_serial",
            f"0x{secrets.token_hex(16)}",
            "-days",
            str(days),
            "-sha256",
            "-extfile",
            ext,
            "-out",
            out,
        )
        return out

    def intermediate(self, name: str) -> TestCa:
        """A subordinate CA whose certificate this CA issues."""
        sub = TestCa(self.directory.parent / f"{self.directory.name}-{name}", name)
        sub.directory.mkdir(parents=True, exist_ok=True)
        csr = sub.directory / "ca.csr"
        openssl_ok(
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            sub.key,
            "-subj",
            f"/CN={name}/O=Signery Tests",
            "-out",
            csr,
        )
        self.issue(csr, sub.cert, INTERMEDIATE_EXT, days=60)
        return sub


def make_ca(directory: Path, name: str, *, key_usage: bool = True) -> TestCa:
    """A self-signed root (``openssl req -x509``). Without ``key_usage`` it is what
    plain ``openssl req -x509`` makes: basicConstraints, SKI, AKI and no keyUsage."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = TestCa(directory, name)
    extra = ["-addext", "keyUsage = critical, keyCertSign, cRLSign"] if key_usage else []
    openssl_ok(
        "req",
        "-x509",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        ca.key,
        "-subj",
        f"/CN={name}/O=Signery Tests",
        "-days",
        "90",
        *extra,
        "-out",
        ca.cert,
    )
    return ca


def new_csr(directory: Path, name: str) -> Path:
    """A CSR for a fresh key pair that is not Signery's (for mismatch tests)."""
    csr = directory / f"{name}.csr"
    openssl_ok(
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        directory / f"{name}.key",
        "-subj",
        f"/CN={name}",
        "-out",
        csr,
    )
    return csr


def tls_pair(ca: TestCa, directory: Path, name: str, extensions: str) -> tuple[Path, Path]:
    """A TLS certificate (and its key file) issued by ``ca``."""
    csr = new_csr(directory, name)
    cert = ca.issue(csr, directory / f"{name}.pem", extensions)
    return cert, directory / f"{name}.key"
