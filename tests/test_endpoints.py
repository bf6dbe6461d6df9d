"""signery.endpoints: every path the client uses is a route the server serves, and a
value filled into a path stays inside its segment."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from signery import endpoints
from signery.endpoints import Endpoint
from signery.errors import ClientError
from tests.server.test_authorization_matrix import app_routes


def test_every_endpoint_is_a_route_of_the_server(app_client: TestClient) -> None:
    routes = app_routes(app_client.app)
    named = {(e.method, e.template) for e in endpoints.all_endpoints().values()}
    assert sorted(named - routes) == [], "endpoints the server does not serve"


def test_every_endpoint_is_named_once() -> None:
    named = [(e.method, e.template) for e in endpoints.all_endpoints().values()]
    assert len(named) == len(set(named))


def test_a_value_stays_inside_its_segment() -> None:
    path = endpoints.KEY_GET.path(key="a/b?c#d%e f")
    assert path == "/api/v1/keys/a%2Fb%3Fc%23d%25e%20f"
    two = endpoints.ACCOUNT_KEY_REMOVE.path(account="x/y", key_id="..z")
    assert two == "/api/v1/accounts/x%2Fy/keys/..z"


@pytest.mark.parametrize("value", [".", ".."])
def test_a_dot_segment_is_refused(value: str) -> None:
    # An HTTP client resolves /keys/.. into /: another route.
    with pytest.raises(ClientError, match="invalid key"):
        endpoints.KEY_GET.path(key=value)


def test_parameters_must_match_the_template() -> None:
    assert endpoints.ACCOUNT_KEY_REMOVE.parameters == ("account", "key_id")
    with pytest.raises(TypeError):
        endpoints.KEY_GET.path()
    with pytest.raises(TypeError):
        endpoints.KEY_GET.path(key="k", tsg_id="t")
    assert Endpoint("GET", "/x").path() == "/x"
