"""`signery key rotate / rotation / disable / enable / destroy / cancel-destroy`
and the lifecycle part of `signery key show`, run as real subprocesses against a
real `signery serve` process (SQLite and PostgreSQL)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.cli.test_cli_e2e import Cli, admin, cli  # noqa: F401 - fixtures reused
from tests.server.ca.pki import make_ca

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def team(cli: Cli, admin: dict[str, Any]) -> dict[str, Any]:  # noqa: F811
    return cli.json("tsg", "create", "lifecycle")  # type: ignore[no-any-return]


def test_create_with_a_rotation_period_then_rotate(cli: Cli, team: dict[str, Any]) -> None:  # noqa: F811
    key = cli.json(
        "key", "create", "rot-key", "--tsg", team["id"], "--algorithm", "EC_P256",
        "--ca", "builtin", "--rotate-every", "12w",
    )  # fmt: skip
    assert key["rotation_period_days"] == 84
    assert key["next_rotation_at"] is not None

    rotated = cli.json("key", "rotate", "rot-key", "--validity-days", "30")
    assert rotated["current_version"] == 2
    assert [v["status"] for v in rotated["versions"]] == ["archived", "active"]
    assert rotated["versions"][0]["public_key_pem"] == key["public_key_pem"]
    human = cli.ok("key", "rotate", "rot-key").stdout
    assert "version 3 is current" in human

    shown = cli.ok("key", "show", "rot-key").stdout
    assert "every 84 days" in shown
    assert "versions" in shown
    assert "archived" in shown
    assert "active (current)" in shown

    assert cli.json("key", "rotation", "rot-key", "--every", "30d")["rotation_period_days"] == 30
    never = cli.json("key", "rotation", "rot-key", "--never")
    assert never["rotation_period_days"] is None
    assert "manual only" in cli.ok("key", "show", "rot-key").stdout


def test_rotating_a_csr_connector_key(
    cli: Cli,  # noqa: F811
    team: dict[str, Any],
    tmp_path: Path,
) -> None:
    ca = make_ca(tmp_path / "ca", "CLI Rotation Root")
    cli.ok(
        "ca-connector", "create", "rot-ca", "--kind", "csr", "--tsg", team["id"], "--roots", ca.cert
    )
    cli.ok(
        "key", "create", "crot-key", "--tsg", team["id"], "--algorithm", "EC_P256",
        "--connector", "rot-ca",
    )  # fmt: skip
    cli.ok("key", "csr", "crot-key", "-o", tmp_path / "v1.csr")
    ca.issue(tmp_path / "v1.csr", tmp_path / "v1.pem")
    cli.ok("key", "upload-certificate", "crot-key", tmp_path / "v1.pem")

    human = cli.ok("key", "rotate", "crot-key").stdout
    assert "version 2 waits for its certificate" in human
    assert "version 1 signs meanwhile" in human
    assert "pending" in human
    assert "rotation_pending" in cli.fails("key", "rotate", "crot-key")
    cli.ok("key", "csr", "crot-key", "-o", tmp_path / "v2.csr")
    csr = x509.load_pem_x509_csr((tmp_path / "v2.csr").read_bytes())
    shown = cli.json("key", "show", "crot-key")
    assert shown["current_version"] == 1
    v2 = next(v for v in shown["versions"] if v["version"] == 2)
    spki = (serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert csr.public_key().public_bytes(*spki).decode() == v2["public_key_pem"], "v2's CSR"
    ca.issue(tmp_path / "v2.csr", tmp_path / "v2.pem")
    rotated = cli.json("key", "upload-certificate", "crot-key", tmp_path / "v2.pem")
    assert rotated["current_version"] == 2
    assert [v["status"] for v in rotated["versions"]] == ["archived", "active"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("key", "rotation", "rot-key"), "--every DURATION or --never"),
        (("key", "rotation", "rot-key", "--every", "30d", "--never"), "or --never"),
        (("key", "rotation", "rot-key", "--every", "0d"), "at least one day"),
        (("key", "destroy", "rot-key", "--after", "6d"), "between 7d and 30d"),
        (("key", "destroy", "rot-key", "--after", "31d"), "between 7d and 30d"),
        (("key", "destroy", "rot-key", "--after", "soon"), "not a duration"),
    ],
)
def test_bad_lifecycle_arguments_are_usage_errors(
    cli: Cli,  # noqa: F811
    team: dict[str, Any],
    args: tuple[str, ...],
    message: str,
) -> None:
    result = cli.run(*args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr.replace("\n", " ").replace("│", " ").replace("  ", " ")
    assert "Traceback" not in result.stderr


def test_disable_enable_destroy_and_cancel(
    cli: Cli,  # noqa: F811
    team: dict[str, Any],
) -> None:
    cli.json("key", "create", "life-key", "--tsg", team["id"], "--algorithm", "EC_P256")
    assert cli.json("key", "disable", "life-key")["status"] == "disabled"
    assert "already disabled" in cli.fails("key", "disable", "life-key")
    listed = cli.json("key", "list", "--tsg", team["id"])
    assert {k["name"]: k["status"] for k in listed}["life-key"] == "disabled"
    assert cli.json("key", "enable", "life-key")["status"] == "active"

    scheduled = cli.json("key", "destroy", "life-key", "--after", "7d")
    assert scheduled["status"] == "disabled"
    assert scheduled["destroy_at"] is not None
    assert "scheduled for" in cli.ok("key", "show", "life-key").stdout
    assert "key_destruction_scheduled" in cli.fails("key", "enable", "life-key")
    assert "key_destruction_scheduled" in cli.fails("key", "rotate", "life-key")
    restored = cli.json("key", "cancel-destroy", "life-key")
    assert restored["status"] == "active"
    assert restored["destroy_at"] is None
    assert "not scheduled" in cli.ok("key", "show", "life-key").stdout

    events = cli.json("audit", "list", "--key", restored["id"], "--limit", "100")
    kinds = [e["kind"] for e in events]
    for kind in (
        "key.disabled",
        "key.enabled",
        "key.destruction.scheduled",
        "key.destruction.cancelled",
    ):
        assert kind in kinds
