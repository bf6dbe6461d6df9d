"""The formats chapter: CMS, Authenticode, JAR and OpenPGP, each checked by its own tool."""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

from demo._certificates import CertificateSteps
from demo._common import (
    BUILD_PROFILE,
    EC_KEY,
    RSA_KEY,
)
from devtools.pe import build_pe


class FormatSteps(CertificateSteps):
    """The formats chapter (timestamped by the certificate chapter's TSA and verifiers)."""

    def step_cms(self) -> None:
        self.cli("sign", "--key", EC_KEY, "--format", "cms", "--timestamp", self.tsa_url,
                 "hello.txt", profile=BUILD_PROFILE)  # fmt: skip
        done = self.openssl_run(
            "cms", "-verify", "-binary", "-content", "hello.txt", "-inform", "DER",
            "-in", "hello.txt.p7s", "-CAfile", "chain.pem", "-purpose", "any", "-out", os.devnull,
        )  # fmt: skip
        self.expect(
            "Verification successful" in done.stderr + done.stdout,
            "openssl cms -verify does not accept hello.txt.p7s",
            done.stderr,
        )
        done = self.cli("verify", "--format", "cms", "--key", EC_KEY, "hello.txt",
                        profile=BUILD_PROFILE)  # fmt: skip
        self.expect("timestamped" in done.stdout, "the CMS signature carries no timestamp")
        self.note("hello.txt.p7s: detached CMS SignedData with the chain and an RFC 3161 token;")
        self.note("openssl cms -verify accepts it against chain.pem")

    def step_authenticode(self) -> None:
        exe = self.out / "hello.exe"
        compiler = shutil.which("x86_64-w64-mingw32-gcc")
        if compiler is not None:
            source = self.tmp / "hello.c"
            source.write_text('#include <stdio.h>\nint main(void) { puts("hello"); return 0; }\n')
            self.run([compiler, "-O2", "-s", "-o", exe, source])
            self.note("hello.exe: a PE32+ program compiled with MinGW-w64")
        else:
            exe.write_bytes(build_pe(pe32_plus=True, text=b"\xc3" + os.urandom(4096)))
            self.note("hello.exe: a minimal PE32+ image (MinGW-w64 is not installed)")
        self.cli("sign", "--key", RSA_KEY, "--format", "authenticode", "--timestamp",
                 self.tsa_url, "hello.exe", profile=BUILD_PROFILE)  # fmt: skip
        osslsigncode = self.verifier("osslsigncode")
        if osslsigncode is not None:
            done = self.run([osslsigncode, "verify", "-CAfile", "chain.pem",
                             "-TSA-CAfile", "root-ca.pem", "-in", "hello.exe"])  # fmt: skip
            self.expect(
                "Signature verification: ok" in done.stdout
                and "Timestamp Server Signature verification: ok" in done.stdout,
                "osslsigncode does not accept hello.exe and its timestamp",
                done.stdout,
            )
        self.note("hello.exe now carries an Authenticode signature (RSA 3072, PKCS#1 v1.5) and")
        self.note("an RFC 3161 countersignature from Signery's TSA; osslsigncode verifies both")

    def step_jar(self) -> None:
        jar = self.out / "app.jar"
        with zipfile.ZipFile(jar, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("META-INF/MANIFEST.MF",
                       "Manifest-Version: 1.0\r\nMain-Class: demo.Hello\r\n"
                       "Implementation-Title: Signery demo\r\n\r\n")  # fmt: skip
            z.writestr("demo/Hello.class", os.urandom(512))
            z.writestr("demo/messages.properties", "greeting=hello\n")
        self.note("app.jar: a sample archive with a manifest of its own (its attributes are kept)")
        self.cli("sign", "--key", RSA_KEY, "--format", "jar", "--timestamp", self.tsa_url,
                 "app.jar", profile=BUILD_PROFILE)  # fmt: skip
        keytool, jarsigner = self.verifier("keytool"), self.verifier("jarsigner")
        if keytool is None or jarsigner is None:
            return
        store = self.tmp / "truststore.jks"
        store.unlink(missing_ok=True)
        password = "demo-truststore"
        self.run([keytool, "-importcert", "-noprompt", "-alias", "signery-root", "-file",
                  "root-ca.pem", "-keystore", store, "-storetype", "JKS", "-storepass", password],
                 show=False)  # fmt: skip
        done = self.run([jarsigner, "-verify", "-strict", "-verbose", "-keystore", store,
                         "-storepass", password, "app.jar"], show=False)  # fmt: skip
        self.print_output("\n".join(line for line in done.stdout.splitlines()
                                     if "Timestamped by" in line or "verified" in line
                                     or line.startswith(("  s", "sm"))))  # fmt: skip
        self.expect(
            "jar verified." in done.stdout, "jarsigner does not verify app.jar", done.stdout
        )
        self.expect("Timestamped by" in done.stdout, "jarsigner sees no timestamp", done.stdout)
        with zipfile.ZipFile(jar) as z:
            block = ", ".join(n for n in z.namelist() if n.endswith((".SF", ".RSA", ".EC")))
        self.note(f"app.jar is signed in place ({block}); jarsigner -strict")
        self.note("verifies it against a truststore holding only root-ca.pem")

    def step_openpgp(self) -> None:
        uid = "Signery Demo Release <release@demo.example>"
        self.cli("key", "export", "--openpgp", EC_KEY, "--uid", uid, "-o", "release-ec.asc",
                 profile=BUILD_PROFILE)  # fmt: skip
        self.cli("sign", "--key", EC_KEY, "--format", "openpgp", "hello.txt", profile=BUILD_PROFILE)
        gpg = self.verifier("gpg")
        if gpg is None:
            return
        home = self.tmp / "gnupg"
        home.mkdir(mode=0o700, exist_ok=True)
        base: list[str | Path] = [gpg, "--batch", "--no-tty", "--homedir", home]
        try:
            self.run([*base, "--import", "release-ec.asc"])
            done = self.run([*base, "--verify", "hello.txt.asc", "hello.txt"])
        finally:
            gpgconf = shutil.which("gpgconf")
            if gpgconf is not None:  # gpg may have started an agent for this home
                self.run([gpgconf, "--homedir", home, "--kill", "all"], check=False, show=False)
        self.expect(
            "Good signature" in done.stderr, "gpg did not report a good signature", done.stderr
        )
        self.note("release-ec.asc is the key's OpenPGP public key (self-signed through Signery);")
        self.note("gpg verifies hello.txt.asc with it")
