"""Approvals end to end through the CLI, against a real ``signery serve`` process
(SQLite and PostgreSQL): a build machine runs ``signery sign --wait`` in the
background, an approver (its own user, `approver` role, its own API token)
lists and approves with ``signery approval``, the waiting sign finishes with a
signature openssl verifies, the single-use grant is used up, and the next sign
is pending again (exit status 3). A denial ends a waiting sign with status 1
and the approver's comment."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from signery.cli import main
from signery.cli._sign import EXIT_APPROVAL_PENDING
from tests.cli.test_cli_e2e import Cli, openssl, write_file
from tests.support import SIGNERY, Installation, ServerProcess

pytestmark = pytest.mark.e2e

WAIT_SECONDS = 60


@pytest.fixture(scope="module")
def cli(
    server: ServerProcess, installation: Installation, tmp_path_factory: pytest.TempPathFactory
) -> Cli:
    """The CLI with a private SIGNERY_HOME; the default profile is the superuser's."""
    root = tmp_path_factory.mktemp("approvals-cli")
    home, work = root / "home", root / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIGNERY_")}
    env.update({"SIGNERY_HOME": str(home), "NO_COLOR": "1", "COLUMNS": "200"})
    runner = Cli(home, work, env)
    runner.json("login", "--server", server.url, "--api-token", installation.admin_token)
    return runner


@pytest.fixture(scope="module")
def setup(cli: Cli, installation: Installation, server: ServerProcess) -> dict[str, Any]:
    """A TSG with an account (profile `build`), a key requiring one approval, and a
    user with the approver role logged in with its own API token (profile `approver`)."""
    tsg = cli.json("tsg", "create", "guarded")
    key_file = cli.work / "guarded-account.pem"
    account = cli.json("account", "create", "releaser", "--tsg", tsg["id"], "--key-out", key_file)
    key = cli.json("key", "create", "guarded-p256", "--tsg", tsg["id"], "--algorithm", "EC_P256")
    password = cli.work / "approver.pw"
    password.write_text("a long approver passphrase\n")
    user = cli.json("user", "create", "approver-1", "--tsg", tsg["id"], "--password-file", password)
    cli.json("role", "bind", user["id"], "approver", "--tsg", tsg["id"])
    # The policy, through the API (set by the superuser, a key admin).
    response = httpx.put(
        f"{server.url}/api/v1/keys/{key['id']}/policy",
        json={"approval": {"required": 1, "grant_max_uses": 1}},
        headers={"Authorization": f"Bearer {installation.admin_token}"},
    )
    assert response.status_code == 200, response.text
    cli.json(
        "login", "--server", server.url, "--client-id", account["client_id"],
        "--key-file", key_file, profile="build",
    )  # fmt: skip
    cli.json(
        "login", "--server", server.url, "--username", user["username"],
        "--password-file", password, profile="approver",
    )  # fmt: skip
    return {"tsg": tsg, "account": account, "key": key, "user": user}


class Background:
    """A `signery sign --wait` running in the background; stderr read line by line."""

    def __init__(self, cli: Cli, *args: str | Path) -> None:
        self.process = subprocess.Popen(
            [SIGNERY, "--profile", "build", *map(str, args)],
            env=cli.env,
            cwd=cli.work,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)

    def wait_for(self, text: str, timeout: float = WAIT_SECONDS) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines:
                if text in line:
                    return line
            assert self.process.poll() is None, f"exited early: {self.lines}"
            time.sleep(0.1)
        raise AssertionError(f"{text!r} never appeared: {self.lines}")

    def finish(self) -> tuple[int, str, str]:
        # stderr belongs to the reader thread; stdout is small (one line per file).
        self.process.wait(WAIT_SECONDS)
        self._reader.join(5)
        assert self.process.stdout is not None
        stdout = self.process.stdout.read()
        self.process.stdout.close()
        assert self.process.stderr is not None
        self.process.stderr.close()
        return self.process.returncode, stdout, "".join(self.lines)


def pending_request(cli: Cli, key_id: str) -> dict[str, Any]:
    listed = [r for r in cli.json("approval", "list", profile="approver") if r["key_id"] == key_id]
    assert len(listed) == 1, listed
    return listed[0]


