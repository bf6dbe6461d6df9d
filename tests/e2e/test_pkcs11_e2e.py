"""A real `signery serve` process with a PKCS#11 token (SoftHSM2) configured.

Keys are created through the API with ``"storage": "pkcs11"`` and certified by
the built-in CA; signatures made through the signing API are checked with
``openssl dgst -verify`` against the public key the server publishes, and the
key objects are looked at on the token with OpenSC's ``pkcs11-tool``. A server
whose PIN is wrong must refuse to start with one clear line, no traceback.
"""

from __future__ import annotations

import base64
import hashlib
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.keystores.softhsm import SoftHsmToken, claim_token, pkcs11_tool
from tests.support import (
    SIGNERY,
    Api,
    Installation,
    ServerProcess,
    new_installation,
    require_tool,
    running_server,
    server_env,
)

pytestmark = [pytest.mark.e2e, pytest.mark.interop]

DATA = b"a release artifact signed by a key that never leaves the token\n" * 100
OPENSSL_TIMEOUT = 60
START_TIMEOUT = 60


def pkcs11_env(token: SoftHsmToken, pin_file: Path | None = None) -> dict[str, str]:
    """What a server process needs to open the token (SIGNERY_PKCS11__*)."""
    return {
        "SIGNERY_PKCS11__MODULE": str(token.module),
        "SIGNERY_PKCS11__TOKEN_LABEL": token.label,
        "SIGNERY_PKCS11__PIN_FILE": str(pin_file or token.pin_file),
        **token.env(),
    }


@pytest.fixture(scope="module")
def token() -> SoftHsmToken:
    return claim_token()


@pytest.fixture(scope="module")
def hsm_installation(
    tmp_path_factory: pytest.TempPathFactory, token: SoftHsmToken
) -> Iterator[Installation]:
    data_dir = tmp_path_factory.mktemp("pkcs11-e2e")
    with new_installation("sqlite", data_dir, pkcs11=token.settings()) as inst:
        yield inst


@pytest.fixture(scope="module")
def hsm_server(hsm_installation: Installation, token: SoftHsmToken) -> Iterator[ServerProcess]:
    with running_server(hsm_installation, node="hsm", **pkcs11_env(token)) as proc:
        yield proc


@pytest.fixture(scope="module")
def api(hsm_installation: Installation, hsm_server: ServerProcess) -> Iterator[Api]:
    with httpx.Client(base_url=hsm_server.url, timeout=60) as http:
        init = hsm_installation.init
        yield Api(http, hsm_installation.admin_token, init.issuer, init.root_tsg_id)


@pytest.fixture(scope="module")
def world(api: Api) -> dict[str, Any]:
    tsg = api.create_tsg()
    account = api.create_account(tsg["id"])
    keys = {
        algorithm: api.create_key(tsg["id"], algorithm, ca="builtin", storage="pkcs11")
        for algorithm in ("EC_P256", "EC_P384", "EC_P521", "RSA_2048")
    }
    return {"tsg": tsg, "account": account, "token": api.access_token(account), "keys": keys}


def openssl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool("openssl"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=OPENSSL_TIMEOUT,
        check=False,
    )


# ------------------------------------------------------------------ key stores


def test_keystores_lists_builtin_and_pkcs11_as_healthy(api: Api, token: SoftHsmToken) -> None:
    stores = {s["name"]: s for s in api.ok(api.http.get("/api/v1/keystores", headers=api.admin))}
    assert set(stores) == {"builtin", "pkcs11"}
    assert all(s["healthy"] for s in stores.values()), stores
    assert stores["pkcs11"]["kind"] == "pkcs11"
    assert repr(token.label) in stores["pkcs11"]["detail"]
    assert sorted(stores["pkcs11"]["algorithms"]) == sorted(stores["builtin"]["algorithms"])
    ready = api.http.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"]["keystore:pkcs11"] == "ok"


def test_a_token_backed_key_is_certified_and_lives_on_the_token(
    world: dict[str, Any], token: SoftHsmToken
) -> None:
    listing = pkcs11_tool(token, "--list-objects")
    assert listing.returncode == 0, listing.stderr
    for algorithm, key in world["keys"].items():
        assert key["storage"] == "pkcs11"
        assert key["algorithm"] == algorithm
        chain = [x509.load_pem_x509_certificate(pem.encode()) for pem in key["certificate_chain"]]
        assert len(chain) == 3, "leaf, issuing CA, root"
        published = serialization.load_pem_public_key(key["public_key_pem"].encode())
        assert chain[0].public_key() == published, "the certificate certifies the token's key"
        # pkcs11-tool, not our code, reads the token: the private key is there,
        # labelled with the key's id, and the token will never let it out.
        label = f"signery:{key['name']}:{key['id']}:v1"
        blocks = [b for b in re.split(r"\n(?=\S)", listing.stdout) if f"label:      {label}" in b]
        kinds = sorted(b.split(";")[0] for b in blocks)
        assert kinds == ["Private Key Object", "Public Key Object"], listing.stdout
        private = next(b for b in blocks if b.startswith("Private Key Object"))
        assert "never extractable" in private
        assert "sensitive" in private


