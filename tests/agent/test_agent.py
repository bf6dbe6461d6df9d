"""The agent's socket and its command line: private by construction, and the
shell lines of ``--print-env`` point tools at a live agent."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from signery.agent import prepare_socket_directory, server_address
from signery.errors import ClientError
from tests.agent.conftest import P11_KIT_CLIENT, Served
from tests.support import SIGNERY, require_tool


def test_the_socket_directory_is_made_private(tmp_path: Path) -> None:
    socket_path = tmp_path / "new" / "agent.sock"
    prepare_socket_directory(socket_path)
    assert stat.S_IMODE(socket_path.parent.stat().st_mode) == 0o700


def test_a_directory_open_to_others_is_refused_not_repaired(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    with pytest.raises(ClientError, match="open to other users"):
        prepare_socket_directory(shared / "agent.sock")
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755


def test_a_file_in_the_sockets_place_is_not_removed(tmp_path: Path) -> None:
    directory = tmp_path / "private"
    directory.mkdir(mode=0o700)
    (directory / "agent.sock").write_text("not a socket")
    with pytest.raises(ClientError, match="not a socket"):
        prepare_socket_directory(directory / "agent.sock")
    assert (directory / "agent.sock").read_text() == "not a socket"


def test_the_served_socket_is_0600(served: Served) -> None:
    assert stat.S_IMODE(served.socket.stat().st_mode) == 0o600
    assert stat.S_IMODE(served.socket.parent.stat().st_mode) == 0o700


def test_the_address_is_percent_encoded() -> None:
    assert server_address(Path("/tmp/a b/agent.sock")) == "unix:path=/tmp/a%20b/agent.sock"


def test_print_env_starts_an_agent_in_the_background(served: Served, tmp_path: Path) -> None:
    env = served.cli_env(tmp_path)
    socket_path = tmp_path / "agent" / "agent.sock"
    run = subprocess.run(
        [SIGNERY, "agent", "--print-env", "--socket", str(socket_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    lines = dict(
        part.split("=", 1)
        for line in run.stdout.splitlines()
        for part in line.split(";")[:1]
        if "=" in part
    )
    pid = int(lines["SIGNERY_AGENT_PID"])
    try:
        assert lines["P11_KIT_SERVER_ADDRESS"].strip("'") == server_address(socket_path)
        listed = subprocess.run(
            [require_tool("pkcs11-tool"), "--module", str(P11_KIT_CLIENT), "-L"],
            env={**env, "P11_KIT_SERVER_ADDRESS": server_address(socket_path)},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert listed.returncode == 0, listed.stderr
        assert "token model        : signery-agent" in listed.stdout
    finally:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while socket_path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not socket_path.exists()  # it cleaned up on SIGTERM


def test_print_env_with_wrong_credentials_fails_in_the_foreground(
    served: Served, tmp_path: Path
) -> None:
    env = served.cli_env(tmp_path)
    env["SIGNERY_CLIENT_ID"] = "00000000-0000-4000-8000-000000000000"
    run = subprocess.run(
        [SIGNERY, "agent", "--print-env", "--socket", str(tmp_path / "a" / "agent.sock")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode != 0
    assert "P11_KIT_SERVER_ADDRESS" not in run.stdout
    assert "did not start" in run.stderr


def test_exec_returns_the_tools_exit_status(served: Served, tmp_path: Path) -> None:
    env = served.cli_env(tmp_path)
    run = subprocess.run(
        [SIGNERY, "exec", "-q", "--", "sh", "-c", 'test -n "$P11_KIT_SERVER_ADDRESS"; exit 7'],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 7, run.stderr
    missing_tool = subprocess.run(
        [SIGNERY, "exec", "-q", "--", "no-such-tool-here"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert missing_tool.returncode != 0
    assert "no such program" in missing_tool.stderr


def test_exec_json_lists_each_keys_uri_on_stderr(served: Served, tmp_path: Path) -> None:
    run = subprocess.run(
        [SIGNERY, "exec", "--json", "--", "true"],
        env=served.cli_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout == ""  # stdout is the tool's
    start = run.stderr.index("{")
    listed, _ = json.JSONDecoder().raw_decode(run.stderr[start:])
    uris = {entry["name"]: entry["uri"] for entry in listed["keys"]}
    for key in served.keys.values():
        assert uris[key["name"]] == (
            f"pkcs11:token=Signery;object={key['name']};"
            f"id={''.join(f'%{b:02x}' for b in bytes.fromhex(key['id'].replace('-', '')))};"
            "type=private"
        )
