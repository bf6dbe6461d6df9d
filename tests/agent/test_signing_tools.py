"""The tools people already run sign through ``signery exec``: osslsigncode (a
MinGW-built PE, RSA and EC, timestamped by Signery's TSA) and jarsigner with
SunPKCS11, each over the stock p11-kit-client.so; osslsigncode verify and
jarsigner -verify -strict accept what they made, the audit trail names the tool
and its hash, and the usage counters move by exactly one per signature."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import pytest

from tests.agent.conftest import P11_KIT_CLIENT, Served
from tests.support import SIGNERY, require_tool

TOOL_TIMEOUT = 300
STOREPASS = "unused-but-required"
HELLO_C = b'#include <stdio.h>\nint main(void) { puts("hello"); return 0; }\n'


def signery_exec(
    served: Served, home: Path, *command: str | Path
) -> subprocess.CompletedProcess[str]:
    """``signery exec`` as a build machine runs it: the account from SIGNERY_*."""
    return subprocess.run(
        [SIGNERY, "exec", "--", *map(str, command)],
        env=served.cli_env(home),
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT,
        check=False,
    )


@pytest.fixture(scope="module")
def pe_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("mingw")
    source = directory / "hello.c"
    source.write_bytes(HELLO_C)
    exe = directory / "hello.exe"
    subprocess.run(
        [require_tool("x86_64-w64-mingw32-gcc"), "-O2", "-o", str(exe), str(source)],
        check=True,
        timeout=TOOL_TIMEOUT,
    )
    return exe


@pytest.fixture(scope="module")
def root_pem(served: Served, tmp_path_factory: pytest.TempPathFactory) -> Path:
    chain = served.api.admin_client.signing_keys.chain(served.keys["RSA_3072"]["id"])
    last = chain.strip().split("-----END CERTIFICATE-----")[-2] + "-----END CERTIFICATE-----\n"
    path = tmp_path_factory.mktemp("root") / "root.pem"
    path.write_text(last.strip() + "\n")
    return path


def signing_events(served: Served, after: int, key_id: str) -> list[dict[str, Any]]:
    return [
        e
        for e in served.api.events_after(after)
        if e["kind"] == "signing.sign.succeeded" and e["key_id"] == key_id
    ]


@pytest.mark.parametrize("algorithm", ["RSA_3072", "EC_P256"])
def test_osslsigncode_signs_a_pe_through_the_agent(
    served: Served, pe_file: Path, root_pem: Path, tmp_path: Path, algorithm: str
) -> None:
    key = served.keys[algorithm]
    chain = tmp_path / "chain.pem"
    chain.write_text(served.api.admin_client.signing_keys.chain(key["id"]))
    signed = tmp_path / "signed.exe"
    before_seq = served.api.last_seq()
    before = served.api.counter(served.api.usage(), "key", key["id"])
    osslsigncode = require_tool("osslsigncode")
    run = signery_exec(
        served, tmp_path,
        osslsigncode, "sign",
        "-pkcs11module", P11_KIT_CLIENT,
        "-key", f"pkcs11:object={key['name']};type=private",
        "-certs", chain, "-h", "sha256",
        "-ts", f"{served.url}/api/v1/tsa",
        "-in", pe_file, "-out", signed,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "pkcs11:token=Signery;object=" in run.stderr  # the URIs, printed for the user
    verified = subprocess.run(
        [osslsigncode, "verify", "-CAfile", root_pem, "-TSA-CAfile", root_pem, "-in", signed],
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT,
        check=False,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "Signature verification: ok" in verified.stdout
    assert "Timestamp" in verified.stdout
    # One signature, one audit event naming the tool and its hash.
    (event,) = signing_events(served, before_seq, key["id"])
    assert event["client_tool"].startswith("osslsigncode via signery-agent/")
    process = event["details"]["client_process"]
    assert process["executable"] == str(Path(osslsigncode).resolve())
    assert (
        process["executable_sha256"]
        == hashlib.sha256(Path(osslsigncode).resolve().read_bytes()).hexdigest()
    )
    assert "-pkcs11module" in process["command_line"]
    after = served.api.counter(served.api.usage(), "key", key["id"])
    assert after == (before[0] + 1, before[1])


def make_jar(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("META-INF/MANIFEST.MF", "Manifest-Version: 1.0\r\nCreated-By: test\r\n\r\n")
        z.writestr("app/Main.class", b"\xca\xfe\xba\xbe" + bytes(60))
        z.writestr("app/readme.txt", "built by a pipeline\n")
    return path


@pytest.fixture(scope="module")
def sunpkcs11_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sunpkcs11") / "signery.cfg"
    path.write_text(f"name = Signery\nlibrary = {P11_KIT_CLIENT}\nslotListIndex = 0\n")
    return path


@pytest.fixture(scope="module")
def truststore(root_pem: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("truststore") / "truststore.jks"
    subprocess.run(
        [
            require_tool("keytool"), "-importcert", "-noprompt", "-alias", "signery-root",
            "-file", str(root_pem), "-keystore", str(store), "-storetype", "JKS",
            "-storepass", STOREPASS,
        ],
        check=True, capture_output=True, timeout=TOOL_TIMEOUT,
    )  # fmt: skip
    return store


def pkcs11_keystore(config: Path) -> list[str]:
    return [
        "-keystore", "NONE", "-storetype", "PKCS11",
        "-providerClass", "sun.security.pkcs11.SunPKCS11", "-providerArg", str(config),
        "-storepass", STOREPASS,
    ]  # fmt: skip


def test_keytool_lists_the_keys(served: Served, sunpkcs11_config: Path, tmp_path: Path) -> None:
    run = signery_exec(
        served, tmp_path, require_tool("keytool"), "-list", *pkcs11_keystore(sunpkcs11_config)
    )
    assert run.returncode == 0, run.stdout + run.stderr
    for key in served.keys.values():
        assert f"{key['name']}, PrivateKeyEntry" in run.stdout


@pytest.mark.parametrize(
    ("algorithm", "sigalg"), [("RSA_3072", "SHA256withRSA"), ("EC_P256", "SHA256withECDSA")]
)
def test_jarsigner_signs_a_jar_through_the_agent(
    served: Served,
    sunpkcs11_config: Path,
    truststore: Path,
    tmp_path: Path,
    algorithm: str,
    sigalg: str,
) -> None:
    key = served.keys[algorithm]
    jar = make_jar(tmp_path / "app.jar")
    before_seq = served.api.last_seq()
    run = signery_exec(
        served, tmp_path,
        require_tool("jarsigner"), *pkcs11_keystore(sunpkcs11_config),
        "-sigalg", sigalg, "-tsa", f"{served.url}/api/v1/tsa",
        jar, key["name"],
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    verified = subprocess.run(
        [
            require_tool("jarsigner"), "-verify", "-strict", "-verbose", "-certs",
            "-keystore", str(truststore), "-storepass", STOREPASS, str(jar),
        ],
        capture_output=True, text=True, timeout=TOOL_TIMEOUT, check=False,
    )  # fmt: skip
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "jar verified." in verified.stdout
    events = signing_events(served, before_seq, key["id"])
    assert len(events) == 1
    assert events[0]["details"]["client_process"]["executable"].endswith("/java") or events[0][
        "details"
    ]["client_process"]["executable"].endswith("/jarsigner")
