"""signery.client.sign_files, what ``signery sign`` runs, called from Python against a
real ``signery serve``: one result per file in order, one file's failure never
stops the others, refusals before anything is sent, approvals waited for (the
waiting files signed again once approved), and an interrupt that leaves every
file unsigned. Signatures are checked with the formats' own verifiers against
the key's public key."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from signery.client import (
    ApprovalDenied,
    ApprovalPending,
    Client,
    FileResult,
    SignFilesObserver,
    sign_files,
)
from signery.crypto import load_public_key_pem
from signery.errors import ClientError, Interrupted, SchemeNotAllowed, SigneryError
from signery.formats import SignOptions, SignResult, UnknownFormat, get_format
from signery.protocol import SignatureScheme
from tests.support import Account, Api, Installation, ServerProcess, new_installation

pytestmark = pytest.mark.e2e

WAIT_SECONDS = 60


@pytest.fixture(scope="module", params=["sqlite"])
def installation(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Installation]:
    """One database is enough: sign_files sees a Client, never the database."""
    with new_installation(request.param, tmp_path_factory.mktemp("signery-sign-files")) as inst:
        yield inst


class Recording(httpx.HTTPTransport):
    """A real HTTP transport that remembers the path of every request it sends."""

    def __init__(self) -> None:
        super().__init__()
        self.paths: list[str] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.paths.append(request.url.path)
        return super().handle_request(request)

    @property
    def signings(self) -> int:
        return sum(path.endswith("/sign") for path in self.paths)


class Recorder(SignFilesObserver):
    """Remembers what sign_files reported, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def round_started(self, files: Sequence[Path]) -> None:
        self.events.append(("round", list(files)))

    def waiting(self, request_id: str, seconds_left: float) -> None:
        self.events.append(("waiting", request_id))

    def approved(self, files: Sequence[Path]) -> None:
        self.events.append(("approved", list(files)))


@pytest.fixture(scope="module")
def world(server_api: Api) -> dict[str, Any]:
    api = server_api
    tsg = api.create_tsg()
    guarded = api.create_key(tsg["id"], "EC_P256", ca="none")
    api.ok(
        api.http.put(
            f"/api/v1/keys/{guarded['id']}/policy",
            json={"approval": {"required": 1, "grant_max_uses": 1}},
            headers=api.admin,
        )
    )
    return {
        "account": api.create_account(tsg["id"]),
        "key": api.create_key(tsg["id"], "EC_P256", ca="none"),
        "guarded": guarded,
    }


@pytest.fixture
def connect(server: ServerProcess, world: dict[str, Any]) -> Iterator[Callable[..., Client]]:
    """A Client for the world's account (its transport records what it sent)."""
    clients: list[Client] = []

    def make(transport: httpx.BaseTransport | None = None) -> Client:
        account: Account = world["account"]
        client = Client(server.url, credentials=account.credentials(), transport=transport)
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.close()


def files(directory: Path, count: int, prefix: str = "artifact") -> list[Path]:
    made = []
    for i in range(count):
        f = directory / f"{prefix}-{i}.bin"
        f.write_bytes(f"{prefix} {i}\n".encode() * (i + 1))
        made.append(f)
    return made


def verified(result: FileResult, public_pem: str) -> bool:
    assert isinstance(result, SignResult), result
    raw = get_format("raw")
    check = raw.verify(result.file, result.output, [load_public_key_pem(public_pem)], SignOptions())
    return check.valid


# ------------------------------------------------------------------ signing


def test_every_file_is_signed_and_results_come_in_order(
    connect: Callable[..., Client], world: dict[str, Any], tmp_path: Path
) -> None:
    inputs = files(tmp_path, 5)

    results = sign_files(connect(), world["key"]["name"], inputs, "raw", jobs=2)

    assert [r.file for r in results if isinstance(r, SignResult)] == inputs
    assert all(verified(r, world["key"]["public_key_pem"]) for r in results)
    assert {r.output for r in results if isinstance(r, SignResult)} == {
        f.with_name(f.name + ".sig") for f in inputs
    }


def test_one_failure_does_not_stop_the_others(
    connect: Callable[..., Client], world: dict[str, Any], tmp_path: Path
) -> None:
    """The middle file's signature cannot be written (a directory is in the way):
    it fails alone, with its own error, and the others are signed."""
    inputs = files(tmp_path, 3)
    (tmp_path / "artifact-1.bin.sig").mkdir()

    first, middle, last = sign_files(connect(), world["key"]["name"], inputs, "raw")

    assert isinstance(middle, ClientError)
    assert "artifact-1.bin" in middle.detail
    assert verified(first, world["key"]["public_key_pem"])
    assert verified(last, world["key"]["public_key_pem"])