# ------------------------------------------------------------------ signing


@pytest.mark.parametrize(
    ("algorithm", "digest_algorithm", "scheme", "sigopts"),
    [
        ("EC_P256", "sha256", "ecdsa", []),
        ("EC_P384", "sha384", "ecdsa", []),
        ("EC_P521", "sha512", "ecdsa", []),
        ("RSA_2048", "sha256", "rsa-pkcs1v15", []),
        ("RSA_2048", "sha384", "rsa-pkcs1v15", []),
        (
            "RSA_2048",
            "sha512",
            "rsa-pss",
            ["-sigopt", "rsa_padding_mode:pss", "-sigopt", "rsa_pss_saltlen:digest"],
        ),
    ],
)
def test_signatures_made_on_the_token_verify_with_openssl(
    api: Api,
    world: dict[str, Any],
    tmp_path: Path,
    algorithm: str,
    digest_algorithm: str,
    scheme: str,
    sigopts: list[str],
) -> None:
    key = world["keys"][algorithm]
    digest = hashlib.new(digest_algorithm, DATA).digest()
    response = api.ok(api.sign(world["token"], key["id"], digest, digest_algorithm, scheme))
    assert response["key_id"] == key["id"]
    assert response["scheme"] == scheme
    assert response["digest_algorithm"] == digest_algorithm
    data = tmp_path / "artifact.bin"
    data.write_bytes(DATA)
    signature = tmp_path / "artifact.sig"
    signature.write_bytes(base64.b64decode(response["signature"]))
    public = tmp_path / "key.pem"
    public.write_text(key["public_key_pem"])
    result = openssl(
        "dgst", f"-{digest_algorithm}", *sigopts, "-verify", public, "-signature", signature, data
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "Verified OK"
    data.write_bytes(DATA + b"tampered")
    tampered = openssl(
        "dgst", f"-{digest_algorithm}", *sigopts, "-verify", public, "-signature", signature, data
    )
    assert tampered.returncode != 0
    assert "Verified OK" not in tampered.stdout


# ------------------------------------------------------------------ refused start


def test_a_server_with_a_wrong_pin_exits_with_one_clear_line(
    hsm_installation: Installation, token: SoftHsmToken, tmp_path: Path
) -> None:
    wrong = tmp_path / "wrong.pin"
    wrong.touch(mode=0o600)
    wrong_pin = "not-" + token.pin
    wrong.write_text(wrong_pin + "\n")
    result = subprocess.run(
        [SIGNERY, "serve", "--host", "127.0.0.1", "--port", "0", "--json"],
        env=server_env(hsm_installation, SIGNERY_NODE_ID="wrong-pin", **pkcs11_env(token, wrong)),
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert result.stdout == "", "it never announced a URL"
    assert "Traceback" not in output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert f"PKCS#11 login failed for token {token.label!r}: the user PIN is incorrect" in lines[0]
    assert "configuration_error" in lines[0]
    assert wrong_pin not in output
    assert token.pin not in output


def test_several_workers_each_open_the_token(
    hsm_installation: Installation, token: SoftHsmToken
) -> None:
    """Regression: workers once got the parent's nested settings as a Python repr
    in the environment and could not start with [pkcs11] configured."""
    with (
        running_server(
            hsm_installation, node="hsm-workers", SIGNERY_WORKERS="2", **pkcs11_env(token)
        ) as server,
        httpx.Client(base_url=server.url, timeout=60) as http,
    ):
        init = hsm_installation.init
        api = Api(http, hsm_installation.admin_token, init.issuer, init.root_tsg_id)
        stores = {
            s["name"]: s["healthy"]
            for s in api.ok(http.get("/api/v1/keystores", headers=api.admin))
        }
        assert stores == {"builtin": True, "pkcs11": True}
        tsg = api.create_tsg()
        key = api.create_key(tsg["id"], "EC_P256", ca="none", storage="pkcs11")
        token_ = api.access_token(api.create_account(tsg["id"]))
        for i in range(20):
            assert (
                api.sign(token_, key["name"], hashlib.sha256(bytes([i])).digest()).status_code
                == 200
            )
