"""The certificate chapter: renewal, revocation and the CRL, RFC 3161 timestamps."""

from __future__ import annotations

import shutil
from pathlib import Path

from demo._common import (
    BUILD_PROFILE,
    EC_KEY,
)
from demo._runner import Runner
from signery import endpoints


class CertificateSteps(Runner):
    """The certificate chapter."""

    def step_renew(self) -> None:
        before = self.cli_json("keys", profile=BUILD_PROFILE)
        old_chain = next(k for k in before if k.get("name") == EC_KEY)["certificate_chain"]
        self.cli("key", "renew", EC_KEY)
        self.cli("key", "certificates", EC_KEY)
        # The build machine changes nothing: its next listing carries the new chain.
        after = self.cli_json("keys", profile=BUILD_PROFILE)
        new_chain = next(k for k in after if k.get("name") == EC_KEY)["certificate_chain"]
        self.expect(new_chain[0] != old_chain[0], "the account still sees the old certificate")
        (self.out / "leaf-renewed.pem").write_text(new_chain[0], "ascii")
        done = self.openssl_run(
            "verify", "-CAfile", "root-ca.pem", "-untrusted", "issuing-ca.pem", "leaf-renewed.pem"
        )
        self.expect(
            "leaf-renewed.pem: OK" in done.stdout, "the renewed certificate does not verify"
        )
        done = self.openssl_run("x509", "-in", "leaf-renewed.pem", "-noout", "-pubkey")
        self.expect(
            done.stdout.strip() == (self.out / "pubkey.pem").read_text("ascii").strip(),
            "the renewed certificate certifies another key pair",
            done.stdout,
        )
        self.cli(
            "sign", "--key", EC_KEY, "-o", "app.bin.renewed.sig", "app.bin", profile=BUILD_PROFILE
        )
        done = self.openssl_run(
            "dgst", "-sha256", "-verify", "pubkey.pem", "-signature", "app.bin.renewed.sig",
            "app.bin",
        )  # fmt: skip
        self.expect("Verified OK" in done.stdout, "openssl does not verify app.bin.renewed.sig")
        self.note("the new certificate certifies the same public key (pubkey.pem still verifies)")
        self.note("and the account saw the new chain at its next `signery keys`")

    def step_crl(self) -> None:
        history = self.cli_json("key", "certificates", EC_KEY)
        old = next((c for c in history if c.get("status") == "superseded"), None)
        self.expect(old is not None, "the key's certificate history lacks the superseded one")
        assert old is not None
        self.cli("key", "revoke-certificate", EC_KEY, "--serial", old["serial"], "--reason",
                 "superseded")  # fmt: skip
        self.cli("ca", "crl", "-o", "ca.crl")
        self.cli("ca", "crl", "-o", "ca.crl.pem", "--pem")
        self.openssl_run("crl", "-in", "ca.crl.pem", "-noout", "-text")
        verify = ("verify", "-crl_check", "-CAfile", "root-ca.pem", "-untrusted", "issuing-ca.pem",
                  "-CRLfile", "ca.crl.pem")  # fmt: skip
        done = self.openssl_run(*verify, "leaf.pem", check=False)
        self.expect(
            done.returncode != 0 and "certificate revoked" in done.stdout + done.stderr,
            "openssl -crl_check still accepts the revoked certificate leaf.pem",
            done.stdout + done.stderr,
        )
        done = self.openssl_run(*verify, "leaf-renewed.pem")
        self.expect(
            "leaf-renewed.pem: OK" in done.stdout, "the renewed certificate fails -crl_check"
        )
        self.note("ca.crl (DER) and ca.crl.pem list the old certificate as revoked (superseded);")
        self.note("openssl -crl_check refuses leaf.pem and accepts leaf-renewed.pem")

    def step_timestamp(self) -> None:
        # Only the signature's SHA-256 leaves the machine; the reply is checked
        # (granted, same hash, same nonce) before it is written.
        self.cli("timestamp", "app.bin.sig", "--query-out", "app.bin.sig.tsq",
                 profile=BUILD_PROFILE)  # fmt: skip
        shown = self.openssl_run("ts", "-reply", "-in", "app.bin.sig.tsr", "-text")
        self.expect("Status: Granted." in shown.stdout, "the TSA did not grant the timestamp")
        self.expect("Nonce: " in shown.stdout, "the timestamp does not echo the nonce")
        # -queryfile also checks the nonce and the policy; -data recomputes the hash.
        # The token carries the TSA certificate and the issuing CA: the root suffices.
        for source in (("-queryfile", "app.bin.sig.tsq"), ("-data", "app.bin.sig")):
            done = self.openssl_run(
                "ts", "-verify", *source, "-in", "app.bin.sig.tsr", "-CAfile", "root-ca.pem"
            )
            self.expect(
                "Verification: OK" in done.stdout,
                "openssl ts -verify does not accept app.bin.sig.tsr",
                done.stdout + done.stderr,
            )
        self.note("app.bin.sig.tsr is an RFC 3161 reply over app.bin.sig, signed by the TSA key")
        self.note("(certificate: EKU timeStamping only, critical; issued by the built-in CA);")
        self.note("openssl ts -verify accepts it against root-ca.pem alone")

    def verifier(self, name: str) -> Path | None:
        """An external verifier on PATH, or None (its check is then skipped, saying so:
        the signature is still made; CI has every verifier)."""
        found = shutil.which(name)
        if found is None:
            self.console.print(
                f"  [yellow]-[/] {name} is not installed: its check is skipped", highlight=False
            )
        return Path(found) if found else None

    @property
    def tsa_url(self) -> str:
        return self.state.url + endpoints.TSA.path()