def test_output_names_where_the_one_signature_goes(
    connect: Callable[..., Client], world: dict[str, Any], tmp_path: Path
) -> None:
    [single] = files(tmp_path, 1)
    target = tmp_path / "elsewhere.sig"

    [result] = sign_files(connect(), world["key"]["id"], [single], output=target)

    assert isinstance(result, SignResult)
    assert result.output == target
    assert verified(result, world["key"]["public_key_pem"])


# ------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"signature_format": "zip"}, UnknownFormat, "format must be one of"),
        ({"output": Path("one.sig")}, ClientError, "exactly one file"),
        ({"jobs": 0}, ClientError, "jobs"),
        (
            {"options": SignOptions(scheme=SignatureScheme.RSA_PSS)},
            SchemeNotAllowed,
            None,
        ),
    ],
)
def test_refusals_come_before_any_file_is_signed(
    connect: Callable[..., Client],
    world: dict[str, Any],
    tmp_path: Path,
    arguments: dict[str, Any],
    error: type[SigneryError],
    message: str | None,
) -> None:
    transport = Recording()
    inputs = files(tmp_path, 2)

    with pytest.raises(error, match=message):
        sign_files(connect(transport), world["key"]["name"], inputs, **arguments)

    assert transport.signings == 0
    assert list(tmp_path.glob("*.sig")) == []


def test_a_missing_file_is_refused_before_anything_is_sent(
    connect: Callable[..., Client], world: dict[str, Any], tmp_path: Path
) -> None:
    transport = Recording()
    inputs = [*files(tmp_path, 1), tmp_path / "missing.bin"]

    with pytest.raises(ClientError, match=r"missing\.bin is not a readable file"):
        sign_files(connect(transport), world["key"]["name"], inputs)

    assert transport.paths == []


def test_an_interrupted_client_signs_nothing(
    connect: Callable[..., Client], world: dict[str, Any], tmp_path: Path
) -> None:
    transport = Recording()
    client = connect(transport)
    client.interrupt()
    inputs = files(tmp_path, 3)

    results = sign_files(client, world["key"]["name"], inputs)

    assert all(isinstance(r, Interrupted) for r in results)
    assert transport.paths == []
    assert list(tmp_path.glob("*.sig")) == []


# ------------------------------------------------------------------ approvals


def test_without_waiting_the_files_share_one_pending_request(
    connect: Callable[..., Client], world: dict[str, Any], tmp_path: Path
) -> None:
    results = sign_files(connect(), world["guarded"]["name"], files(tmp_path, 2))

    assert all(isinstance(r, ApprovalPending) for r in results)
    assert len({r.request_id for r in results if isinstance(r, ApprovalPending)}) == 1


def _decide_when_waiting(
    api: Api, recorder: Recorder, action: str, **body: Any
) -> threading.Thread:
    """An approver who decides the request as soon as sign_files waits for it."""

    def decide() -> None:
        deadline = time.monotonic() + WAIT_SECONDS
        while time.monotonic() < deadline:
            waiting = [e for e in recorder.events if e[0] == "waiting"]
            if waiting:
                api.ok(
                    api.http.post(
                        f"/api/v1/approvals/{waiting[0][1]}/{action}", json=body, headers=api.admin
                    )
                )
                return
            time.sleep(0.05)

    thread = threading.Thread(target=decide, daemon=True)
    thread.start()
    return thread


def test_waiting_signs_the_files_once_approved(
    connect: Callable[..., Client],
    world: dict[str, Any],
    server_api: Api,
    tmp_path: Path,
) -> None:
    recorder = Recorder()
    inputs = files(tmp_path, 2)
    approver = _decide_when_waiting(server_api, recorder, "approve", comment="release")

    results = sign_files(
        connect(),
        world["guarded"]["name"],
        inputs,
        wait_for_approval=WAIT_SECONDS,
        observer=recorder,
    )
    approver.join(WAIT_SECONDS)

    assert all(verified(r, world["guarded"]["public_key_pem"]) for r in results)
    assert [kind for kind, _ in recorder.events] == ["round", "waiting", "approved", "round"]
    assert recorder.events[2] == ("approved", inputs)


def test_a_denial_ends_the_waiting_files(
    connect: Callable[..., Client],
    world: dict[str, Any],
    server_api: Api,
    tmp_path: Path,
) -> None:
    recorder = Recorder()
    approver = _decide_when_waiting(server_api, recorder, "deny", comment="not today")

    results = sign_files(
        connect(),
        world["guarded"]["name"],
        files(tmp_path, 2),
        wait_for_approval=WAIT_SECONDS,
        observer=recorder,
    )
    approver.join(WAIT_SECONDS)

    assert all(isinstance(r, ApprovalDenied) and "not today" in r.detail for r in results)
    assert list(tmp_path.glob("*.sig")) == []
