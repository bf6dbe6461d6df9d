"""``signery key policy set|show|clear`` and the policy in ``signery key show``, run as
real subprocesses against a real ``signery serve`` process (SQLite and PostgreSQL):
every flag round-trips through the server, a --file document too."""

from __future__ import annotations

import json
from typing import Any

import pytest
import typer

from signery.cli._policy import parse_days, parse_hours, parse_window
from tests.cli.test_cli_e2e import Cli
from tests.support import Installation, ServerProcess

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cli(server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Cli:
    import os

    root = tmp_path_factory.mktemp("cli-policy")
    home, work = root / "home", root / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIGNERY_")}
    env.update({"SIGNERY_HOME": str(home), "NO_COLOR": "1", "COLUMNS": "200"})
    return Cli(home, work, env)


@pytest.fixture(scope="module")
def world(cli: Cli, server: ServerProcess, installation: Installation) -> dict[str, Any]:
    cli.json("login", "--server", server.url, "--api-token", installation.admin_token)
    team = cli.json("tsg", "create", "policy-team")
    account = cli.json(
        "account", "create", "policy-builder", "--tsg", team["id"], "--key-out",
        cli.work / "builder.pem",
    )  # fmt: skip
    key = cli.json("key", "create", "policy-key", "--tsg", team["id"], "--algorithm", "EC_P256")
    return {"team": team, "account": account, "key": key}


FLAGS = (
    "--signer", "policy-builder",
    "--signer-tsg", "{team}",
    "--scheme", "ecdsa",
    "--digest", "sha256", "--digest", "sha384",
    "--max-total", "10",
    "--max-per-day", "5",
    "--allow-ip", "127.0.0.0/8", "--allow-ip", "2001:db8::/32",
    "--window", "mon-fri 09:00-17:00", "--window", "sat,sun",
    "--timezone", "Europe/Berlin",
    "--valid-from", "2020-01-01T00:00:00Z",
    "--valid-until", "2099-01-01T00:00:00+00:00",
    "--min-signing-version", "1",
    "--approvals", "1",
    "--approver", "admin",
    "--grant-unlimited",
    "--grant-ttl", "2d",
    "--request-ttl", "72h",
)  # fmt: skip


def test_set_flags_round_trip_and_show_prints_every_rule(cli: Cli, world: dict[str, Any]) -> None:
    key = world["key"]["id"]
    flags = [f.format(team=world["team"]["id"]) for f in FLAGS]
    result = cli.json("key", "policy", "set", key, *flags)
    policy = result["policy"]
    assert policy["signers"] == ["policy-builder"]
    assert policy["signer_tsgs"] == [world["team"]["id"]]
    assert policy["allowed_schemes"] == ["ecdsa"]
    assert policy["allowed_digests"] == ["sha256", "sha384"]
    assert policy["max_signatures_total"] == 10
    assert policy["max_signatures_per_day"] == 5
    assert policy["client_ips"] == ["127.0.0.0/8", "2001:db8::/32"]
    assert policy["time_windows"] == [
        {"days": ["mon", "tue", "wed", "thu", "fri"], "start": "09:00", "end": "17:00"},
        {"days": ["sat", "sun"], "start": "00:00", "end": "24:00"},
    ]
    assert policy["timezone"] == "Europe/Berlin"
    assert policy["valid_from"].startswith("2020-01-01T00:00:00")
    assert policy["min_signing_version"] == 1
    assert policy["approval"] == {
        "required": 1,
        "approvers": ["admin"],
        "grant_max_uses": None,
        "grant_ttl_hours": 48,
        "request_ttl_hours": 72,
    }
    assert result["usage"]["total"] == 0
    assert cli.json("key", "policy", "show", key)["policy"] == policy

    shown = cli.ok("key", "policy", "show", key).stdout
    for text in (
        "policy-builder",
        "ecdsa",
        "sha256, sha384",
        "10 in total",
        "5 (Europe/Berlin)",
        "127.0.0.0/8, 2001:db8::/32",
        "mon,tue,wed,thu,fri 09:00-17:00 Europe/Berlin",
        "sat,sun 00:00-24:00",
        "1 of admin; grant: unlimited uses, 48h",
        "0/10 in total, 0/5 on",
    ):
        assert text in shown, (text, shown)

    key_show = cli.ok("key", "show", key).stdout
    assert "policy: signers" in key_show
    assert "policy: time window" in key_show
    assert "0/10 in total" in key_show


def test_a_policy_file_round_trips(cli: Cli, world: dict[str, Any]) -> None:
    key = world["key"]["id"]
    cli.ok("key", "policy", "set", key, "--digest", "sha512", "--window", "fri-mon 22:00-06:00")
    before = cli.json("key", "policy", "show", key)["policy"]
    assert before["time_windows"] == [
        {"days": ["mon", "fri", "sat", "sun"], "start": "22:00", "end": "06:00"}
    ]
    document = cli.work / "policy.json"
    document.write_text(json.dumps(before))
    cli.ok("key", "policy", "clear", key)
    assert cli.json("key", "policy", "show", key)["policy"] is None
    assert "has no policy" in cli.ok("key", "policy", "show", key).stdout
    assert "policy  none" in cli.ok("key", "show", key).stdout
    after = cli.json("key", "policy", "set", key, "--file", document, "--max-total", "3")
    assert after["policy"] == {**before, "max_signatures_total": 3}


def test_errors_are_reported_without_a_traceback(cli: Cli, world: dict[str, Any]) -> None:
    key = world["key"]["id"]
    message = cli.fails("key", "policy", "set", key, "--allow-ip", "10.0.0.1/8")
    assert "invalid_policy" in message
    assert "host bits set" in message
    message = cli.fails("key", "policy", "set", key, "--signer", "nobody-by-that-name")
    assert "that can reach the key" in message
    bad = cli.run("key", "policy", "set", key, "--window", "someday 9-5")
    assert bad.returncode == 2
    assert "is not a time window" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_window_and_duration_parsing() -> None:
    assert parse_days("mon-fri") == ["mon", "tue", "wed", "thu", "fri"]
    assert parse_days("sat,mon") == ["mon", "sat"]
    assert parse_days("fri-mon") == ["mon", "fri", "sat", "sun"]
    assert parse_window("mon,wed 9:00-17:30") == {
        "days": ["mon", "wed"],
        "start": "09:00",
        "end": "17:30",
    }
    assert parse_window("22:00-02:00") == {"start": "22:00", "end": "02:00"}
    assert parse_window("sun") == {"days": ["sun"]}
    assert parse_hours("24h") == 24
    assert parse_hours("3d") == 72
    assert parse_hours("12") == 12
    for bad in ("", "funday", "mon-xyz 09:00-10:00", "09:00"):
        with pytest.raises(typer.BadParameter):
            parse_window(bad)
