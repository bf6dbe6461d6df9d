"""The ``signery`` command line, run as a real subprocess against a real
``signery serve`` process (SQLite and PostgreSQL), checked with real openssl.

An administrator logs in with the bootstrap API token and creates TSGs, an
account and keys; a build machine logs in as the account (profile ``build``)
and signs, and openssl verifies what it wrote. Each CLI call starts from a clean
environment: only SIGNERY_HOME is set, so nothing leaks in from the developer's
shell or profile.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.support import SIGNERY, Installation, ServerProcess, require_tool

pytestmark = pytest.mark.e2e

CLI_TIMEOUT = 60
SUBJECT = {"cn": "Signery CLI Test Signer", "org": "Signery Test Org", "country": "US"}


@dataclass
class Cli:
    """Runs the installed ``signery`` console script with a private SIGNERY_HOME."""

    home: Path
    work: Path
    env: dict[str, str]
    # Every signature made through the `build` profile:
    # (file, key name, digest algorithm, hashlib digest of the file as it was signed).
    ledger: list[tuple[Path, str, str, str]] = field(default_factory=list)

    def run(
        self, *args: str | Path, profile: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        argv = [SIGNERY, *(["--profile", profile] if profile else []), *map(str, args)]
        return subprocess.run(
            argv,
            env=self.env,
            cwd=self.work,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT,
            check=False,
        )

    def ok(self, *args: str | Path, profile: str | None = None) -> subprocess.CompletedProcess[str]:
        result = self.run(*args, profile=profile)
        assert result.returncode == 0, (
            f"signery {' '.join(map(str, args))} -> {result.returncode}\n"
            f"stdout: {result.stdout}\nstderr: {result.stderr}"
        )
        return result

    def json(self, *args: str | Path, profile: str | None = None) -> Any:
        return json.loads(self.ok(*args, "--json", profile=profile).stdout)

    def parallel(self, *calls: tuple[str | Path, ...]) -> list[Any]:
        """Independent `--json` calls at once (each is a separate process)."""
        with ThreadPoolExecutor(max_workers=len(calls)) as pool:
            return list(pool.map(lambda args: self.json(*args), calls))

    def fails(self, *args: str | Path, profile: str | None = None) -> str:
        """Run a command that must fail cleanly: exit 1, a message, no traceback."""
        result = self.run(*args, profile=profile)
        assert result.returncode == 1, (
            f"expected exit 1, got {result.returncode}\n"
            f"stdout: {result.stdout}\nstderr: {result.stderr}"
        )
        assert "Traceback" not in result.stderr, result.stderr
        assert result.stderr.strip(), "a failure must say why on stderr"
        return result.stderr

    @property
    def profiles_file(self) -> Path:
        return self.home / "profiles.json"

    def sign_build(self, key: str, *files: Path, extra: tuple[str, ...] = ()) -> list[Any]:
        """Sign through the `build` profile and record each signature in the ledger."""
        contents = [f.read_bytes() for f in files]
        results: list[Any] = self.json(
            "sign", "--key", key, "--format", "raw", *extra, *files, profile="build"
        )
        assert [r["file"] for r in results] == [str(f) for f in files]
        for f, data, r in zip(files, contents, results, strict=True):
            local = hashlib.new(r["digest_algorithm"], data).hexdigest()
            assert r["digest"] == local, "the CLI reported a digest that is not the file's"
            self.ledger.append((f, key, r["digest_algorithm"], local))
        return results


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def openssl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool("openssl"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )


def write_file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def cli(server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Cli:
    root = tmp_path_factory.mktemp("cli")
    home, work = root / "home", root / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIGNERY_")}
    env.update({"SIGNERY_HOME": str(home), "NO_COLOR": "1", "COLUMNS": "200"})
    return Cli(home, work, env)


@pytest.fixture(scope="module")
def admin(cli: Cli, server: ServerProcess, installation: Installation) -> dict[str, Any]:
    """The default profile: the bootstrap superuser's API token."""
    return cli.json("login", "--server", server.url, "--api-token", installation.admin_token)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def world(
    cli: Cli, admin: dict[str, Any], installation: Installation, server: ServerProcess
) -> dict[str, Any]:
    """TSGs, an account with a server-generated key, and keys, all made with the CLI.

    root ── team ── team-child     (the account lives in `team`)
        └── sibling
    """
    team, sibling = cli.parallel(("tsg", "create", "team"), ("tsg", "create", "sibling"))
    child = cli.json("tsg", "create", "team-child", "--parent", team["id"])
    key_file = cli.work / "build-account.pem"
    subject = ("--cn", SUBJECT["cn"], "--org", SUBJECT["org"], "--country", SUBJECT["country"])
    account, ec_key, rsa_key, child_key, sibling_key = cli.parallel(
        ("account", "create", "builder", "--tsg", team["id"], "--key-out", key_file),
        ("key", "create", "release-p384", "--tsg", team["id"], "--algorithm", "EC_P384",
         "--ca", "builtin", *subject),
        ("key", "create", "release-rsa", "--tsg", team["id"], "--algorithm", "RSA_3072"),
        ("key", "create", "child-p256", "--tsg", child["id"], "--algorithm", "EC_P256"),
        ("key", "create", "sibling-p256", "--tsg", sibling["id"], "--algorithm", "EC_P256"),
    )  # fmt: skip
    login = ("--server", server.url, "--client-id", account["client_id"], "--key-file", key_file)
    build = cli.json("login", *login, profile="build")
    return {
        "team": team,
        "child": child,
        "sibling": sibling,
        "account": account,
        "key_file": key_file,
        "ec_key": ec_key,
        "rsa_key": rsa_key,
        "child_key": child_key,
        "sibling_key": sibling_key,
        "build_login": build,
    }


