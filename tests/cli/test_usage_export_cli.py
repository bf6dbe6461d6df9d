"""`signery usage` (table, --json, --csv) and `signery audit export` as real
subprocesses against a real `signery serve` (SQLite and PostgreSQL); the export of
50,000 events stays within a fixed memory bound (peak RSS of the CLI process)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from tests.server.audit.bulk import insert_events
from tests.support import SIGNERY, Api, Installation, ServerProcess

pytestmark = pytest.mark.e2e

MANY = 50_000
START = datetime(2096, 6, 1, tzinfo=UTC)
# The CLI alone is ~60 MiB; a client holding the 34 MiB answer would pass 100.
PEAK_RSS_LIMIT = 96 * 1024 * 1024


@pytest.fixture(scope="module")
def env(
    server: ServerProcess, installation: Installation, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    home = tmp_path_factory.mktemp("cli-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIGNERY_")}
    env.update({"SIGNERY_HOME": str(home), "NO_COLOR": "1", "COLUMNS": "250"})
    run(env, "login", "--server", server.url, "--api-token", installation.admin_token)
    return env


def run(env: dict[str, str], *args: str) -> str:
    r = subprocess.run(
        [SIGNERY, *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert r.returncode == 0, f"{args}: {r.stdout}\n{r.stderr}"
    return r.stdout


def test_usage_table_json_and_csv(
    env: dict[str, str], server: ServerProcess, installation: Installation
) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        api = Api(
            http, installation.admin_token, installation.init.issuer, installation.init.root_tsg_id
        )
        tsg = api.create_tsg()
        account = api.create_account(tsg["id"])
        key = api.create_key(tsg["id"], ca="none")
        token = api.access_token(account)
        for i in range(3):
            assert (
                api.sign(token, key["id"], hashlib.sha256(bytes([i])).digest()).status_code == 200
            )
        assert api.sign(token, key["id"], b"short").status_code == 400
    args = ("usage", "--tsg", tsg["id"], "--since", "1d")
    table = run(env, *args)
    assert key["name"] in table
    assert account.name in table
    assert "failed" in table
    assert "denied" in table
    report = json.loads(run(env, *args, "--json"))
    got = {
        (c["subject_type"], c["name"]): (c["successes"], c["failures"], c["denied"])
        for c in report["counters"]
    }
    assert got == {
        ("key", key["name"]): (3, 1, 0),
        ("key_version", key["name"]): (3, 1, 0),
        ("account", account.name): (3, 1, 0),
    }
    rows = list(csv.DictReader(io.StringIO(run(env, *args, "--csv", "--by-day"))))
    assert {
        (r["subject_type"], r["name"], r["successes"], r["failures"], r["denied"]) for r in rows
    } == {(kind, name, "3", "1", "0") for (kind, name) in got}
    assert {r["day"] for r in rows} == {datetime.now(UTC).date().isoformat()}


def vm_hwm(pid: int) -> int | None:
    """The process's peak resident set size (bytes), None once it has exited."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None  # a zombie: exited, not yet reaped


def export_peak_rss(env: dict[str, str], out: Path, fmt: str) -> int:
    """Run `signery audit export` and return its peak RSS in bytes: VmHWM, the
    kernel's high-water mark of the process's own memory (reset at exec, unlike
    getrusage's ru_maxrss, which a child inherits from the large test process),
    read until the process exits."""
    argv = [
        SIGNERY,
        "audit",
        "export",
        "--since",
        START.isoformat(),
        "--until",
        "2096-06-30",
        "--format",
        fmt,
        "-o",
        str(out),
    ]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        hwm = vm_hwm(proc.pid)
        peak = max(peak, hwm or 0)
        time.sleep(0.02)
    assert proc.stderr is not None
    stderr = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.returncode == 0, stderr
    assert peak > 0
    return peak


def test_export_of_many_events_streams_in_bounded_memory(
    env: dict[str, str], installation: Installation, tmp_path: Path
) -> None:
    insert_events(installation, START, MANY)
    out = tmp_path / "audit.jsonl"
    peak = export_peak_rss(env, out, "jsonl")
    with out.open() as f:
        count = 0
        for line in f:
            event = json.loads(line)
            count += 1
    assert count == MANY
    assert event["details"]["n"] == MANY - 1  # oldest first, through the last
    assert peak < PEAK_RSS_LIMIT, f"peak RSS {peak / 2**20:.0f} MiB"
    print(
        f"export of {MANY} events: {out.stat().st_size / 2**20:.1f} MiB, "
        f"CLI peak RSS {peak / 2**20:.0f} MiB"
    )
