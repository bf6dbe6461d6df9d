"""What happens on the server while a tool holds a session: the server goes down
and comes back, a key is disabled, a key requires approval. The tool gets a
clear PKCS#11 error, never a signature the policy forbids, and the agent keeps
serving."""

from __future__ import annotations

import hashlib
import logging
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from signery import protocol as p
from signery.agent import Agent, AgentSettings, running_in_thread
from signery.agent._pkcs11 import CKM, CKR
from signery.client import Client
from tests.agent.test_faults import RpcClient, refused
from tests.support import (
    SIGNERY,
    Account,
    Api,
    Installation,
    free_port,
    new_installation,
    server_env,
    wait_until_ready,
)

DIGEST = hashlib.sha256(b"built artifact").digest()


@dataclass
class Restartable:
    """A `signery serve` on a fixed port, stopped and started again at will."""

    installation: Installation
    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = self.installation.settings.data_dir / "server.log"
        with log.open("ab") as log_file:
            self.process = subprocess.Popen(
                [SIGNERY, "serve", "--host", "127.0.0.1", "--port", str(self.port)],
                env=server_env(self.installation),
                stdout=subprocess.DEVNULL,
                stderr=log_file,
            )
        wait_until_ready(self.process, self.url)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)
        self.process = None


@dataclass
class World:
    server: Restartable
    api: Api
    account: Account
    keys: dict[str, dict[str, Any]]
    socket: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with new_installation("sqlite", tmp_path_factory.mktemp("agent-changes")) as inst:
        server = Restartable(inst, free_port())
        server.start()
        try:
            with httpx.Client(base_url=server.url, timeout=30) as http:
                api = Api(http, inst.admin_token, inst.init.issuer, inst.init.root_tsg_id)
                root = inst.init.root_tsg_id
                keys = {
                    role: api.create_key(root, "EC_P256", subject={"common_name": role})
                    for role in ("steady", "disabled", "approval")
                }
                api.admin_client.signing_keys.set_policy(
                    keys["approval"]["id"],
                    p.KeyPolicy(approval=p.ApprovalPolicy(required=1)),
                )
                account = api.create_account(root)
                socket_path = tmp_path_factory.mktemp("agent") / "private" / "agent.sock"
                with Client(server.url, credentials=account.credentials()) as client:
                    agent = Agent(
                        client,
                        AgentSettings(socket=socket_path, approval_wait=0, cache_seconds=0),
                        label="Signery",
                        serial="changes",
                    )
                    with running_in_thread(agent):
                        yield World(server, api, account, keys, socket_path)
        finally:
            server.stop()


@pytest.fixture
def rpc(world: World) -> Iterator[RpcClient]:
    client = RpcClient(world.socket)
    client.initialize()
    yield client
    client.close()


def test_the_server_going_down_mid_session_is_a_device_error_then_works_again(
    world: World, rpc: RpcClient
) -> None:
    session = rpc.open_session()
    key = rpc.private_key(session, world.keys["steady"]["id"])
    rpc.sign_init(session, CKM.ECDSA, key)
    world.server.stop()
    try:
        assert refused(lambda: rpc.sign(session, DIGEST)) is CKR.DEVICE_ERROR
        # The agent still answers what it knows without the server.
        rpc.sign_init(session, CKM.ECDSA, key)
    finally:
        world.server.start()
    signature = rpc.sign(session, DIGEST)  # the same session, the server back
    assert len(signature) == 64


def test_a_key_disabled_while_a_tool_holds_it_signs_no_more(world: World, rpc: RpcClient) -> None:
    key_id = world.keys["disabled"]["id"]
    session = rpc.open_session()
    key = rpc.private_key(session, key_id)
    rpc.sign_init(session, CKM.ECDSA, key)
    world.api.admin_client.signing_keys.disable(key_id)
    try:
        assert refused(lambda: rpc.sign(session, DIGEST)) is CKR.KEY_FUNCTION_NOT_PERMITTED
        # And it is gone from the token at the next search.
        with pytest.raises(AssertionError):
            rpc.private_key(session, key_id)
    finally:
        world.api.admin_client.signing_keys.enable(key_id)
    key = rpc.private_key(session, key_id)
    rpc.sign_init(session, CKM.ECDSA, key)
    assert len(rpc.sign(session, DIGEST)) == 64


def test_a_key_that_requires_approval_is_refused_and_the_log_names_the_request(
    world: World, rpc: RpcClient, caplog: pytest.LogCaptureFixture
) -> None:
    session = rpc.open_session()
    key = rpc.private_key(session, world.keys["approval"]["id"])
    rpc.sign_init(session, CKM.ECDSA, key)
    with caplog.at_level(logging.INFO, logger="signery.agent"):
        assert refused(lambda: rpc.sign(session, DIGEST)) is CKR.FUNCTION_REJECTED
    pending = world.api.admin_client.approvals.list()
    mine = [r for r in pending if r.key_id == world.keys["approval"]["id"]]
    assert len(mine) == 1
    assert mine[0].id in caplog.text


def test_an_agent_that_waits_signs_once_an_approver_approves(world: World) -> None:
    """With --approval-wait the tool's C_Sign waits for the grant: an approver
    approves the request the agent made, and the same call returns the signature."""
    key_id = world.keys["approval"]["id"]
    digest = hashlib.sha256(b"another build").digest()
    failures: list[BaseException] = []

    def approve_when_asked() -> None:
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                for request in world.api.admin_client.approvals.list():
                    if request.key_id == key_id and any(
                        d.digest == digest.hex() for d in request.digests
                    ):
                        world.api.admin_client.approvals.approve(
                            request.id, p.ApprovalDecide(comment="release approved")
                        )
                        return
                time.sleep(0.2)
            raise AssertionError("the agent made no signing request")
        except BaseException as e:
            failures.append(e)

    socket_path = world.socket.parent / "waiting.sock"
    with Client(world.server.url, credentials=world.account.credentials()) as client:
        waiting = Agent(
            client,
            AgentSettings(socket=socket_path, approval_wait=120, cache_seconds=0),
            label="Signery",
            serial="waits",
        )
        with running_in_thread(waiting):
            approver = threading.Thread(target=approve_when_asked)
            approver.start()
            rpc = RpcClient(socket_path)
            try:
                rpc.initialize()
                session = rpc.open_session()
                key = rpc.private_key(session, key_id)
                rpc.sign_init(session, CKM.ECDSA, key)
                signature = rpc.sign(session, digest)
            finally:
                approver.join()
                rpc.close()
    assert not failures, failures
    assert len(signature) == 64
