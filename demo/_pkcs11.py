"""The PKCS#11 chapter: the tools a pipeline already runs sign through
``signery exec``, which serves the account's keys to them over p11-kit."""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

from demo._common import BUILD_PROFILE, RSA_KEY
from demo._formats import FormatSteps
from devtools.pe import build_pe
from signery.agent import P11_KIT_CLIENT

STOREPASS = "any"  # SunPKCS11 asks for one; the agent needs none


class Pkcs11Steps(FormatSteps):
    def step_pkcs11_tools(self) -> None:
        if not P11_KIT_CLIENT.exists():
            self.console.print(
                f"  [yellow]-[/] {P11_KIT_CLIENT} is not installed (p11-kit-modules): skipped",
                highlight=False,
            )
            return
        self.cli("key", "chain", RSA_KEY, "-o", "rsa-chain.pem")
        osslsigncode = self.verifier("osslsigncode")
        if osslsigncode is not None:
            self._osslsigncode(osslsigncode)
        jarsigner = self.verifier("jarsigner")
        if jarsigner is not None:
            self._jarsigner(jarsigner)
        self.note("each signature went through the signing API: policy, limits and an audit")
        self.note("event naming the tool (osslsigncode, jarsigner) and its SHA-256")

    def _osslsigncode(self, osslsigncode: Path) -> None:
        unsigned = self.out / "tool.exe"
        compiler = shutil.which("x86_64-w64-mingw32-gcc")
        if compiler is not None:
            source = self.tmp / "tool.c"
            source.write_text('#include <stdio.h>\nint main(void) { puts("tool"); return 0; }\n')
            self.run([compiler, "-O2", "-s", "-o", unsigned, source], show=False)
        else:
            unsigned.write_bytes(build_pe(pe32_plus=True, text=b"\xc3" + os.urandom(4096)))
        self.cli("exec", "--", osslsigncode, "sign", "-pkcs11module", P11_KIT_CLIENT,
                 "-key", f"pkcs11:object={RSA_KEY};type=private", "-certs", "rsa-chain.pem",
                 "-h", "sha256", "-ts", self.tsa_url, "-in", "tool.exe", "-out", "tool-signed.exe",
                 profile=BUILD_PROFILE)  # fmt: skip
        done = self.run([osslsigncode, "verify", "-CAfile", "root-ca.pem",
                         "-TSA-CAfile", "root-ca.pem", "-in", "tool-signed.exe"])  # fmt: skip
        self.expect(
            "Signature verification: ok" in done.stdout,
            "osslsigncode does not accept the PE it signed through the agent",
            done.stdout,
        )
        self.note("osslsigncode signed tool.exe with release-rsa through p11-kit-client.so")

    def _jarsigner(self, jarsigner: Path) -> None:
        jar = self.out / "tool.jar"
        with zipfile.ZipFile(jar, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("META-INF/MANIFEST.MF", "Manifest-Version: 1.0\r\n\r\n")
            z.writestr("demo/Tool.class", os.urandom(256))
        config = self.out / "signery-pkcs11.cfg"
        config.write_text(f"name = Signery\nlibrary = {P11_KIT_CLIENT}\nslotListIndex = 0\n")
        self.cli("exec", "--", jarsigner, "-keystore", "NONE", "-storetype", "PKCS11",
                 "-providerClass", "sun.security.pkcs11.SunPKCS11", "-providerArg", config.name,
                 "-storepass", STOREPASS, "-tsa", self.tsa_url, "tool.jar", RSA_KEY,
                 profile=BUILD_PROFILE)  # fmt: skip
        store = self.tmp / "truststore.jks"
        password = "demo-truststore"
        keytool = self.verifier("keytool")
        if keytool is None:
            return
        if not store.exists():
            self.run([keytool, "-importcert", "-noprompt", "-alias", "signery-root", "-file",
                      "root-ca.pem", "-keystore", store, "-storetype", "JKS",
                      "-storepass", password], show=False)  # fmt: skip
        done = self.run([jarsigner, "-verify", "-strict", "-keystore", store,
                         "-storepass", password, "tool.jar"])  # fmt: skip
        self.expect(
            "jar verified." in done.stdout, "jarsigner does not verify tool.jar", done.stdout
        )
        self.note(
            "jarsigner (SunPKCS11) signed tool.jar with release-rsa; -verify -strict accepts it"
        )
