"""The signing chapter: the account logs in, lists its keys, signs, and everything verifies."""

from __future__ import annotations

import json
import os

from demo._common import (
    BUILD_PROFILE,
    EC_KEY,
    RSA_KEY,
    HardwareStore,
    split_certificates,
)
from demo._management import ManagementSteps


class SigningSteps(ManagementSteps):
    """The signing chapter (its hardware keys are made as the management chapter makes keys)."""

    def step_account_login(self) -> None:
        assert self.state.key_file is not None
        self.cli(
            "login",
            "--server",
            self.state.url,
            "--client-id",
            self.state.client_id,
            "--key-file",
            self.state.key_file,
            profile=BUILD_PROFILE,
        )

    def step_keys(self) -> None:
        self.cli("keys", profile=BUILD_PROFILE)
        keys = self.cli_json("keys", profile=BUILD_PROFILE)  # the same list, for a robust check
        listed = {str(k.get("name")): k for k in keys}
        for name in (EC_KEY, RSA_KEY):
            self.expect(name in listed, f"`signery keys` does not list {name}", json.dumps(keys))
            self.expect(
                bool(listed[name].get("certificate_chain")),
                f"`signery keys` shows no certificate chain for {name}",
                json.dumps(keys),
            )
        self.note(f"the account sees {len(keys)} keys, {EC_KEY} and {RSA_KEY}, with certificates")

    def step_sign_ec(self) -> None:
        (self.out / "hello.txt").write_text(
            "Hello from the Signery demo.\nOnly this file's SHA-256 digest left the machine.\n",
            "utf-8",
        )
        # A small "binary": a fixed header and random bytes, so every run signs new content.
        (self.out / "app.bin").write_bytes(b"\x7fELF\x02\x01\x01\x00" + os.urandom(64 * 1024))
        self.note("wrote hello.txt and app.bin (64 KiB)")
        key = "no-such-key" if self.debug_break == "sign-key" else EC_KEY
        self.cli(
            "sign", "--key", key, "--format", "raw", "hello.txt", "app.bin", profile=BUILD_PROFILE
        )
        for name in ("hello.txt.sig", "app.bin.sig"):
            path = self.out / name
            self.expect(path.is_file() and path.stat().st_size > 0, f"{name} was not written")

    def step_sign_rsa(self) -> None:
        self.cli(
            "sign",
            "--key",
            RSA_KEY,
            "--format",
            "raw",
            "-o",
            "app.bin.rsa.sig",
            "app.bin",
            profile=BUILD_PROFILE,
        )
        size = (self.out / "app.bin.rsa.sig").stat().st_size
        self.expect(size == 384, f"an RSA 3072 signature has 384 bytes, app.bin.rsa.sig has {size}")

    def step_verify_signery(self) -> None:
        self.cli("verify", "--key", EC_KEY, "hello.txt", "app.bin", profile=BUILD_PROFILE)
        self.cli(
            "verify",
            "--public-key",
            "pubkey-rsa.pem",
            "--signature",
            "app.bin.rsa.sig",
            "app.bin",
            profile=BUILD_PROFILE,
        )

    def step_verify_openssl(self) -> None:
        if self.debug_break == "signature":
            sig = self.out / "hello.txt.sig"
            data = bytearray(sig.read_bytes())
            data[-1] ^= 0x01
            sig.write_bytes(bytes(data))
            self.console.print("  [yellow]debug: flipped a bit of hello.txt.sig[/]")
        checks = [
            ("pubkey.pem", "hello.txt.sig", "hello.txt"),
            ("pubkey.pem", "app.bin.sig", "app.bin"),
            ("pubkey-rsa.pem", "app.bin.rsa.sig", "app.bin"),
        ]
        for pub, sig_name, file in checks:
            done = self.openssl_run(
                "dgst", "-sha256", "-verify", pub, "-signature", sig_name, file, check=False
            )
            self.expect(
                done.returncode == 0 and "Verified OK" in done.stdout,
                f"openssl does not verify {sig_name} (status {done.returncode})",
                done.stdout + done.stderr,
            )
        # And the negative: a changed file must not verify.
        tampered = self.tmp / "hello-tampered.txt"
        tampered.write_bytes((self.out / "hello.txt").read_bytes() + b"!")
        done = self.openssl_run(
            "dgst",
            "-sha256",
            "-verify",
            "pubkey.pem",
            "-signature",
            "hello.txt.sig",
            tampered,
            check=False,
        )
        self.expect(
            done.returncode != 0 and "Verified OK" not in done.stdout,
            "openssl accepted the signature of hello.txt for a changed file",
            done.stdout + done.stderr,
        )
        self.note("openssl verifies all three signatures (ECDSA P-256 and RSA PKCS#1 v1.5)")
        self.note("and rejects hello.txt.sig for a copy of hello.txt with one byte added")

    def step_hardware_key(self, store: HardwareStore) -> None:
        name = store.key
        pub = f"pubkey-{store.suffix}.pem"
        leaf = f"leaf-{store.suffix}.pem"
        sig = f"app.bin.{store.suffix}.sig"
        chain = self.tmp / f"chain-{store.suffix}.pem"
        self.create_key(name, "EC_P256", store.cn, store.storage)
        self.cli("key", "public-key", name, "-o", pub)
        self.cli("key", "chain", name, "-o", chain)
        certs = split_certificates(chain.read_text("ascii"))
        self.expect(bool(certs), f"the chain of {name} holds no certificate", chain.read_text())
        (self.out / leaf).write_text(certs[0], "ascii")
        self.cli(
            "sign", "--key", name, "--format", "raw", "-o", sig, "app.bin", profile=BUILD_PROFILE
        )
        done = self.openssl_run(
            "dgst", "-sha256", "-verify", pub, "-signature", sig, "app.bin", check=False
        )
        self.expect(
            done.returncode == 0 and "Verified OK" in done.stdout,
            f"openssl does not verify {sig} (status {done.returncode})",
            done.stdout + done.stderr,
        )
        done = self.openssl_run(
            "verify", "-CAfile", "root-ca.pem", "-untrusted", "issuing-ca.pem", leaf
        )
        self.expect(f"{leaf}: OK" in done.stdout, f"openssl did not say `{leaf}: OK`")
        done = self.openssl_run("x509", "-in", leaf, "-noout", "-pubkey")
        exported = (self.out / pub).read_text("ascii").strip()
        self.expect(
            done.stdout.strip() == exported,
            f"the certificate of {name} does not certify the exported public key ({pub})",
            done.stdout,
        )
        self.expect(
            exported != (self.out / "pubkey.pem").read_text("ascii").strip(),
            f"{name} has the same public key as {EC_KEY}",
        )
        self.note(f"openssl verifies {sig} with {pub}, the key generated in {store.storage}")
        self.note(
            f"{leaf} (the first certificate of `key chain`) chains up to the built-in root "
            f"and certifies the same public key as {pub}"
        )
