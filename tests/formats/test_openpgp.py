"""The ``openpgp`` format and ``signery key export --openpgp``, with RemoteSigners
of a real ``signery serve`` process, checked by the real verifier: GnuPG.

gpg runs with ``--batch`` in a private home directory; it imports the public keys
Signery exports (self-signatures made through the service) and verifies the
detached signatures. Its machine-readable status lines (``--status-fd``) are
checked, not its prose: ``VALIDSIG`` names the fingerprint, the algorithms and
the signature class gpg actually verified.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import math
import os
import random
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from signery.client import Client, RemoteSigner
from signery.crypto import HASH_CHUNK
from signery.formats import (
    OpenPgpFormat,
    OpenPgpInvalidUserId,
    OpenPgpKeyTimeUnknown,
    OpenPgpKeyUnsupported,
    OpenPgpMalformed,
    OpenPgpPublicKey,
    OpenPgpTimestampUnsupported,
    SignOptions,
    export_public_key,
    get_format,
)
from signery.formats._openpgp import armor, crc24, dearmor, parse_signature
from signery.protocol import Algorithm, DigestAlgorithm, SignatureScheme
from tests.support import SIGNERY, Api, Installation, ServerProcess, require_tool

pytestmark = pytest.mark.e2e

ALGORITHMS = [
    Algorithm.RSA_2048,
    Algorithm.RSA_3072,
    Algorithm.EC_P256,
    Algorithm.EC_P384,
    Algorithm.EC_P521,
]
# What gpg's VALIDSIG reports (RFC 4880 §9.1 and §9.4 numbers).
PK_ALGORITHM = {a: ("1" if a.is_rsa else "19") for a in ALGORITHMS}
HASH_ALGORITHM = {
    Algorithm.RSA_2048: "8",
    Algorithm.RSA_3072: "8",
    Algorithm.EC_P256: "8",
    Algorithm.EC_P384: "9",
    Algorithm.EC_P521: "10",
}
UID = "Signery Release <release@signery.test>"
PGP = OpenPgpFormat()
TIMEOUT = 60


# ------------------------------------------------------------------ gpg


@dataclass
class Gpg:
    """gpg in batch mode with a private home directory."""

    home: Path

    def run(
        self, *args: str | Path, stdin: bytes | None = None
    ) -> subprocess.CompletedProcess[str]:
        command = [require_tool("gpg"), "--batch", "--no-tty", "--homedir", str(self.home)]
        return subprocess.run(
            [*command, "--status-fd", "1", *map(str, args)],
            input=stdin.decode() if stdin is not None else None,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )

    def status(self, *args: str | Path) -> tuple[int, dict[str, list[str]]]:
        """Exit code and the ``[GNUPG:] KEYWORD args`` status lines, by keyword."""
        result = self.run(*args)
        lines: dict[str, list[str]] = {}
        for line in result.stdout.splitlines():
            if line.startswith("[GNUPG:] "):
                keyword, _, rest = line[9:].partition(" ")
                lines.setdefault(keyword, []).append(rest)
        return result.returncode, lines

    def verify(self, signature: Path, file: Path) -> tuple[int, dict[str, list[str]]]:
        return self.status("--verify", signature, file)

    def fingerprints(self) -> dict[str, str]:
        """Fingerprint -> creation time (seconds) of every key gpg holds."""
        result = self.run("--with-colons", "--fixed-list-mode", "--list-keys")
        assert result.returncode == 0, result.stderr
        found: dict[str, str] = {}
        created = ""
        for line in result.stdout.splitlines():
            fields = line.split(":")
            if fields[0] == "pub":
                created = fields[5]
            elif fields[0] == "fpr" and created:
                found[fields[9]] = created
                created = ""
        return found


@pytest.fixture(scope="module")
def gpg(installation: Installation, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gpg]:
    """One keyring per installation (database backend): each imports its own keys."""
    home = tmp_path_factory.mktemp("gnupg")
    home.chmod(0o700)
    yield Gpg(home)
    # Verification starts no agent, but an import may; stop whatever started here.
    gpgconf = require_tool("gpgconf")
    subprocess.run(
        [gpgconf, "--homedir", str(home), "--kill", "all"], capture_output=True, check=False
    )


# ------------------------------------------------------------------ keys


@dataclass
class World:
    client: Client
    signers: dict[Algorithm, RemoteSigner]
    exported: dict[Algorithm, OpenPgpPublicKey]
    keys: dict[Algorithm, dict[str, Any]]
    account: Any


@pytest.fixture(scope="module")
def world(server: ServerProcess, server_api: Api, gpg: Gpg) -> Iterator[World]:
    tsg = server_api.create_tsg()
    account = server_api.create_account(tsg["id"])
    # No certificates: an OpenPGP key needs none.
    keys = {a: server_api.create_key(tsg["id"], a.value, ca="none") for a in ALGORITHMS}
    with Client(server.url, credentials=account.credentials()) as client:
        signers = {a: client.signer(key["name"]) for a, key in keys.items()}
        exported = {a: export_public_key(s, UID) for a, s in signers.items()}
        for algorithm, public in exported.items():
            result = gpg.run("--import", stdin=public.armored().encode("ascii"))
            assert result.returncode == 0, f"{algorithm}: {result.stderr}"
            assert f"IMPORT_OK 1 {public.fingerprint}" in result.stdout, result.stdout
        yield World(client, signers, exported, keys, account)


def signed(signer: RemoteSigner, directory: Path, data: bytes, **options: Any) -> tuple[Path, Path]:
    file = directory / "artifact.tar.gz"
    file.write_bytes(data)
    chosen = SignOptions(**options)
    result = PGP.sign(signer, file, PGP.default_output(file, chosen), chosen)
    return file, result.output


def key_uses(server_api: Api, key: dict[str, Any]) -> tuple[int, int]:
    """(successes, failures) the server counted for a key: proof of what was sent."""
    return server_api.counter(server_api.usage(), "key", key["id"])


def test_registered_under_its_name() -> None:
    assert isinstance(get_format("openpgp"), OpenPgpFormat)
    assert PGP.default_output(Path("dist/app.tar.gz"), SignOptions()) == Path("dist/app.tar.gz.asc")
    assert PGP.default_output(Path("dist/app.tar.gz"), SignOptions(binary=True)) == Path(
        "dist/app.tar.gz.pgp"
    )


def test_crc24_matches_the_rfc_4880_reference_value() -> None:
    # RFC 4880 §6.1: the CRC of nothing is the initial value.
    assert crc24(b"") == 0xB704CE
    assert armor("SIGNATURE", b"\x01").splitlines()[0] == "-----BEGIN PGP SIGNATURE-----"


# ------------------------------------------------------------------ keys, as gpg sees them


def test_gpg_computes_our_fingerprints_and_creation_times(
    world: World, gpg: Gpg, server_api: Api
) -> None:
    held = gpg.fingerprints()
    for algorithm, public in world.exported.items():
        assert public.fingerprint in held, algorithm
        # The creation time in the fingerprint is the key version's, to the second.
        version = server_api.ok(
            server_api.http.get(
                f"/api/v1/keys/{world.keys[algorithm]['id']}", headers=server_api.admin
            )
        )["versions"][0]
        stored = datetime.fromisoformat(version["created_at"])
        assert held[public.fingerprint] == str(int(stored.timestamp())), algorithm
        assert public.key.key_id == public.fingerprint[-16:]
    listed = gpg.run("--with-colons", "--list-keys", UID)
    assert listed.returncode == 0
    # A valid self-signature: gpg shows the User ID (field 10) and the key as able
    # to sign and certify (field 12 of the pub line holds "sc" / "SC").
    pubs = [line.split(":") for line in listed.stdout.splitlines() if line.startswith("pub:")]
    assert len(pubs) == len(ALGORITHMS)
    assert all("s" in pub[11] and "c" in pub[11] for pub in pubs)
    uids = [line.split(":")[9] for line in listed.stdout.splitlines() if line.startswith("uid:")]
    assert uids == [UID] * len(ALGORITHMS)


def test_gpg_checks_the_self_signature(world: World, gpg: Gpg) -> None:
    result = gpg.run("--with-colons", "--check-signatures", UID)
    assert result.returncode == 0, result.stderr
    sigs = [line.split(":") for line in result.stdout.splitlines() if line.startswith("sig:")]
    assert len(sigs) == len(ALGORITHMS)
    # Field 2 "!": signature checked and good; field 11 "13x": positive certification.
    assert [s[1] for s in sigs] == ["!"] * len(ALGORITHMS)
    assert {s[10] for s in sigs} == {"13x"}


def test_exporting_twice_gives_the_same_key_and_fingerprint(world: World) -> None:
    signer = world.signers[Algorithm.EC_P256]
    first, again = world.exported[Algorithm.EC_P256], export_public_key(signer, UID)
    assert again.fingerprint == first.fingerprint
    assert again.key == first.key
    assert again.key_version == first.key_version == 1


@pytest.mark.parametrize(
    "uid", ["", "   ", "Two\nLines <a@b>", "x" * 1025], ids=["empty", "blank", "newline", "long"]
)
def test_a_bad_user_id_is_refused_before_signing(world: World, server_api: Api, uid: str) -> None:
    before = key_uses(server_api, world.keys[Algorithm.EC_P256])
    with pytest.raises(OpenPgpInvalidUserId):
        export_public_key(world.signers[Algorithm.EC_P256], uid)
    assert key_uses(server_api, world.keys[Algorithm.EC_P256]) == before


# ------------------------------------------------------------------ signatures, verified by gpg


@pytest.mark.interop
@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=str)
def test_gpg_verifies_the_armored_signature_and_rejects_a_tampered_file(
    world: World, gpg: Gpg, tmp_path: Path, algorithm: Algorithm
) -> None:
    signer, public = world.signers[algorithm], world.exported[algorithm]
    file, output = signed(signer, tmp_path, os.urandom(30_000))
    assert output == tmp_path / "artifact.tar.gz.asc"
    text = output.read_text("ascii")
    assert text.startswith("-----BEGIN PGP SIGNATURE-----\n\n")
    assert text.endswith("-----END PGP SIGNATURE-----\n")

    code, status = gpg.verify(output, file)
    assert code == 0, status
    assert "GOODSIG" in status
    validsig = status["VALIDSIG"][0].split()
    assert validsig[0] == public.fingerprint
    # pubkey algorithm, hash algorithm, signature class 00 (binary document).
    assert validsig[6:9] == [PK_ALGORITHM[algorithm], HASH_ALGORITHM[algorithm], "00"]
    ours = PGP.verify(file, output, [signer.public_key], SignOptions())
    assert ours.valid, ours.detail
    assert public.fingerprint in ours.detail

    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one byte
    file.write_bytes(bytes(data))
    code, status = gpg.verify(output, file)
    assert code != 0
    assert "BADSIG" in status
    assert "VALIDSIG" not in status
    assert "GOODSIG" not in status
    assert not PGP.verify(file, output, [signer.public_key], SignOptions()).valid


@pytest.mark.interop
def test_binary_output_is_the_bare_packet_and_gpg_verifies_it(
    world: World, gpg: Gpg, tmp_path: Path
) -> None:
    signer = world.signers[Algorithm.RSA_3072]
    file, output = signed(
        signer, tmp_path, b"binary\n" * 1000, binary=True, digest_algorithm=DigestAlgorithm.SHA512
    )
    assert output == tmp_path / "artifact.tar.gz.pgp"
    assert not PGP.default_output(file, SignOptions()).exists()
    assert output.read_bytes()[0] == 0xC0 | 2  # new-format signature packet (RFC 4880 §4.2)
    code, status = gpg.verify(output, file)
    assert code == 0, status
    validsig = status["VALIDSIG"][0].split()
    assert validsig[0] == world.exported[Algorithm.RSA_3072].fingerprint
    assert validsig[7] == "10"  # SHA-512, as asked, not the key's default
    # `signery verify` finds FILE.pgp when there is no FILE.asc.
    ours = PGP.verify(
        file, PGP.default_output(file, SignOptions()), [signer.public_key], SignOptions()
    )
    assert ours.valid, ours.detail
    assert ours.signature == output
    assert "sha512" in ours.detail


@pytest.mark.interop
def test_a_large_file_is_streamed_in_chunks(world: World, gpg: Gpg, tmp_path: Path) -> None:
    signer = world.signers[Algorithm.EC_P384]
    file = tmp_path / "large.bin"
    size = 2 * HASH_CHUNK + 4321
    with file.open("wb") as f:
        for _ in range(size // 4096):
            f.write(os.urandom(4096))
        f.write(os.urandom(size % 4096))
    progress: list[int] = []
    result = PGP.sign(
        signer, file, PGP.default_output(file, SignOptions()), SignOptions(progress=progress.append)
    )
    assert sum(progress) == size
    assert len(progress) == math.ceil(size / HASH_CHUNK)
    code, status = gpg.verify(result.output, file)
    assert code == 0, status
    assert "VALIDSIG" in status


def test_verify_names_the_right_key_among_several_and_refuses_others(
    world: World, tmp_path: Path
) -> None:
    p384 = world.signers[Algorithm.EC_P384]
    file, output = signed(p384, tmp_path, b"which key?")
    others = [world.signers[a].public_key for a in ALGORITHMS if a is not Algorithm.EC_P384]
    assert not PGP.verify(file, output, others, SignOptions()).valid
    found = PGP.verify(file, output, [*others, p384.public_key], SignOptions())
    assert found.valid
    assert f"key #{len(ALGORITHMS)}" in found.detail
    # A verifier that insists on another hash than the signature's says so.
    insisted = PGP.verify(
        file, output, [p384.public_key], SignOptions(digest_algorithm=DigestAlgorithm.SHA512)
    )
    assert not insisted.valid
    assert "sha384" in insisted.detail


def test_the_service_signs_exactly_the_openpgp_hash_with_the_required_subpackets(
    world: World, server_api: Api, tmp_path: Path
) -> None:
    signer, public = world.signers[Algorithm.EC_P256], world.exported[Algorithm.EC_P256]
    seq = server_api.last_seq()
    file = tmp_path / "artifact.tar.gz"
    file.write_bytes(b"subpackets")
    result = PGP.sign(signer, file, PGP.default_output(file, SignOptions()), SignOptions())
    parsed = parse_signature(result.output.read_bytes())
    # RFC 4880 §5.2.4: file || hashed part || 0x04 0xFF || length of the hashed part.
    trailer = b"\x04\xff" + len(parsed.hashed_part).to_bytes(4, "big")
    expected = hashlib.sha256(file.read_bytes() + parsed.hashed_part + trailer).hexdigest()
    assert result.digest == expected
    assert parsed.hash_check == bytes.fromhex(expected)[:2]
    events = [
        e
        for e in server_api.events_after(seq)
        if e["key_id"] == world.keys[Algorithm.EC_P256]["id"]
    ]
    assert [e["digest"] for e in events] == [expected]
    assert parsed.issuer_fingerprint is not None
    assert parsed.issuer_fingerprint.hex().upper() == public.fingerprint
    assert parsed.issuer_key_id is not None
    assert parsed.issuer_key_id.hex().upper() == public.key.key_id
    assert parsed.digest_algorithm is DigestAlgorithm.SHA256
    assert parsed.created >= public.key.created


# ------------------------------------------------------------------ refusals before signing


def test_timestamp_is_refused_before_anything_is_sent(
    world: World, server_api: Api, tmp_path: Path
) -> None:
    key = world.keys[Algorithm.EC_P256]
    asked: list[object] = []
    before = key_uses(server_api, key)
    file = tmp_path / "app.bin"
    file.write_bytes(b"no timestamps in OpenPGP")
    with pytest.raises(OpenPgpTimestampUnsupported) as refused:
        PGP.sign(
            world.signers[Algorithm.EC_P256],
            file,
            PGP.default_output(file, SignOptions()),
            SignOptions(timestamper=lambda imprint: asked.append(imprint) or b""),
        )
    assert refused.value.code == "openpgp_timestamp_unsupported"
    assert asked == []
    assert key_uses(server_api, key) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.bin"]


@pytest.mark.parametrize(
    ("algorithm", "options"),
    [
        (Algorithm.RSA_2048, SignOptions(scheme=SignatureScheme.RSA_PSS)),
        (Algorithm.EC_P384, SignOptions(digest_algorithm=DigestAlgorithm.SHA256)),
        (Algorithm.EC_P521, SignOptions(digest_algorithm=DigestAlgorithm.SHA384)),
    ],
    ids=["rsa-pss", "p384-with-sha256", "p521-with-sha384"],
)
def test_a_scheme_or_digest_openpgp_cannot_use_is_refused_before_anything_is_sent(
    world: World, server_api: Api, tmp_path: Path, algorithm: Algorithm, options: SignOptions
) -> None:
    before = key_uses(server_api, world.keys[algorithm])
    file = tmp_path / "app.bin"
    file.write_bytes(b"refused")
    with pytest.raises(OpenPgpKeyUnsupported):
        PGP.sign(world.signers[algorithm], file, PGP.default_output(file, SignOptions()), options)
    assert key_uses(server_api, world.keys[algorithm]) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.bin"]


def test_a_server_that_does_not_say_when_the_key_was_made_is_refused(
    world: World, server_api: Api, tmp_path: Path
) -> None:
    # What a signer from an older server looks like: no creation time listed.
    signer = dataclasses.replace(world.signers[Algorithm.EC_P256], key_created_at=None)
    before = key_uses(server_api, world.keys[Algorithm.EC_P256])
    file = tmp_path / "app.bin"
    file.write_bytes(b"when?")
    with pytest.raises(OpenPgpKeyTimeUnknown):
        PGP.sign(signer, file, PGP.default_output(file, SignOptions()), SignOptions())
    with pytest.raises(OpenPgpKeyTimeUnknown):
        export_public_key(signer, UID)
    assert key_uses(server_api, world.keys[Algorithm.EC_P256]) == before


def test_signing_failure_leaves_the_old_signature_untouched(world: World, tmp_path: Path) -> None:
    signer = world.signers[Algorithm.EC_P256]
    file, output = signed(signer, tmp_path, b"signed once")
    before = output.read_bytes()
    with pytest.raises(OpenPgpKeyUnsupported):
        PGP.sign(signer, file, output, SignOptions(scheme=SignatureScheme.RSA_PKCS1V15))
    assert output.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact.tar.gz", "artifact.tar.gz.asc"]


# ------------------------------------------------------------------ bad signature files


@pytest.fixture
def good(world: World, tmp_path: Path) -> tuple[Path, Path, RemoteSigner]:
    signer = world.signers[Algorithm.EC_P256]
    file, output = signed(signer, tmp_path, b"a good signature, soon damaged")
    return file, output, signer


def _with_crc(text: str, crc: int) -> str:
    lines = text.splitlines()
    index = next(i for i, line in enumerate(lines) if line.startswith("="))
    lines[index] = "=" + base64.b64encode(crc.to_bytes(3, "big")).decode()
    return "\n".join(lines) + "\n"


@pytest.mark.interop
def test_a_wrong_armor_checksum_is_a_clear_error_for_us_and_for_gpg(
    good: tuple[Path, Path, RemoteSigner], gpg: Gpg
) -> None:
    file, output, signer = good
    text = output.read_text("ascii")
    packet = parse_signature(output.read_bytes())  # parses before the damage
    assert packet.values
    right = crc24(base64.b64decode("".join(text.splitlines()[2:-2])))
    output.write_text(_with_crc(text, right ^ 0x000100))
    with pytest.raises(OpenPgpMalformed, match="checksum"):
        PGP.verify(file, output, [signer.public_key], SignOptions())
    code, _ = gpg.verify(output, file)
    assert code != 0


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        pytest.param(lambda b: b"", "bad first octet", id="empty"),
        pytest.param(lambda b: random.Random(4880).randbytes(300), None, id="garbage"),
        pytest.param(lambda b: b"hello, I am not a signature\n", "bad first octet", id="text"),
        pytest.param(lambda b: b[:-10], "truncated", id="truncated"),
        pytest.param(lambda b: b + b, "more than one packet", id="two-packets"),
        pytest.param(lambda b: b[:2] + b"\x03" + b[3:], "version 3", id="v3"),
        pytest.param(lambda b: b[:3] + b"\x01" + b[4:], "type 0x01", id="text-signature"),
        pytest.param(lambda b: b[:5] + b"\x02" + b[6:], "hash algorithm 2", id="sha1"),
        pytest.param(lambda b: b"\xc6" + b[1:], "tag 6", id="not-a-signature"),
    ],
)
def test_malformed_signatures_are_clear_errors(
    good: tuple[Path, Path, RemoteSigner], damage: Any, message: str | None
) -> None:
    file, output, signer = good
    binary = PGP.binary_output(file)
    # The binary packet: new-format header 0xC2, one length octet, then the body.
    packet = parse_and_dearmor(output)
    binary.write_bytes(damage(packet))
    with pytest.raises(OpenPgpMalformed, match=message) as refused:
        PGP.verify(file, binary, [signer.public_key], SignOptions())
    assert refused.value.code == "openpgp_malformed"
    assert str(binary) in refused.value.detail


def parse_and_dearmor(output: Path) -> bytes:
    packet = dearmor(output.read_bytes(), "SIGNATURE")
    assert packet[0] == 0xC2
    assert packet[1] < 192
    return packet


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda t: t.replace("-----END PGP SIGNATURE-----", ""), id="no-end"),
        pytest.param(lambda t: t.replace("\n\n", "\n", 1), id="no-blank-line"),
        pytest.param(lambda t: t.replace("\n\n", "\n\n*", 1), id="not-base64"),
        pytest.param(lambda t: t.replace("SIGNATURE", "MESSAGE", 1), id="wrong-kind"),
    ],
)
def test_damaged_armor_is_a_clear_error(good: tuple[Path, Path, RemoteSigner], damage: Any) -> None:
    file, output, signer = good
    output.write_text(damage(output.read_text("ascii")))
    with pytest.raises(OpenPgpMalformed):
        PGP.verify(file, output, [signer.public_key], SignOptions())


def test_armor_without_checksum_and_with_headers_still_verifies(
    good: tuple[Path, Path, RemoteSigner],
) -> None:
    # RFC 4880 §6.2 headers are allowed; RFC 9580 §6.1 makes the checksum optional.
    file, output, signer = good
    lines = output.read_text("ascii").splitlines()
    lines = [lines[0], "Comment: made by signery", *[x for x in lines[1:] if not x.startswith("=")]]
    output.write_text("\n".join(lines) + "\n")
    assert PGP.verify(file, output, [signer.public_key], SignOptions()).valid


# ------------------------------------------------------------------ the real CLI


@pytest.mark.interop
def test_cli_key_export_sign_and_gpg_verify(
    server: ServerProcess,
    server_api: Api,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    work = tmp_path_factory.mktemp("cli-openpgp")
    home = work / "gnupg"
    home.mkdir(mode=0o700)
    tsg = server_api.create_tsg()
    account = server_api.create_account(tsg["id"])
    key = server_api.create_key(tsg["id"], "EC_P384", ca="none")
    key_file = work / "account.pem"
    key_file.write_text(account.private_key_pem)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIGNERY_")}
    env.update(
        {
            "SIGNERY_HOME": str(work / "signery-home"),
            "SIGNERY_SERVER": server.url,
            "SIGNERY_CLIENT_ID": account.client_id,
            "SIGNERY_KEY_FILE": str(key_file),
            "NO_COLOR": "1",
        }
    )

    def signery(*args: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [SIGNERY, *map(str, args)],
            env=env,
            cwd=work,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )

    exported = signery(
        "key", "export", "--openpgp", key["name"], "--uid", UID, "-o", "release.asc", "--json"
    )
    assert exported.returncode == 0, exported.stderr
    answer = json.loads(exported.stdout)
    assert (work / "release.asc").read_text() == answer["public_key"]
    artifact = work / "app.tar.gz"
    artifact.write_bytes(os.urandom(50_000))
    signed_ = signery("sign", "--key", key["name"], "--format", "openpgp", artifact)
    assert signed_.returncode == 0, signed_.stderr
    assert "app.tar.gz.asc" in signed_.stdout

    gpg = Gpg(home)
    imported = gpg.run("--import", work / "release.asc")
    assert imported.returncode == 0, imported.stderr
    code, status = gpg.verify(work / "app.tar.gz.asc", artifact)
    assert code == 0, status
    assert status["VALIDSIG"][0].split()[0] == answer["fingerprint"]

    # --binary writes the bare packet to FILE.pgp, which gpg verifies too.
    binary = signery("sign", "--key", key["name"], "--format", "openpgp", "--binary", artifact)
    assert binary.returncode == 0, binary.stderr
    code, status = gpg.verify(work / "app.tar.gz.pgp", artifact)
    assert code == 0, status
    assert status["VALIDSIG"][0].split()[0] == answer["fingerprint"]

    public = work / "release.pub.pem"
    public.write_text(key["public_key_pem"])
    verified = signery("verify", "--format", "openpgp", "--public-key", public, artifact)
    assert verified.returncode == 0, verified.stderr + verified.stdout
    assert "OK" in verified.stdout

    # --timestamp is refused with a clear error, and no signature is written.
    other = work / "other.bin"
    other.write_bytes(b"no timestamp")
    stamped = signery(
        "sign", "--key", key["name"], "--format", "openpgp", "--timestamp",
        f"{server.url}/api/v1/tsa", other,
    )  # fmt: skip
    assert stamped.returncode == 1
    assert "openpgp_timestamp_unsupported" in stamped.stderr
    assert "Traceback" not in stamped.stderr
    assert not (work / "other.bin.asc").exists()
    # The export needs --openpgp and --uid.
    assert "--openpgp" in signery("key", "export", key["name"], "--uid", UID).stderr
    subprocess.run(
        [require_tool("gpgconf"), "--homedir", str(home), "--kill", "all"],
        capture_output=True,
        check=False,
    )


def test_a_fixed_signing_time_signs_the_same_digest_again(world: World, tmp_path: Path) -> None:
    """The creation time is hashed into the signature: with the run's fixed time, a
    file signed again after its approval sends the digest that was approved (PKCS#1
    v1.5 is deterministic, so the two packets are byte for byte the same)."""
    data = os.urandom(4096)
    # After the key was made (a signature never predates its key).
    moment = datetime.now().astimezone().replace(microsecond=0)
    options: dict[str, Any] = {"binary": True, "signing_time": moment}
    signer = world.signers[Algorithm.RSA_3072]
    _, first = signed(signer, tmp_path, data, **options)
    packet = first.read_bytes()
    _, second = signed(signer, tmp_path, data, **options)
    assert second.read_bytes() == packet
    assert int(moment.timestamp()).to_bytes(4, "big") in packet
