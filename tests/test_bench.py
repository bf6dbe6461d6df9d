"""Every benchmark script answers ``--help`` (regression: a ``%`` in a help string
made ``bench/sign_throughput.py --help`` crash in argparse's formatting).

The scripts are found on disk, so a new one is covered the moment it is added.
Cheap: argparse prints the help before any server, tool or key is touched."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
HELP_TIMEOUT = 60


def _has_main(script: Path) -> bool:
    """A runnable script: it has an ``if __name__ == "__main__":`` block."""
    tree = ast.parse(script.read_text(encoding="utf-8"))
    return any(
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"
        for node in tree.body
    )


SCRIPTS = sorted(p for p in BENCH.glob("*.py") if _has_main(p))


def test_the_benchmark_scripts_are_found() -> None:
    assert {p.name for p in SCRIPTS} >= {"sign_throughput.py", "client_throughput.py"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_help_is_printed(script: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(script), "--help"],
        capture_output=True,
        text=True,
        timeout=HELP_TIMEOUT,
        check=False,
        cwd=BENCH.parent,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout.startswith("usage:"), result.stdout
