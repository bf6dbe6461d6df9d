"""GnuPG signs through the agent: gpg-agent runs Debian's gnupg-pkcs11-scd as its
smart-card daemon, which loads the stock p11-kit-client.so; gpg turns the card's
RSA key into an OpenPGP key (batch key generation from the existing keygrip, no
key material anywhere but the server), makes a detached signature, and gpg and
gpgv accept it; the audit trail names gnupg-pkcs11-scd.

Only RSA: gnupg-pkcs11-scd 0.10.0 (Debian bookworm) reads RSA certificates only
and leaves the EC key out of ``SCD LEARN``; ECDSA support came after that release."""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from tests.agent.conftest import P11_KIT_CLIENT, Served
from tests.support import require_tool

TIMEOUT = 120
DATA = b"a release artifact's bytes\n" * 100
PIN = "unused-but-asked-for-maybe"  # the token needs no login; any PIN would do


def keygrip(public_key_pem: str) -> str:
    """libgcrypt's keygrip of an RSA key: SHA-1 of the modulus as a signed
    big-endian integer (what gnupg-pkcs11-scd reports for the card's key)."""
    public = load_pem_public_key(public_key_pem.encode())
    assert isinstance(public, rsa.RSAPublicKey)
    n = public.public_numbers().n
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    if raw[0] & 0x80:
        raw = b"\x00" + raw
    return hashlib.sha1(raw, usedforsecurity=False).hexdigest().upper()


class GnuPG:
    """A private GNUPGHOME whose gpg-agent uses gnupg-pkcs11-scd on the agent's token."""

    def __init__(self, served: Served, home: Path) -> None:
        self.home = home
        self.env = {
            **served.env(),  # P11_KIT_SERVER_ADDRESS, inherited gpg-agent -> scdaemon
            "GNUPGHOME": str(home),
            "GNUPG_PKCS11_SOCKETDIR": str(home),  # not /tmp
            "LC_ALL": "C",
        }

    def run(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [require_tool(tool), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )

    def gpg(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run(
            "gpg", "--batch", "--status-fd", "2", "--pinentry-mode", "loopback",
            "--passphrase", PIN, *args,
        )  # fmt: skip


@pytest.fixture
def gnupg(served: Served, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GnuPG]:
    scd = require_tool("gnupg-pkcs11-scd")
    require_tool("gpg-agent")
    home = tmp_path_factory.mktemp("gnupg")
    home.chmod(0o700)
    (home / "gpg-agent.conf").write_text(
        f"scdaemon-program {scd}\nallow-loopback-pinentry\nlog-file {home / 'gpg-agent.log'}\n"
    )
    (home / "gnupg-pkcs11-scd.conf").write_text(
        "providers p11kit\n"
        f"provider-p11kit-library {P11_KIT_CLIENT}\n"
        f"log-file {home / 'gnupg-pkcs11-scd.log'}\n"
    )
    g = GnuPG(served, home)
    # Start gpg-agent ourselves, with P11_KIT_SERVER_ADDRESS in its environment:
    # the scdaemon it starts inherits it.
    launched = g.run("gpgconf", "--launch", "gpg-agent")
    assert launched.returncode == 0, launched.stderr
    try:
        yield g
    finally:
        g.run("gpgconf", "--kill", "all")


def signing_events(served: Served, after: int, key_id: str) -> list[dict[str, Any]]:
    return [
        e
        for e in served.api.events_after(after)
        if e["kind"] == "signing.sign.succeeded" and e["key_id"] == key_id
    ]


def test_gpg_signs_with_the_card_rsa_key_and_verifies(
    served: Served, gnupg: GnuPG, tmp_path: Path
) -> None:
    key = served.keys["RSA_3072"]
    grip = keygrip(key["public_key_pem"])

    # The smart-card daemon sees the token's RSA key, under its keygrip.
    learned = gnupg.run("gpg-connect-agent", "SCD LEARN", "/bye")
    assert learned.returncode == 0, learned.stderr
    assert f"S KEYPAIRINFO {grip} " in learned.stdout, learned.stdout
    assert f"S KEY-FRIEDNLY {grip} /CN=Agent RSA_3072" in learned.stdout

    # gpg --card-status stores the shadow key ("the key is on card ...") in the agent.
    status = gnupg.gpg("--card-status")
    assert status.returncode == 0, status.stderr
    assert (gnupg.home / "private-keys-v1.d" / f"{grip}.key").exists()

    # An OpenPGP key made from the existing card key: its self-signature is the
    # first signature through the token.
    params = tmp_path / "params"
    params.write_text(
        "%no-protection\n"
        "Key-Type: RSA\n"
        f"Key-Grip: {grip}\n"
        "Key-Usage: sign\n"
        "Name-Real: Signery Agent Test\n"
        "Name-Email: agent-test@signery.invalid\n"
        "Expire-Date: 0\n"
        "%commit\n"
    )
    created = gnupg.gpg("--gen-key", str(params))
    assert created.returncode == 0, created.stderr
    (line,) = [x for x in created.stderr.splitlines() if x.startswith("[GNUPG:] KEY_CREATED P ")]
    fingerprint = line.split()[-1]

    listed = gnupg.gpg("--with-colons", "--with-keygrip", "--list-secret-keys", fingerprint)
    assert listed.returncode == 0, listed.stderr
    rows = [r.split(":") for r in listed.stdout.splitlines()]
    sec = next(r for r in rows if r[0] == "sec")
    assert sec[3] == "1"  # RSA
    assert sec[2] == "3072"  # the server's key
    assert sec[14].startswith("D27600"), sec  # a card key: the card's serial number
    assert next(r for r in rows if r[0] == "grp")[9] == grip

    # A detached signature over a file, through the token...
    data, signature = tmp_path / "artifact.bin", tmp_path / "artifact.bin.sig"
    data.write_bytes(DATA)
    before_seq = served.api.last_seq()
    signed = gnupg.gpg(
        "--local-user", fingerprint, "--detach-sign", "--output", str(signature), str(data)
    )
    assert signed.returncode == 0, signed.stderr
    assert "[GNUPG:] SIG_CREATED D 1 " in signed.stderr
    (event,) = signing_events(served, before_seq, key["id"])
    assert event["client_tool"].startswith("gnupg-pkcs11-scd via signery-agent/")
    assert event["details"]["client_process"]["executable"] == str(
        Path(require_tool("gnupg-pkcs11-scd")).resolve()
    )

    # ...that gpg verifies,
    verified = gnupg.gpg("--verify", str(signature), str(data))
    assert verified.returncode == 0, verified.stderr
    assert (
        'Good signature from "Signery Agent Test <agent-test@signery.invalid>"' in verified.stderr
    )
    assert f"[GNUPG:] VALIDSIG {fingerprint} " in verified.stderr

    # ...and so does gpgv with nothing but the exported public key.
    exported = subprocess.run(
        [require_tool("gpg"), "--batch", "--export", fingerprint],
        env=gnupg.env, capture_output=True, timeout=TIMEOUT, check=True,
    )  # fmt: skip
    keyring = tmp_path / "public.gpg"
    keyring.write_bytes(exported.stdout)
    gpgv = gnupg.run("gpgv", "--keyring", str(keyring), str(signature), str(data))
    assert gpgv.returncode == 0, gpgv.stderr
    assert "Good signature" in gpgv.stderr

    # A changed file does not verify.
    data.write_bytes(DATA + b"tampered")
    bad = gnupg.gpg("--verify", str(signature), str(data))
    assert bad.returncode != 0
    assert "BAD signature" in bad.stderr
