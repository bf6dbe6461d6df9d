"""`signery init` and `signery serve` keep the data directory to the server's user.

Regression tests for issue 12 item 11: `signery init` into an existing directory
left `signery.db` and its `-wal`/`-shm` files readable by everyone, and the
server served from a directory open to other users.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import SIGNERY, wait_until_ready

pytestmark = pytest.mark.e2e

# The usual umask of a login shell: files 0644, directories 0755 unless the
# command sees to it.
SHELL_UMASK = 0o022


def env_for(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIGNERY_")}
    env["SIGNERY_DATA_DIR"] = str(data_dir)
    env["SIGNERY_LOG_LEVEL"] = "warning"
    return env


def signery(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SIGNERY, *args],
        env=env_for(data_dir),
        capture_output=True,
        text=True,
        timeout=60,
        umask=SHELL_UMASK,
    )


def modes(data_dir: Path) -> dict[str, str]:
    """Every entry of the data directory with its permission bits (octal)."""
    return {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in sorted(data_dir.iterdir())}


@pytest.fixture
def serving(tmp_path: Path) -> Iterator[tuple[Path, str, str]]:
    """(data dir, URL, admin token) of a server initialized into an existing,
    private, empty directory and serving."""
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    init = signery(data_dir, "init", "--json")
    assert init.returncode == 0, init.stderr
    token = json.loads(init.stdout)["admin_token"]
    process = subprocess.Popen(
        [SIGNERY, "serve", "--host", "127.0.0.1", "--port", "0", "--json"],
        env=env_for(data_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        umask=SHELL_UMASK,
    )
    try:
        assert process.stdout is not None
        url = json.loads(process.stdout.readline())["url"]
        wait_until_ready(process, url)
        yield data_dir, url, token
    finally:
        process.terminate()
        process.wait(30)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def test_init_into_an_existing_directory_writes_only_private_files(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    result = signery(data_dir, "init", "--json")
    assert result.returncode == 0, result.stderr
    files = modes(data_dir)
    assert "signery.db" in files
    assert files == dict.fromkeys(files, "0o600")


def test_every_file_of_a_serving_server_is_private(serving: tuple[Path, str, str]) -> None:
    data_dir, url, token = serving
    with httpx.Client(base_url=url, timeout=30) as http:
        # A write, so that SQLite's write-ahead log and shared memory exist.
        tsg = http.post(
            "/api/v1/tsgs", json={"name": "files"}, headers={"Authorization": f"Bearer {token}"}
        )
        assert tsg.status_code == 201, tsg.text
    files = modes(data_dir)
    assert {"signery.db", "signery.db-wal", "signery.db-shm"} <= set(files)
    assert files == dict.fromkeys(files, "0o600")
    assert oct(stat.S_IMODE(data_dir.stat().st_mode)) == "0o700"


@pytest.mark.parametrize("mode", [0o755, 0o750, 0o701])
def test_serve_refuses_a_data_directory_open_to_others(tmp_path: Path, mode: int) -> None:
    data_dir = tmp_path / "data"
    init = signery(data_dir, "init", "--json")
    assert init.returncode == 0, init.stderr
    data_dir.chmod(mode)
    served = signery(data_dir, "serve", "--host", "127.0.0.1", "--port", "0", "--json")
    assert served.returncode == 1, served.stderr
    assert served.stdout == ""  # no URL announced: nothing listened
    assert "data_directory_not_private" in served.stderr
    assert f"chmod 700 {data_dir}" in served.stderr


def test_init_refuses_an_existing_directory_open_to_others(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o755)
    data_dir.chmod(0o755)  # whatever this process's umask
    result = signery(data_dir, "init", "--json")
    assert result.returncode == 1, result.stdout
    assert f"chmod 700 {data_dir}" in result.stderr
    assert list(data_dir.iterdir()) == []  # nothing written into it


def test_init_creates_a_missing_data_directory_private(tmp_path: Path) -> None:
    data_dir = tmp_path / "new" / "data"
    result = signery(data_dir, "init", "--json")
    assert result.returncode == 0, result.stderr
    assert oct(stat.S_IMODE(data_dir.stat().st_mode)) == "0o700"
    files = modes(data_dir)
    assert files == dict.fromkeys(files, "0o600")