@pytest.fixture(scope="module")
def public_keys(cli: Cli, world: dict[str, Any]) -> dict[str, Path]:
    """`signery key public-key NAME -o FILE` for the two keys the build machine signs with."""
    paths = {name: cli.work / f"{name}.pub.pem" for name in ("release-p384", "release-rsa")}
    written = cli.parallel(
        *(("key", "public-key", name, "-o", path) for name, path in paths.items())
    )
    created = {"release-p384": world["ec_key"], "release-rsa": world["rsa_key"]}
    for (name, path), answer in zip(paths.items(), written, strict=True):
        assert answer["file"] == str(path)
        assert answer["public_key_pem"] == path.read_text()
        assert path.read_text().strip() == created[name]["public_key_pem"].strip()
    return paths


@pytest.fixture(scope="module")
def ec_signed(cli: Cli, world: dict[str, Any]) -> tuple[list[Path], list[Any]]:
    files = [
        write_file(cli.work / "app-1.bin", os.urandom(4096)),
        write_file(cli.work / "app-2.tar", b"second artifact\n" * 1000),
    ]
    return files, cli.sign_build("release-p384", *files)


# ------------------------------------------------------------------ administrator


def test_admin_login_saves_a_private_profile(
    cli: Cli, admin: dict[str, Any], server: ServerProcess, installation: Installation
) -> None:
    assert admin["profile"] == "default"
    assert admin["server"] == server.url
    assert admin["api_token"] == "<set>", "login --json must not echo the API token"
    assert mode_of(cli.profiles_file) == 0o600
    saved = json.loads(cli.profiles_file.read_text())["profiles"]["default"]
    assert saved["server"] == server.url
    assert saved["api_token"] == installation.admin_token


def test_tsg_list_and_tree(cli: Cli, world: dict[str, Any], installation: Installation) -> None:
    root_id = installation.init.root_tsg_id
    team, child, sibling = world["team"], world["child"], world["sibling"]
    assert team["parent_id"] == root_id
    assert sibling["parent_id"] == root_id
    assert child["parent_id"] == team["id"]
    assert child["depth"] == team["depth"] + 1

    listed = {t["id"]: t for t in cli.json("tsg", "list")}
    assert {root_id, team["id"], child["id"], sibling["id"]} <= set(listed)
    assert listed[child["id"]]["name"] == "team-child"

    forest = cli.json("tsg", "tree")
    assert [node["id"] for node in forest] == [root_id]
    under_root = {node["id"]: node for node in forest[0]["children"]}
    assert {team["id"], sibling["id"]} <= set(under_root)
    assert [c["id"] for c in under_root[team["id"]]["children"]] == [child["id"]]
    assert under_root[sibling["id"]]["children"] == []


def test_account_create_writes_the_private_key_to_a_0600_file(world: dict[str, Any]) -> None:
    account, key_file = world["account"], world["key_file"]
    assert account["private_key_pem"] is None, "the private key must not be printed"
    assert account["private_key_file"] == str(key_file)
    assert account["tsg_id"] == world["team"]["id"]
    assert mode_of(key_file) == 0o600
    private = serialization.load_pem_private_key(key_file.read_bytes(), None)
    spki = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert [k["fingerprint"] for k in account["keys"]] == [hashlib.sha256(spki).hexdigest()]


def test_account_with_its_own_public_key_can_log_in(
    cli: Cli, world: dict[str, Any], server: ServerProcess
) -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    key_file = cli.work / "own-rsa.pem"
    key_file.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_file.chmod(0o600)
    public_file = write_file(
        cli.work / "own-rsa.pub.pem",
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    )
    account = cli.json(
        "account", "create", "own-key", "--tsg", world["team"]["id"], "--public-key", public_file
    )
    assert account["private_key_pem"] is None
    assert len(account["keys"]) == 1
    assert account["keys"][0]["public_key_pem"].strip() == public_file.read_text().strip()

    credentials = ("--client-id", account["client_id"], "--key-file", key_file)
    login = cli.json("login", "--server", server.url, *credentials, profile="own")
    assert login["client_id"] == account["client_id"]
    assert login["key_file"] == str(key_file.resolve())
    names = {k["name"] for k in cli.json("keys", profile="own")}
    assert "release-p384" in names


