"""``make demo`` works from a checkout: the whole walk-through, run as the
Makefile runs it (``python -m demo`` from the repository root), passes every
step. It starts its own server, SoftHSM2 token and AWS KMS double, so a broken
path to any of them (such as devtools/ leaving the package) fails here."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
DEMO_TIMEOUT = 900


def test_the_demo_passes_every_step(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIGNERY_")}
    env.update({"NO_COLOR": "1", "COLUMNS": "160"})
    run = subprocess.run(
        [sys.executable, "-m", "demo", "--out", str(tmp_path / "demo-out")],
        cwd=REPOSITORY,
        env=env,
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT,
        check=False,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    passed = re.search(r"Demo succeeded: all (\d+) steps passed", output)
    assert passed is not None, output[-4000:]
    assert int(passed.group(1)) >= 36
    assert (tmp_path / "demo-out" / "server.log").is_file()