def test_sign_wait_approve_grant_used_up_then_pending_again(
    cli: Cli, setup: dict[str, Any]
) -> None:
    key = setup["key"]
    files = [write_file(cli.work / f"release-{i}.bin", f"release {i}".encode()) for i in (1, 2)]
    waiting = Background(
        cli, "sign", "--key", key["name"], "--wait", "--wait-timeout", "2m",
        "--justification", "release 2.0", files[0],
    )  # fmt: skip
    line = waiting.wait_for("waiting for approval of signing request")
    request = pending_request(cli, key["id"])
    assert request["id"] in line
    assert request["justification"] == "release 2.0"
    assert request["account_id"] == setup["account"]["id"]

    shown = cli.ok("approval", "show", request["id"], profile="approver").stdout
    assert "release 2.0" in shown
    assert "pending_approval" in shown
    approved = cli.json("approval", "approve", request["id"], "--comment", "go", profile="approver")
    assert approved["status"] == "approved"

    code, stdout, stderr = waiting.finish()
    assert code == 0, stderr
    assert "signed" in stdout
    public = cli.work / "guarded.pub.pem"
    public.write_text(key["public_key_pem"])
    verified = openssl(
        "dgst", "-sha256", "-verify", public, "-signature", f"{files[0]}.sig", files[0]
    )
    assert verified.returncode == 0, verified.stderr
    assert "Verified OK" in verified.stdout

    grants = cli.json("grant", "list", "--key", key["id"], profile="approver")
    assert [(g["uses"], g["max_uses"], g["status"]) for g in grants] == [(1, 1, "used_up")]
    table = cli.ok("grant", "list", "--key", key["id"], profile="approver").stdout
    assert "1/1" in table

    again = cli.run("sign", "--key", key["name"], files[1], profile="build")
    assert again.returncode == EXIT_APPROVAL_PENDING, again.stderr
    new_request = pending_request(cli, key["id"])
    assert new_request["id"] != request["id"]
    assert new_request["id"] in again.stderr
    assert not Path(f"{files[1]}.sig").exists()
    # Clean up for the next test: deny it.
    cli.json("approval", "deny", new_request["id"], "--comment", "later", profile="approver")


def test_a_denial_ends_the_waiting_sign_with_the_comment(cli: Cli, setup: dict[str, Any]) -> None:
    key = setup["key"]
    target = write_file(cli.work / "denied.bin", b"not this one")
    waiting = Background(cli, "sign", "--key", key["name"], "--wait", target)
    waiting.wait_for("waiting for approval")
    request = pending_request(cli, key["id"])
    cli.json("approval", "deny", request["id"], "--comment", "wrong branch", profile="approver")
    code, _, stderr = waiting.finish()
    assert code == 1
    assert "approval_denied" in stderr
    assert "wrong branch" in stderr
    assert not Path(f"{target}.sig").exists()


def test_ctrl_c_while_waiting_for_approval_stops_and_signs_nothing(
    cli: Cli, setup: dict[str, Any], server: ServerProcess, installation: Installation
) -> None:
    """Regression: Ctrl-C during --wait ended the process with nothing said; now
    it stops polling at once, says the file was not signed, and sends nothing
    more (an approval given afterwards is not used by this run)."""
    key = setup["key"]
    target = write_file(cli.work / "interrupted-wait.bin", b"waiting, then Ctrl-C")
    waiting = Background(cli, "sign", "--key", key["name"], "--wait", target)
    waiting.wait_for("waiting for approval")
    request = pending_request(cli, key["id"])
    admin = {"Authorization": f"Bearer {installation.admin_token}"}
    newest = httpx.get(
        f"{server.url}/api/v1/audit/events", params={"order": "desc", "limit": 1}, headers=admin
    ).json()["events"][0]["seq"]
    waiting.process.send_signal(signal.SIGINT)
    code, stdout, stderr = waiting.finish()
    assert code == 128 + signal.SIGINT, stderr
    assert "Traceback" not in stderr
    assert "interrupted by SIGINT: 0 of 1 files signed" in stderr
    assert f"not signed  {target}: approval_pending" in stderr
    assert stdout == ""
    cli.json("approval", "approve", request["id"], "--comment", "too late", profile="approver")
    events = httpx.get(
        f"{server.url}/api/v1/audit/events", params={"cursor": newest, "limit": 100}, headers=admin
    ).json()["events"]
    assert [e["kind"] for e in events if e["kind"].startswith("signing.sign.")] == []
    assert not Path(f"{target}.sig").exists()
    # The grant stays unused; revoke it so the next test starts from nothing.
    [grant] = [
        g
        for g in cli.json("grant", "list", "--key", key["id"], profile="approver")
        if g["status"] == "valid"
    ]
    cli.json("grant", "revoke", grant["id"], profile="approver")


def test_several_files_are_one_request_listing_each_digest_and_sign_after_it(
    cli: Cli, setup: dict[str, Any]
) -> None:
    """A batch is one decision for approvers, and what they approve is every file's
    digest. OpenPGP (like CMS, Authenticode, JAR) puts the signing time in what is
    signed: the waiting run signs the very digests it asked for (one signing time
    per run), or the grant would not cover them."""
    key = setup["key"]
    files = [write_file(cli.work / f"batch-{i}.bin", f"batch {i}".encode()) for i in range(3)]
    waiting = Background(
        cli, "sign", "--key", key["name"], "--format", "openpgp", "--jobs", "3",
        "--wait", "--wait-timeout", "2m", *files,
    )  # fmt: skip
    line = waiting.wait_for("waiting for approval of signing request")
    request = pending_request(cli, key["id"])
    assert request["id"] in line
    # All three files wait on the one request, which lists each one's digest.
    assert len(request["digests"]) == 3
    assert request["scope"] == "digests"
    shown = cli.ok("approval", "show", request["id"], profile="approver").stdout
    assert all(d["digest"] in shown for d in request["digests"])
    assert "--expect-digests 3" in shown
    listed = cli.ok("approval", "list", profile="approver").stdout
    assert "3 digests" in listed
    # An approval of a set other than the one listed is refused.
    stale = cli.run(
        "approval", "approve", request["id"], "--expect-digests", "2", profile="approver"
    )
    assert stale.returncode == 1
    assert "approval_request_changed" in stale.stderr
    cli.json("approval", "approve", request["id"], "--expect-digests", "3", profile="approver")

    code, stdout, stderr = waiting.finish()
    assert code == 0, stderr
    assert stdout.count("signed ") == 3, stdout
    verified = cli.json(
        "verify", "--key", key["name"], "--format", "openpgp", *files, profile="build"
    )
    assert [v["valid"] for v in verified] == [True, True, True], verified
    (grant,) = [g for g in cli.json("grant", "list", "--key", key["id"], profile="approver")
                if g["request_id"] == request["id"]]  # fmt: skip
    assert (grant["uses"], grant["max_uses"], grant["status"]) == (3, 1, "used_up")


