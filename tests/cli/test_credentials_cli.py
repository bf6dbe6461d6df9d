"""Credentials from the command line, against a real ``signery serve``: an
account's public keys (``account add-key`` / ``show`` / ``remove-key``) and a
user's API tokens (``user token create`` / ``list``), whose lifetime is the
server's to bound (issue 12, items 4 and 18)."""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.cli.test_cli_e2e import Cli
from tests.support import Installation, ServerProcess

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cli(
    server: ServerProcess, installation: Installation, tmp_path_factory: pytest.TempPathFactory
) -> Cli:
    root = tmp_path_factory.mktemp("credentials-cli")
    home, work = root / "home", root / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIGNERY_")}
    env.update({"SIGNERY_HOME": str(home), "NO_COLOR": "1", "COLUMNS": "200"})
    runner = Cli(home, work, env)
    runner.json("login", "--server", server.url, "--api-token", installation.admin_token)
    return runner


def public_key_file(directory: Path, name: str) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    path = directory / f"{name}.pub.pem"
    path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


def test_account_keys_are_added_shown_and_removed_but_never_the_last(cli: Cli) -> None:
    tsg = cli.json("tsg", "create", "credentials")
    account = cli.json("account", "create", "rotating", "--tsg", tsg["id"])
    [first] = account["keys"]
    added = cli.json(
        "account", "add-key", account["id"], "--public-key", public_key_file(cli.work, "second")
    )
    second = next(k for k in added["keys"] if k["id"] != first["id"])

    shown = cli.ok("account", "show", account["client_id"]).stdout
    for key in (first, second):
        assert key["id"] in shown, "the ids `remove-key` takes are shown"

    removed = cli.ok("account", "remove-key", account["id"], first["id"]).stdout
    assert f"removed key {first['id']}" in removed
    assert second["id"] in removed
    after = cli.json("account", "show", account["id"])
    assert [k["id"] for k in after["keys"]] == [second["id"]]

    stderr = cli.fails("account", "remove-key", account["id"], second["id"])
    assert "last_account_key" in stderr
    stderr = cli.fails("account", "remove-key", account["id"], first["id"], "--json")
    assert "account_key_not_found" in stderr


def test_api_tokens_get_the_servers_lifetime_and_no_longer(cli: Cli) -> None:
    created = cli.json("user", "token", "create", "--name", "script")
    lifetime = datetime.fromisoformat(created["expires_at"]) - datetime.fromisoformat(
        created["created_at"]
    )
    assert lifetime == timedelta(days=90)
    short = cli.json("user", "token", "create", "--name", "short", "--days", "3")
    assert datetime.fromisoformat(short["expires_at"]) - datetime.fromisoformat(
        short["created_at"]
    ) == timedelta(days=3)
    stderr = cli.fails("user", "token", "create", "--name", "long", "--days", "91")
    assert "api_token_lifetime_too_long" in stderr
    listed: list[dict[str, Any]] = cli.json("user", "token", "list")
    assert {created["id"], short["id"]} <= {t["id"] for t in listed}
    assert "long" not in {t["name"] for t in listed}
