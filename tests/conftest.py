"""Shared fixtures. Installations are parametrized over SQLite and PostgreSQL:
every test that uses one runs against both databases."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient

from signery.server.app import create_app
from tests.support import (
    Api,
    FakeClock,
    Installation,
    ServerProcess,
    new_installation,
    running_server,
)

BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(scope="module", params=BACKENDS)
def installation(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Installation]:
    data_dir = tmp_path_factory.mktemp(f"signery-{request.param}")
    with new_installation(request.param, data_dir) as inst:
        yield inst


@pytest.fixture(scope="module")
def module_clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def clock(module_clock: FakeClock) -> Iterator[FakeClock]:
    """The in-process app's clock; any time travel is undone after the test."""
    yield module_clock
    module_clock.offset = type(module_clock.offset)(0)


@pytest.fixture(scope="module")
def app_client(installation: Installation, module_clock: FakeClock) -> Iterator[TestClient]:
    app = create_app(installation.settings, clock=module_clock)
    with TestClient(app, base_url="http://signery.test") as client:
        yield client


@pytest.fixture(scope="module")
def api(installation: Installation, app_client: TestClient) -> Api:
    """An in-process server (same code, same database) driven over HTTP semantics."""
    return Api(
        app_client,
        installation.admin_token,
        installation.init.issuer,
        installation.init.root_tsg_id,
    )


@pytest.fixture(scope="module")
def server(installation: Installation) -> Iterator[ServerProcess]:
    with running_server(installation) as proc:
        yield proc


@pytest.fixture(scope="module")
def server_api(installation: Installation, server: ServerProcess) -> Iterator[Api]:
    """A real `signery serve` process over real HTTP."""
    with httpx.Client(base_url=server.url, timeout=30) as http:
        yield Api(
            http, installation.admin_token, installation.init.issuer, installation.init.root_tsg_id
        )
