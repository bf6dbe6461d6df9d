"""Every command and group of the ``signery`` CLI answers ``--help``, and every
leaf command a script may call offers ``--json``.

The command tree is walked from the real Typer app, so a new command is covered
the moment it is registered; nothing here lists commands by hand except the one
deliberate exception to the ``--json`` rule.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import typer

from signery import __version__
from signery.cli import app, main


def _walk(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    yield path, command
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        yield from _walk(sub, (*path, name))


def _is_group(command: Any) -> bool:
    return hasattr(command, "commands")


def _has_json_option(command: Any) -> bool:
    return any(
        param.param_type_name == "option" and "--json" in param.opts and param.is_flag
        for param in command.params
    )


TREE = list(_walk(typer.main.get_command(app)))
LEAVES = [(path, command) for path, command in TREE if not _is_group(command)]


def _ids(entries: list[tuple[tuple[str, ...], Any]]) -> list[str]:
    return [" ".join(path) or "signery" for path, _ in entries]


def test_the_walk_sees_the_whole_tree() -> None:
    """Guards the walk itself: nested groups (user token ...) and top-level
    commands are both reached, so the parametrized tests below are not vacuous."""
    paths = {" ".join(path) for path, _ in TREE}
    assert {"sign", "verify", "login", "serve", "user token create", "key chain"} <= paths
    groups = {" ".join(path) for path, command in TREE if _is_group(command)}
    assert {"", "db", "tsg", "user", "user token", "account", "key", "audit", "ca"} <= groups
    assert len(LEAVES) >= 30


@pytest.mark.parametrize(("path", "command"), TREE, ids=_ids(TREE))
def test_help_exits_zero_with_text(
    path: tuple[str, ...], command: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*path, "--help"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip(), f"`signery {' '.join(path)} --help` printed nothing"
    assert "Usage:" in captured.out
    assert f"signery {' '.join(path)}".strip() in " ".join(captured.out.split())
    if _is_group(command):
        for name in command.commands:
            assert name in captured.out, f"group help does not list {name!r}"


@pytest.mark.parametrize(("path", "command"), LEAVES, ids=_ids(LEAVES))
def test_every_command_offers_json(path: tuple[str, ...], command: Any) -> None:
    """Every command, `serve` included (it announces its URL as JSON)."""
    assert _has_json_option(command), f"`signery {' '.join(path)}` has no --json flag"


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"signery {__version__}"


def test_usage_error_is_a_message_and_status_2_not_a_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`main()` must turn a mistyped command into click's usage message (exit 2);
    an exception escaping main() reaches the user as a Python traceback."""
    assert main(["no-such-command"]) == 2
    assert "No such command" in capsys.readouterr().err


def test_missing_required_option_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sign", "some-file"]) == 2
    assert "--key" in capsys.readouterr().err