def test_key_certificate_chain_verifies_with_openssl(
    cli: Cli, world: dict[str, Any], public_keys: dict[str, Path]
) -> None:
    assert world["ec_key"]["algorithm"] == "EC_P384"
    chain_file = cli.work / "chain.pem"
    cli.ok("key", "chain", "release-p384", "-o", chain_file)
    chain = x509.load_pem_x509_certificates(chain_file.read_bytes())
    assert len(chain) == 3, "leaf, issuing CA, root"
    leaf, issuing, root = chain
    assert root.issuer == root.subject
    assert issuing.issuer == root.subject
    assert leaf.issuer == issuing.subject
    parts = {}
    for name, cert in (("leaf", leaf), ("issuing", issuing), ("root", root)):
        parts[name] = write_file(
            cli.work / f"{name}.pem", cert.public_bytes(serialization.Encoding.PEM)
        )
    result = openssl(
        "verify", "-CAfile", parts["root"], "-untrusted", parts["issuing"], parts["leaf"]
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == f"{parts['leaf']}: OK"

    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert ExtendedKeyUsageOID.CODE_SIGNING in eku.value
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical
    assert ku.value.digital_signature
    assert not ku.value.key_cert_sign
    basic = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.value.ca is False

    def attr(oid: x509.ObjectIdentifier) -> list[str]:
        return [str(a.value) for a in leaf.subject.get_attributes_for_oid(oid)]

    assert attr(NameOID.COMMON_NAME) == [SUBJECT["cn"]]
    assert attr(NameOID.ORGANIZATION_NAME) == [SUBJECT["org"]]
    assert attr(NameOID.COUNTRY_NAME) == [SUBJECT["country"]]

    # The certificate certifies the key the server signs with.
    served = serialization.load_pem_public_key(public_keys["release-p384"].read_bytes())
    assert leaf.public_key() == served


# ------------------------------------------------------------------ build machine


def test_build_login_lists_exactly_the_keys_of_the_account_subtree(
    cli: Cli, world: dict[str, Any]
) -> None:
    build = world["build_login"]
    assert build["profile"] == "build"
    assert build["client_id"] == world["account"]["client_id"]
    assert build["api_token"] is None
    keys = cli.json("keys", profile="build")
    assert sorted(k["name"] for k in keys) == ["child-p256", "release-p384", "release-rsa"]
    by_name = {k["name"]: k for k in keys}
    assert by_name["release-p384"]["id"] == world["ec_key"]["id"]
    assert by_name["child-p256"]["tsg_id"] == world["child"]["id"]
    assert world["sibling_key"]["id"] not in {k["id"] for k in keys}


def test_sign_raw_ec_p384_verifies_with_openssl(
    cli: Cli, ec_signed: tuple[list[Path], list[Any]], public_keys: dict[str, Path]
) -> None:
    files, results = ec_signed
    for f, r in zip(files, results, strict=True):
        assert r["signature"] == str(f) + ".sig"
        assert r["key"] == "release-p384"
        assert r["key_version"] == 1
        assert r["scheme"] == "ecdsa"
        assert r["digest_algorithm"] == "sha384"
        assert r["digest"] == hashlib.sha384(f.read_bytes()).hexdigest()
        result = openssl(
            "dgst",
            "-sha384",
            "-verify",
            public_keys["release-p384"],
            "-signature",
            r["signature"],
            f,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.strip() == "Verified OK"


@pytest.mark.parametrize(
    ("scheme", "sigopts"),
    [
        pytest.param(None, [], id="rsa-pkcs1v15-default"),
        pytest.param(
            "rsa-pss",
            ["-sigopt", "rsa_padding_mode:pss", "-sigopt", "rsa_pss_saltlen:digest"],
            id="rsa-pss",
        ),
    ],
)
def test_sign_raw_rsa_verifies_with_openssl(
    cli: Cli,
    world: dict[str, Any],
    public_keys: dict[str, Path],
    scheme: str | None,
    sigopts: list[str],
) -> None:
    f = write_file(cli.work / f"rsa-{scheme or 'default'}.bin", os.urandom(10_000))
    [r] = cli.sign_build("release-rsa", f, extra=("--scheme", scheme) if scheme else ())
    assert r["scheme"] == (scheme or "rsa-pkcs1v15")
    assert r["digest_algorithm"] == "sha256"
    assert len(Path(r["signature"]).read_bytes()) == 384, "RSA-3072 signature octets"
    verify = ["dgst", "-sha256", *sigopts, "-verify", public_keys["release-rsa"]]
    result = openssl(*verify, "-signature", r["signature"], f)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "Verified OK"
    # The other padding must not verify: the scheme really was applied.
    other = [] if sigopts else ["-sigopt", "rsa_padding_mode:pss"]
    wrong = openssl("dgst", "-sha256", *other, "-verify", public_keys["release-rsa"],
                    "-signature", r["signature"], f)  # fmt: skip
    assert wrong.returncode != 0
    assert "Verified OK" not in wrong.stdout


def test_verify_accepts_then_rejects_a_modified_file(cli: Cli, world: dict[str, Any]) -> None:
    f = write_file(cli.work / "to-modify.bin", b"original content\n")
    cli.sign_build("release-p384", f)
    [ok] = cli.json("verify", "--key", "release-p384", f, profile="build")
    assert ok["valid"] is True
    assert ok["signature"] == str(f) + ".sig"

    f.write_bytes(b"original content!\n")
    result = cli.run("verify", "--key", "release-p384", f, "--json", profile="build")
    assert result.returncode == 1, result.stdout + result.stderr
    [bad] = json.loads(result.stdout)
    assert bad["valid"] is False
    assert "signature_invalid" in result.stderr
    assert "Traceback" not in result.stderr


def test_digest_only_prints_local_digests_and_signs_nothing(
    cli: Cli, world: dict[str, Any]
) -> None:
    f = write_file(cli.work / "digest-only.bin", os.urandom(3000))
    [d256] = cli.json("sign", "--key", "release-p384", "--digest-only", f, profile="build")
    assert d256 == {
        "file": str(f),
        "digest_algorithm": "sha256",
        "digest": hashlib.sha256(f.read_bytes()).hexdigest(),
    }
    sha512 = ("--digest-only", "--digest-algorithm", "sha512")
    [d512] = cli.json("sign", "--key", "release-p384", *sha512, f, profile="build")
    assert d512["digest"] == hashlib.sha512(f.read_bytes()).hexdigest()
    human = cli.ok("sign", "--key", "release-p384", "--digest-only", f, profile="build")
    assert human.stdout.split() == [d256["digest"], str(f)]
    assert not Path(str(f) + ".sig").exists()
    events = cli.json("audit", "list", "--kind", "signing.sign", "--limit", "1000")
    assert d256["digest"] not in {e["digest"] for e in events}


def test_audit_has_one_event_per_signed_file(
    cli: Cli, world: dict[str, Any], ec_signed: tuple[list[Path], list[Any]]
) -> None:
    assert cli.ledger, "nothing was signed before the audit check"
    events = cli.json("audit", "list", "--limit", "1000")
    signed = [
        e
        for e in events
        if e["kind"] == "signing.sign.succeeded" and e["principal"]["id"] == world["account"]["id"]
    ]
    assert len(signed) == len(cli.ledger)
    by_digest = {e["digest"]: e for e in signed}
    assert len(by_digest) == len(signed), "every signed file had distinct content"
    keys = {"release-p384": world["ec_key"]["id"], "release-rsa": world["rsa_key"]["id"]}
    for _file, key, digest_algorithm, digest in cli.ledger:
        event = by_digest[digest]
        assert event["outcome"] == "succeeded"
        assert event["key_id"] == keys[key]
        assert event["key_version"] == 1
        assert event["details"]["digest_algorithm"] == digest_algorithm
        assert event["client_tool"].startswith("signery-cli/")


def test_usage_counts_every_signature(
    cli: Cli, world: dict[str, Any], ec_signed: tuple[list[Path], list[Any]]
) -> None:
    counters = {(c["subject_type"], c["subject_id"]): c for c in cli.json("usage")["counters"]}
    account = counters[("account", world["account"]["id"])]
    assert account["successes"] == len(cli.ledger)
    for name, key in (("release-p384", world["ec_key"]), ("release-rsa", world["rsa_key"])):
        signed_with = sum(1 for _, k, _, _ in cli.ledger if k == name)
        assert counters[("key", key["id"])]["successes"] == signed_with
    assert ("key", world["sibling_key"]["id"]) not in counters or (
        counters[("key", world["sibling_key"]["id"])]["successes"] == 0
    )


def test_disabled_account_cannot_sign_until_enabled(
    cli: Cli, world: dict[str, Any], ec_signed: tuple[list[Path], list[Any]]
) -> None:
    client_id = world["account"]["client_id"]
    signed_file = ec_signed[0][0]
    sig = Path(str(signed_file) + ".sig")
    before = (sig.read_bytes(), sig.stat().st_mtime_ns)
    fresh = write_file(cli.work / "while-disabled.bin", b"not to be signed")

    assert cli.json("account", "disable", client_id)["status"] == "disabled"
    try:
        stderr = cli.fails("sign", "--key", "release-p384", signed_file, fresh, profile="build")
        # A new CLI process asks for a token first; the token endpoint refuses a
        # disabled account with its own code (RFC 6749 invalid_grant family).
        assert "client_disabled" in stderr
        assert (sig.read_bytes(), sig.stat().st_mtime_ns) == before
        assert not Path(str(fresh) + ".sig").exists()
    finally:
        assert cli.json("account", "enable", client_id)["status"] == "active"
    [r] = cli.sign_build("release-p384", fresh)
    assert Path(r["signature"]).stat().st_size > 0


# ------------------------------------------------------------------ errors


def test_unknown_key_is_key_not_found(cli: Cli, world: dict[str, Any]) -> None:
    f = write_file(cli.work / "unknown-key.bin", b"x")
    stderr = cli.fails("sign", "--key", "no-such-key", f, profile="build")
    assert "key_not_found" in stderr
    assert not Path(str(f) + ".sig").exists()
    # A key in a sibling TSG is as invisible as a missing one.
    stderr = cli.fails("sign", "--key", world["sibling_key"]["id"], f, profile="build")
    assert "key_not_found" in stderr


def audit_events_after(
    server: ServerProcess, installation: Installation, seq: int | None = None
) -> list[dict[str, Any]]:
    """The audit events recorded after position ``seq`` (None: the newest one only)."""
    params: dict[str, Any] = (
        {"order": "desc", "limit": 1} if seq is None else {"cursor": seq, "limit": 1000}
    )
    page = httpx.get(
        f"{server.url}/api/v1/audit/events",
        params=params,
        headers={"Authorization": f"Bearer {installation.admin_token}"},
        timeout=CLI_TIMEOUT,
    ).json()
    return page["events"]  # type: ignore[no-any-return]


def signing_events_after(
    server: ServerProcess, installation: Installation, seq: int
) -> list[dict[str, Any]]:
    return [
        e for e in audit_events_after(server, installation, seq) if e["kind"].startswith("signing.")
    ]


def audit_seq(server: ServerProcess, installation: Installation) -> int:
    """The newest audit event's position (what the server recorded so far)."""
    newest = audit_events_after(server, installation)
    return int(newest[0]["seq"]) if newest else 0


@pytest.mark.parametrize("fmt", ["raw", "cms", "openpgp"])
@pytest.mark.parametrize("scheme", ["rsa-pss", "rsa-pkcs1v15"])
def test_a_scheme_the_key_cannot_make_is_refused_before_anything_is_sent(
    cli: Cli,
    world: dict[str, Any],
    server: ServerProcess,
    installation: Installation,
    fmt: str,
    scheme: str,
) -> None:
    """Regression: `--scheme rsa-pss` with an EC key reached the server (and its
    audit trail) with the raw format, though the formats page says the client
    refuses it first. Nothing is hashed, sent or written."""
    f = write_file(cli.work / f"{scheme}-on-ec-{fmt}.bin", b"an EC key makes ECDSA only\n")
    seq = audit_seq(server, installation)
    stderr = cli.fails(
        "sign", "--key", "release-p384", "--format", fmt, "--scheme", scheme, f, profile="build"
    )
    assert "scheme_not_allowed" in stderr
    assert f"{scheme} cannot be used with a EC_P384 key" in stderr
    # The account's token and key listing are fetched (they say which algorithm
    # the key has); no signing request follows.
    assert signing_events_after(server, installation, seq) == []
    assert sorted(p.name for p in cli.work.glob(f"{f.name}*")) == [f.name]


def test_signing_a_missing_file_is_a_clear_error(cli: Cli, world: dict[str, Any]) -> None:
    missing = cli.work / "does-not-exist.bin"
    stderr = cli.fails("sign", "--key", "release-p384", missing, profile="build")
    assert str(missing) in stderr
    assert "not a readable file" in stderr


def test_unknown_profile_is_a_clear_error(cli: Cli, world: dict[str, Any]) -> None:
    """A mistyped --profile is named as such, with the way to create it."""
    stderr = cli.fails("keys", profile="nosuch")
    assert "no profile named 'nosuch'" in stderr
    assert "login" in stderr
    assert "Traceback" not in stderr


def test_login_with_a_wrong_api_token_saves_nothing(
    cli: Cli, admin: dict[str, Any], server: ServerProcess
) -> None:
    before = cli.profiles_file.read_bytes()
    stderr = cli.fails(
        "login", "--server", server.url, "--api-token", "sgy_not-a-real-token", profile="wrong"
    )
    assert "invalid_token" in stderr
    assert cli.profiles_file.read_bytes() == before
    assert "wrong" not in json.loads(before)["profiles"]


def test_profiles_file_is_0600_and_holds_no_private_key(
    cli: Cli, world: dict[str, Any], ec_signed: tuple[list[Path], list[Any]]
) -> None:
    text = cli.profiles_file.read_text()
    assert mode_of(cli.profiles_file) == 0o600
    profiles = json.loads(text)["profiles"]
    assert profiles["build"]["key_file"] == str(world["key_file"].resolve())
    assert profiles["build"]["client_id"] == world["account"]["client_id"]
    assert "PRIVATE KEY" not in text
    for line in world["key_file"].read_text().splitlines()[1:-1]:
        assert line not in text
    assert not [p.name for p in cli.home.iterdir() if p.name != "profiles.json"]


# ------------------------------------------------------------------ certificate lifecycle


def test_renew_reissue_and_history_from_the_cli(cli: Cli, world: dict[str, Any]) -> None:
    tsg = world["sibling"]["id"]
    created = cli.json(
        "key", "create", "lifecycle-p256", "--tsg", tsg, "--algorithm", "EC_P256",
        "--ca", "builtin", "--cn", "Lifecycle", "--validity-days", "10",
    )  # fmt: skip
    soon = cli.json("key", "list", "--tsg", tsg, "--expiring-within", "30d")
    assert [k["name"] for k in soon] == ["lifecycle-p256"]
    assert cli.json("key", "list", "--tsg", tsg, "--expiring-within", "1w") == []
    human = cli.ok("key", "list", "--tsg", tsg, "--expiring-within", "4w").stdout
    assert "lifecycle-p256" in human
    assert "until" in human

    renewed = cli.json("key", "renew", "lifecycle-p256", "--tsg", tsg, "--validity-days", "200")
    assert renewed["public_key_pem"] == created["public_key_pem"]
    assert renewed["certificate_chain"][0] != created["certificate_chain"][0]
    assert cli.json("key", "list", "--tsg", tsg, "--expiring-within", "30d") == []

    reissued = cli.json(
        "key", "reissue", "lifecycle-p256", "--tsg", tsg,
        "--subject", r"CN=Example Release,O=Example\, Inc.", "--country", "DE",
    )  # fmt: skip
    leaf = x509.load_pem_x509_certificate(reissued["certificate_chain"][0].encode())
    assert leaf.subject.rfc4514_string() == r"C=DE,O=Example\, Inc.,CN=Example Release"
    assert (
        leaf.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
        == created["public_key_pem"]
    )

    history = cli.json("key", "certificates", "lifecycle-p256", "--tsg", tsg)
    assert [h["status"] for h in history] == ["current", "superseded", "superseded"]
    assert history[0]["serial"] == format(leaf.serial_number, "x")
    table = cli.ok("key", "certificates", "lifecycle-p256", "--tsg", tsg).stdout
    assert history[2]["serial"] in table


def test_revoke_certificate_and_fetch_the_crl_from_the_cli(cli: Cli, world: dict[str, Any]) -> None:
    tsg = world["sibling"]["id"]
    key = cli.json(
        "key", "create", "revoked-p256", "--tsg", tsg, "--algorithm", "EC_P256", "--ca", "builtin"
    )
    chain = [c.encode() for c in key["certificate_chain"]]
    leaf_file = write_file(cli.work / "revoked-leaf.pem", chain[0])
    issuing_file = write_file(cli.work / "revoked-issuing.pem", chain[1])
    root_file = write_file(cli.work / "revoked-root.pem", chain[2])
    crl_file = cli.work / "ca.crl.pem"

    def verify() -> subprocess.CompletedProcess[str]:
        return openssl(
            "verify", "-crl_check", "-CAfile", root_file, "-untrusted", issuing_file,
            "-CRLfile", crl_file, leaf_file,
        )  # fmt: skip

    before = cli.json("ca", "crl", "-o", crl_file, "--pem")
    assert verify().returncode == 0
    record = cli.json(
        "key", "revoke-certificate", "revoked-p256", "--tsg", tsg, "--reason", "keyCompromise"
    )
    assert record["status"] == "revoked"
    after = cli.json("ca", "crl", "-o", crl_file, "--pem")
    assert after["number"] > before["number"]
    assert after["revoked"] == before["revoked"] + 1
    refused = verify()
    assert refused.returncode != 0
    assert "certificate revoked" in refused.stdout + refused.stderr

    der_file = cli.work / "ca.crl"
    assert "written to" in cli.ok("ca", "crl", "-o", der_file).stdout
    crl = x509.load_der_x509_crl(der_file.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(int(record["serial"], 16)) is not None

    again = cli.fails("key", "revoke-certificate", "revoked-p256", "--tsg", tsg)
    assert "already revoked" in again
    bogus = cli.fails(
        "key", "revoke-certificate", "lifecycle-p256", "--tsg", tsg, "--reason", "bored"
    )
    assert "invalid_request" in bogus


def test_ca_revoke_by_the_serial_openssl_prints(cli: Cli, world: dict[str, Any]) -> None:
    tsg = world["sibling"]["id"]
    key = cli.json(
        "key",
        "create",
        "ca-revoked-p256",
        "--tsg",
        tsg,
        "--algorithm",
        "EC_P256",
        "--ca",
        "builtin",
    )
    leaf_file = write_file(cli.work / "ca-revoked-leaf.pem", key["certificate_chain"][0].encode())
    leaf = x509.load_pem_x509_certificate(leaf_file.read_bytes())
    printed = openssl("x509", "-in", leaf_file, "-noout", "-serial").stdout.strip()
    serial = printed.removeprefix("serial=")
    crl_file = cli.work / "ca-revoke.crl.pem"

    before = cli.json("ca", "crl", "-o", crl_file, "--pem")
    said = cli.ok("ca", "revoke", serial, "--reason", "superseded").stdout
    assert format(leaf.serial_number, "x") in said
    assert key["id"] in said
    after = cli.json("ca", "crl", "-o", crl_file, "--pem")
    assert after["revoked"] == before["revoked"] + 1
    crl = x509.load_pem_x509_crl(crl_file.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(leaf.serial_number) is not None
    history = cli.json("key", "certificates", "ca-revoked-p256", "--tsg", tsg)
    assert [(h["status"], h["revocation_reason"]) for h in history] == [("revoked", "superseded")]

    again = cli.fails("ca", "revoke", serial, "--json")
    assert "already revoked" in again
    assert "invalid_request" in cli.fails("ca", "revoke", "not-a-serial")
    assert "certificate_not_found" in cli.fails("ca", "revoke", "7" * 32)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("key", "list", "--expiring-within", "soon"), "not a duration"),
        (("key", "reissue", "lifecycle-p256"), "give the new subject"),
        (("key", "reissue", "lifecycle-p256", "--subject", "CN"), "expected NAME=value"),
        (("key", "reissue", "x", "--subject", "CN=a", "--cn", "b"), "given both"),
        (("key", "reissue", "x", "--subject", "XX=a"), "expected NAME=value"),
    ],
)
def test_bad_lifecycle_arguments_are_usage_errors(
    cli: Cli, world: dict[str, Any], args: tuple[str, ...], message: str
) -> None:
    result = cli.run(*args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------ timestamps


@pytest.mark.interop
def test_timestamp_writes_a_reply_that_openssl_verifies(
    cli: Cli, world: dict[str, Any], ec_signed: tuple[list[Path], list[Any]]
) -> None:
    root = write_file(cli.work / "ts-root.pem", world["ec_key"]["certificate_chain"][2].encode())
    signature = Path(ec_signed[1][0]["signature"])  # timestamp a signature, as formats will
    query = cli.work / "sig.tsq"
    # The build profile: only the hash leaves the machine, with the account's token.
    (answer,) = cli.json(
        "timestamp", signature, "--digest-algorithm", "sha384", "--query-out", query,
        profile="build",
    )  # fmt: skip
    reply = Path(answer["output"])
    assert answer["ok"] is True
    assert reply == signature.with_name(signature.name + ".tsr")
    assert answer["digest_algorithm"] == "sha384"
    for source in (("-data", signature), ("-queryfile", query)):  # -queryfile checks the nonce
        done = openssl("ts", "-verify", *source, "-in", reply, "-CAfile", root)
        assert "Verification: OK" in done.stdout, done.stdout + done.stderr
    shown = openssl("ts", "-reply", "-in", reply, "-text").stdout
    assert "Status: Granted." in shown
    # openssl pads the hex to whole bytes (0x0B00...): compare the numbers.
    (printed,) = re.findall(r"Serial number: 0x([0-9A-F]+)", shown)
    assert int(printed, 16) == int(answer["serial"], 16)

    # The admin profile (API token) works too, and names the output with -o.
    other = cli.work / "other.tsr"
    cli.ok("timestamp", signature, "-o", other)
    done = openssl("ts", "-verify", "-data", signature, "-in", other, "-CAfile", root)
    assert "Verification: OK" in done.stdout, done.stdout + done.stderr


def test_timestamp_failures_are_per_file_and_write_nothing(cli: Cli, world: dict[str, Any]) -> None:
    artifact = write_file(cli.work / "ts-unreachable.bin", b"artifact\n")
    stderr = cli.fails("timestamp", artifact, "--tsa", "http://127.0.0.1:9/tsa")
    assert "timestamp_failed" in stderr
    assert not artifact.with_name(artifact.name + ".tsr").exists()
    assert not list(cli.work.glob(".*.partial"))
    usage = cli.fails("timestamp", artifact, artifact, "-o", cli.work / "x.tsr")
    assert "exactly one file" in usage
    missing_file = cli.fails("timestamp", cli.work / "no-such-file")
    assert "not a readable file" in missing_file
    unwritable = cli.fails("timestamp", artifact, "-o", cli.work / "no-such-dir" / "x.tsr")
    assert "cannot write" in unwritable


# ------------------------------------------------------------------ large files


def run_with_terminal_stderr(cli: Cli, *args: str | Path) -> tuple[int, str, str]:
    """Run signery with stderr on a pseudo-terminal: (exit status, stdout, what the
    terminal showed)."""
    master, slave = os.openpty()
    argv = [SIGNERY, "--profile", "build", *map(str, args)]
    env = {**cli.env, "TERM": "xterm", "COLUMNS": "120"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(argv, env=env, cwd=cli.work, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    shown = bytearray()
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    assert proc.stdout is not None
    with proc.stdout:
        stdout = proc.stdout.read().decode()
    code = proc.wait(timeout=CLI_TIMEOUT)
    os.close(master)
    return code, stdout, shown.decode(errors="replace")


def test_a_large_file_shows_progress_on_a_terminal_only(cli: Cli, world: dict[str, Any]) -> None:
    big = cli.work / "large.bin"
    with big.open("wb") as f:
        block = os.urandom(1024 * 1024)
        for _ in range(65):  # over the 64 MiB threshold
            f.write(block)
    small = write_file(cli.work / "small-beside.bin", b"small\n")
    code, _, shown = run_with_terminal_stderr(cli, "sign", "--key", "release-p384", big, small)
    assert code == 0, shown
    assert "large.bin" in shown  # the bar's label, drawn on the terminal
    assert "MB" in shown or "MiB" in shown or "GB" in shown  # its byte counter
    assert "small-beside.bin" not in shown  # small files get no bar
    # --json never draws one, even on a terminal; output stays parseable.
    code, stdout, shown = run_with_terminal_stderr(
        cli, "sign", "--key", "release-p384", "--json", big
    )
    assert code == 0, shown
    assert json.loads(stdout)[0]["ok"] is True
    assert "large.bin" not in shown
    # Not a terminal (captured stderr): no bar either.
    piped = cli.ok("sign", "--key", "release-p384", big, profile="build")
    assert "━" not in piped.stderr
    assert piped.stderr.strip() == ""
    big.unlink()


def test_verify_after_a_rotation_accepts_signatures_of_every_version(
    cli: Cli, world: dict[str, Any]
) -> None:
    """`signery verify --key` checks earlier versions' public keys too: a rotation
    must not make the signatures made before it unverifiable. (Last in the module:
    its signatures are outside the ledger the audit and usage tests count.)"""
    cli.json(
        "key", "create", "rotating-p256", "--tsg", world["team"]["id"], "--algorithm", "EC_P256"
    )  # fmt: skip
    before = write_file(cli.work / "before-rotation.bin", os.urandom(2048))
    [old] = cli.json("sign", "--key", "rotating-p256", before, profile="build")
    assert old["key_version"] == 1
    assert cli.json("key", "rotate", "rotating-p256")["current_version"] == 2
    after = write_file(cli.work / "after-rotation.bin", os.urandom(2048))
    [new] = cli.json("sign", "--key", "rotating-p256", after, profile="build")
    assert new["key_version"] == 2

    [listed] = [k for k in cli.json("keys", profile="build") if k["name"] == "rotating-p256"]
    assert [(v["version"], v["status"]) for v in listed["previous_versions"]] == [(1, "archived")]
    results = cli.json("verify", "--key", "rotating-p256", before, after, profile="build")
    assert [r["valid"] for r in results] == [True, True], results
    # Each signature verifies with its own version's key only.
    v1 = cli.work / "rotating-v1.pem"
    v1.write_text(listed["previous_versions"][0]["public_key_pem"])
    checked = cli.run("verify", "--public-key", v1, before, after, "--json", profile="build")
    assert [r["valid"] for r in json.loads(checked.stdout)] == [True, False]


def test_keys_lists_what_signs_and_verify_still_checks_a_revoked_key(
    cli: Cli, world: dict[str, Any]
) -> None:
    """`signery keys` lists what the account can sign with now (`--all`: the others
    too, with the reason); `signery verify --key` still finds a key that cannot
    sign any more, for the signatures it made before. (Last in the module: its
    signature is outside the ledger the audit and usage tests count.)"""
    cli.json(
        "key", "create", "withdrawn-p256", "--tsg", world["team"]["id"], "--algorithm", "EC_P256",
        "--ca", "builtin",
    )  # fmt: skip
    signed = write_file(cli.work / "before-revocation.bin", os.urandom(1024))
    cli.json("sign", "--key", "withdrawn-p256", signed, profile="build")
    cli.json("key", "revoke-certificate", "withdrawn-p256", "--reason", "superseded")

    assert "withdrawn-p256" not in {k["name"] for k in cli.json("keys", profile="build")}
    everything = cli.ok("keys", "--all", profile="build").stdout
    (line,) = [x for x in everything.splitlines() if "withdrawn-p256" in x]
    assert "no: certificate_revoked" in line
    [entry] = [
        k for k in cli.json("keys", "--all", profile="build") if k["name"] == "withdrawn-p256"
    ]
    assert (entry["usable"], entry["unusable_reason"]) == (False, "certificate_revoked")
    refused = cli.fails("sign", "--key", "withdrawn-p256", signed, profile="build")
    assert "certificate_revoked" in refused
    [ok] = cli.json("verify", "--key", "withdrawn-p256", signed, profile="build")
    assert ok["valid"] is True
