"""``signery tsg subject-policy set|show|clear``, run as real subprocesses against a
real ``signery serve`` process: the flags and a --file document round-trip, a key
outside the policy is refused with its code, and clearing falls back to the
policies above (here the root's, which allows any subject)."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from tests.cli.test_cli_e2e import Cli
from tests.support import Installation, ServerProcess

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cli(server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Cli:
    root = tmp_path_factory.mktemp("cli-subject-policy")
    home, work = root / "home", root / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIGNERY_")}
    env.update({"SIGNERY_HOME": str(home), "NO_COLOR": "1", "COLUMNS": "200"})
    return Cli(home, work, env)


@pytest.fixture(scope="module")
def team(cli: Cli, server: ServerProcess, installation: Installation) -> dict[str, Any]:
    cli.json("login", "--server", server.url, "--api-token", installation.admin_token)
    return cli.json("tsg", "create", "subject-team")  # type: ignore[no-any-return]


def key_create(cli: Cli, tsg: str, *subject: str) -> list[str]:
    return [
        "key", "create", f"k-{os.urandom(4).hex()}", "--tsg", tsg,
        "--algorithm", "EC_P256", "--ca", "builtin", *subject,
    ]  # fmt: skip


def test_set_show_refuse_and_clear(
    cli: Cli, team: dict[str, Any], installation: Installation
) -> None:
    tsg = team["id"]
    policy = cli.json(
        "tsg", "subject-policy", "set", tsg,
        "--cn", "Build *", "--org", "Example Inc", "--ou", "", "--ou", "Team ?",
    )  # fmt: skip
    assert policy["effect"] == "policies"
    assert policy["own"]["rules"] == {
        "common_name": ["Build *"],
        "organization": ["Example Inc"],
        "organizational_unit": ["", "Team ?"],
        "country": [],
        "email": [],
    }
    assert [level["tsg_id"] for level in policy["path"]] == [installation.init.root_tsg_id, tsg]

    shown = cli.ok("tsg", "subject-policy", "show", tsg).stdout
    assert f"subject policy of TSG {tsg}" in shown
    assert "'Example Inc'" in shown
    assert "(none), 'Team ?'" in shown
    assert "(not allowed)" in shown, "C and emailAddress"
    assert "(inherited)" in shown, "the root's policy is shown too"
    assert cli.json("tsg", "subject-policy", "show", tsg) == policy

    made = cli.json(*key_create(cli, tsg, "--cn", "Build 1", "--org", "Example Inc"))
    assert made["status"] == "active"
    error = cli.fails(*key_create(cli, tsg, "--cn", "Build 2", "--org", "Other Inc"))
    assert "subject_not_allowed" in error
    assert "organization 'Other Inc' is not allowed" in error

    cleared = cli.json("tsg", "subject-policy", "clear", tsg)
    assert cleared["own"] is None
    assert [level["tsg_id"] for level in cleared["path"]] == [installation.init.root_tsg_id]
    assert cli.json(*key_create(cli, tsg, "--cn", "Build 2", "--org", "Other Inc"))["id"]
    assert "subject_policy_not_found" in cli.fails("tsg", "subject-policy", "clear", tsg)


def test_set_from_a_file_with_flags_over_it(cli: Cli, team: dict[str, Any]) -> None:
    document = cli.work / "subject-policy.json"
    document.write_text(
        json.dumps({"common_name": ["*"], "organization": ["From File"], "country": ["US"]})
    )
    policy = cli.json(
        "tsg", "subject-policy", "set", team["id"], "--file", document, "--org", "From Flag"
    )
    assert policy["own"]["rules"]["common_name"] == ["*"]
    assert policy["own"]["rules"]["organization"] == ["From Flag"]
    assert policy["own"]["rules"]["country"] == ["US"]
    error = cli.fails("tsg", "subject-policy", "set", team["id"], "--org", "No CN")
    assert "subject_policy_invalid" in error
    assert "common_name" in error