def test_a_later_run_signs_the_approved_digest_with_the_signing_time_it_was_given(
    cli: Cli, setup: dict[str, Any]
) -> None:
    """Without --wait, the pending run prints the signing time its digest holds; a
    later run given that time sends the same digest, which the grant covers."""
    key = setup["key"]
    target = write_file(cli.work / "later.bin", b"signed in a later run")
    first = cli.run("sign", "--key", key["name"], "--format", "openpgp", target, profile="build")
    assert first.returncode == EXIT_APPROVAL_PENDING, first.stderr
    (hint,) = [line for line in first.stderr.splitlines() if "--signing-time" in line]
    stated = hint.split("--signing-time ")[1].split()[0]
    request = pending_request(cli, key["id"])
    cli.json("approval", "approve", request["id"], "--expect-digests", "1", profile="approver")
    again = cli.json(
        "sign", "--key", key["name"], "--format", "openpgp", "--signing-time", stated, target,
        profile="build",
    )  # fmt: skip
    assert again[0]["ok"] is True
    [ok] = cli.json("verify", "--key", key["name"], "--format", "openpgp", target, profile="build")
    assert ok["valid"] is True
    # A time that is no time is refused before anything is sent.
    bad = cli.fails("sign", "--key", key["name"], "--signing-time", "yesterday", target,
                    profile="build")  # fmt: skip
    assert "--signing-time" in bad


def test_a_pre_approval_says_what_it_covers(cli: Cli, setup: dict[str, Any]) -> None:
    key = setup["key"]
    account = setup["account"]["id"]
    files = [write_file(cli.work / f"pre-{i}.bin", f"pre {i}".encode()) for i in range(3)]
    terms = ("--key", key["name"], "--account", account, "--expires-in", "1h")
    unsaid = cli.fails("approval", "pre-approve", *terms, profile="approver")
    assert "--any-digest" in unsaid

    # One release file, by the digest sha256sum prints: that file only, once.
    digest = hashlib.sha256(files[0].read_bytes()).hexdigest()
    listed = cli.json(
        "approval", "pre-approve", *terms, "--digest", f"sha256:{digest}", "--scheme", "ecdsa",
        profile="approver",
    )  # fmt: skip
    assert listed["scope"] == "digests"
    assert [d["digest"] for d in listed["digests"]] == [digest]
    other = cli.run("sign", "--key", key["name"], files[1], profile="build")
    assert other.returncode == EXIT_APPROVAL_PENDING, other.stderr
    cli.ok("sign", "--key", key["name"], files[0], profile="build")
    for r in cli.json("approval", "list", profile="approver"):
        if r["key_id"] == key["id"]:
            cli.json("approval", "deny", r["id"], "--comment", "next", profile="approver")

    # Any digest, said on purpose, and shown as such.
    anything = cli.json(
        "approval", "pre-approve", *terms, "--any-digest", "--uses", "3", profile="approver"
    )
    assert anything["scope"] == "any_digest"
    # The policy allows a single use per grant: the approver cannot widen it.
    assert anything["grant"]["max_uses"] == 1
    assert "ANY digest" in cli.ok("approval", "show", anything["id"], profile="approver").stdout
    assert "ANY digest" in cli.ok("grant", "list", "--key", key["id"], profile="approver").stdout
    done = cli.run("sign", "--key", key["name"], "--jobs", "3", *files[1:], profile="build")
    assert done.returncode == EXIT_APPROVAL_PENDING
    assert sum(Path(f"{f}.sig").exists() for f in files[1:]) == 1
    revoked = cli.json("grant", "revoke", anything["grant"]["id"], profile="approver")
    assert revoked["status"] == "revoked"


def test_a_comment_the_wire_model_refuses_is_an_error_not_a_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Refused before anything is sent (no server here): a control character.
    args = ["--server", "http://127.0.0.1:9", "--api-token", "sgy_pat_0000000000000000_x"]
    status = main([*args, "approval", "deny", "r", "--comment", "a\x1b[2Jb"])
    assert status == 1
    err = capsys.readouterr().err
    assert "validation_failed" in err
    assert "comment: control characters are not allowed" in err
    assert "Traceback" not in err
    assert "\x1b" not in err  # the refused value is not repeated
