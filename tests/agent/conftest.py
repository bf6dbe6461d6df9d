"""A real server, an account with an RSA and an EC key, and the agent serving
that account's token on a private socket: what every tool test talks to."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from signery.agent import (
    P11_KIT_CLIENT,
    Agent,
    AgentSettings,
    running_in_thread,
    server_address,
)
from signery.client import Client
from tests.support import (
    Account,
    Api,
    Installation,
    missing,
    new_installation,
    running_server,
)


@dataclass
class Served:
    api: Api
    account: Account
    keys: dict[str, dict[str, Any]]  # by algorithm: the created key
    bare: dict[str, Any]  # an EC key without a certificate
    agent: Agent
    socket: Path
    url: str

    def env(self) -> dict[str, str]:
        return {**os.environ, "P11_KIT_SERVER_ADDRESS": server_address(self.socket)}

    def cli_env(self, home: Path) -> dict[str, str]:
        """What a build machine's job sets for ``signery agent``/``exec``: the
        account from SIGNERY_*, nothing else of the developer's environment."""
        key_file = home / "account.pem"
        if not key_file.exists():
            key_file.write_text(self.account.private_key_pem)
            key_file.chmod(0o600)
        return {
            "PATH": os.environ["PATH"],
            "HOME": str(home),
            "SIGNERY_HOME": str(home / ".signery"),
            "SIGNERY_SERVER": self.url,
            "SIGNERY_CLIENT_ID": self.account.client_id,
            "SIGNERY_KEY_FILE": str(key_file),
            "NO_COLOR": "1",
        }


@pytest.fixture(scope="module")
def installation_sqlite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installation]:
    with new_installation("sqlite", tmp_path_factory.mktemp("agent-server")) as inst:
        yield inst


@pytest.fixture(scope="module")
def served(
    installation_sqlite: Installation, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    if not P11_KIT_CLIENT.exists():
        missing("p11-kit-client.so (apt-get install p11-kit-modules)")
    with (
        running_server(installation_sqlite) as server,
        httpx.Client(base_url=server.url, timeout=30) as http,
    ):
        inst = installation_sqlite
        api = Api(http, inst.admin_token, inst.init.issuer, inst.init.root_tsg_id)
        root = inst.init.root_tsg_id
        keys = {
            algorithm: api.create_key(
                root, algorithm, subject={"common_name": f"Agent {algorithm}"}
            )
            for algorithm in ("RSA_3072", "EC_P256")
        }
        bare = api.create_key(root, "EC_P256", ca="none")
        account = api.create_account(root)
        socket = tmp_path_factory.mktemp("agent-socket") / "private" / "agent.sock"
        client = Client(server.url, credentials=account.credentials())
        agent = Agent(
            client, AgentSettings(socket=socket), label=account.name, serial=account.client_id
        )
        with running_in_thread(agent):
            yield Served(api, account, keys, bare, agent, socket, server.url)
        client.close()
