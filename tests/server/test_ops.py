"""Operations: health, readiness, metrics, OpenAPI, problem documents, request ids."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from signery.errors import ConfigurationError
from signery.server.app import create_app
from signery.server.config import load_settings
from tests.support import Api, Installation


def test_health_and_readiness(api: Api) -> None:
    assert api.ok(api.http.get("/healthz")) == {"status": "ok", "checks": {}}
    ready = api.ok(api.http.get("/readyz"))
    assert ready["status"] == "ok"
    assert ready["checks"] == {"database": "ok", "keystore:builtin": "ok", "audit_writer": "ok"}


SCRAPE_TOKEN = "scrape-" + "0123456789abcdef" * 3


def user_with_role(api: Api, tsg_id: str, role: str) -> dict[str, str]:
    """A user bound to ``role`` at ``tsg_id``, with an API token made by the admin."""
    user = api.ok(
        api.http.post(
            "/api/v1/users",
            json={"username": api.unique("user"), "tsg_id": tsg_id},
            headers=api.admin,
        ),
        201,
    )
    api.ok(
        api.http.post(
            "/api/v1/role-bindings",
            json={"principal_id": user["id"], "role": role, "tsg_id": tsg_id},
            headers=api.admin,
        ),
        201,
    )
    token = api.ok(
        api.http.post(f"/api/v1/users/{user['id']}/tokens", json={"name": "t"}, headers=api.admin),
        201,
    )
    return {"Authorization": f"Bearer {token['token']}"}


@pytest.fixture(scope="module")
def scraped(installation: Installation) -> Iterator[Api]:
    """A server with a scrape token."""
    settings = installation.settings.model_copy(update={"metrics_token": SecretStr(SCRAPE_TOKEN)})
    with TestClient(create_app(settings), base_url="http://signery.test") as client:
        yield Api(
            client,
            installation.admin_token,
            installation.init.issuer,
            installation.init.root_tsg_id,
        )


def test_metrics_count_requests_and_signings(scraped: Api) -> None:
    api = scraped
    tsg = api.create_tsg()
    key = api.create_key(tsg["id"], "EC_P256", ca="none")
    token = api.access_token(api.create_account(tsg["id"]))
    api.ok(api.sign(token, key["name"], hashlib.sha256(b"m").digest()))
    api.sign(token, key["name"], b"bad")
    text = api.http.get("/metrics", headers={"Authorization": f"Bearer {SCRAPE_TOKEN}"}).text
    assert 'signery_signings_total{outcome="succeeded"} 1.0' in text
    assert 'signery_signings_total{outcome="invalid"} 1.0' in text
    assert (
        'signery_http_requests_total{method="POST",route="/api/v1/signing/keys/{key}/sign",status="200"}'
        in text
    )
    assert "signery_signing_duration_seconds_bucket" in text
    assert "signery_http_request_duration_seconds_bucket" in text


def test_metrics_answer_only_the_scrape_token_or_a_root_auditor(scraped: Api) -> None:
    """Regression: /metrics was anonymous and listed every tenant's key ids and names."""
    api = scraped
    tsg = api.create_tsg()
    key = api.create_key(tsg["id"], "EC_P256", ca="none", name=api.unique("tenant-secret"))
    token = api.access_token(api.create_account(tsg["id"]))
    api.ok(api.sign(token, key["name"], hashlib.sha256(b"m").digest()))

    anonymous = api.http.get("/metrics")
    assert anonymous.status_code == 401
    assert anonymous.json()["code"] == "unauthenticated"
    wrong = api.http.get("/metrics", headers={"Authorization": f"Bearer {SCRAPE_TOKEN}x"})
    assert wrong.status_code == 401
    # Signing-plane and subtree credentials are not enough: the counts are the
    # whole installation's.
    assert api.http.get("/metrics", headers={"Authorization": f"Bearer {token}"}).status_code == 403
    subtree_auditor = user_with_role(api, tsg["id"], "auditor")
    refused = api.http.get("/metrics", headers=subtree_auditor)
    assert refused.status_code == 403
    assert refused.json()["code"] == "permission_denied"
    assert (
        api.http.get("/metrics", headers=user_with_role(api, tsg["id"], "superuser")).status_code
        == 403
    )

    for headers in (
        {"Authorization": f"Bearer {SCRAPE_TOKEN}"},
        user_with_role(api, api.root_tsg_id, "auditor"),
        api.admin,
    ):
        r = api.http.get("/metrics", headers=headers)
        assert r.status_code == 200, r.text
        assert "signery_signings_total" in r.text
        assert key["name"] not in r.text
        assert key["id"] not in r.text
        assert "key_name" not in r.text
        assert "key_id" not in r.text


def test_a_client_chosen_method_is_not_a_metric_label(scraped: Api) -> None:
    """Every label value is a series: a method the client made up counts as "other"."""
    for n in range(3):
        scraped.http.request(f"BREW{n}", "/healthz")
    text = scraped.http.get("/metrics", headers={"Authorization": f"Bearer {SCRAPE_TOKEN}"}).text
    assert "BREW" not in text
    assert 'method="other"' in text


def test_a_short_or_exposed_scrape_token_is_refused_at_start(
    installation: Installation, tmp_path: Path
) -> None:
    short = installation.settings.model_copy(update={"metrics_token": SecretStr("too-short")})
    with pytest.raises(ConfigurationError, match="at least 32 characters"):
        create_app(short)
    token_file = tmp_path / "metrics.token"
    token_file.write_text(SCRAPE_TOKEN + "\n")
    token_file.chmod(0o644)
    exposed = installation.settings.model_copy(update={"metrics_token_file": token_file})
    with pytest.raises(ConfigurationError, match="chmod 600"):
        create_app(exposed)
    with pytest.raises(ConfigurationError, match="not both"):
        load_settings(data_dir=tmp_path, metrics_token=SCRAPE_TOKEN, metrics_token_file=token_file)
    token_file.chmod(0o600)
    app = create_app(installation.settings.model_copy(update={"metrics_token_file": token_file}))
    with TestClient(app, base_url="http://signery.test") as client:
        # The file's trailing newline is not part of the token.
        r = client.get("/metrics", headers={"Authorization": f"Bearer {SCRAPE_TOKEN}"})
        assert r.status_code == 200


def test_openapi_document(api: Api) -> None:
    doc = api.ok(api.http.get("/api/v1/openapi.json"))
    paths = doc["paths"]
    for path in (
        "/api/v1/oauth/token",
        "/api/v1/signing/keys/{key}/sign",
        "/api/v1/keys",
        "/api/v1/tsgs",
        "/api/v1/audit/events",
    ):
        assert path in paths, path
    sign_body = paths["/api/v1/signing/keys/{key}/sign"]["post"]["requestBody"]["content"][
        "application/json"
    ]["schema"]
    assert set(sign_body["required"]) == {"digest", "digest_algorithm", "scheme"}
    token_body = paths["/api/v1/oauth/token"]["post"]["requestBody"]["content"]
    assert "application/x-www-form-urlencoded" in token_body


def test_unknown_routes_answer_problem_json(api: Api) -> None:
    r = api.http.get("/api/v1/nothing-here")
    assert r.status_code == 404
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["code"] == "not_found"
    r = api.http.delete("/api/v1/tsgs", headers=api.admin)
    assert r.status_code == 405
    assert r.json()["code"] == "method_not_allowed"


def test_request_ids(api: Api) -> None:
    generated = api.http.get("/healthz").headers["x-request-id"]
    assert len(generated) == 32
    assert (
        api.http.get("/healthz", headers={"X-Request-ID": "ci-42"}).headers["x-request-id"]
        == "ci-42"
    )
    forged = api.http.get(
        "/healthz", headers={"X-Request-ID": "bad id\nINFO fake log line"}
    ).headers["x-request-id"]
    assert "\n" not in forged
    assert forged != "bad id\nINFO fake log line"
    problem = api.http.get("/api/v1/keys").json()
    assert problem["request_id"]


def test_oversize_management_body(api: Api) -> None:
    r = api.http.post(
        "/api/v1/tsgs",
        content=b"{" + b" " * (2 * 1024 * 1024) + b"}",
        headers={**api.admin, "Content-Type": "application/json"},
    )
    assert r.status_code == 413
    assert r.json()["code"] == "request_too_large"


def test_malformed_management_json(api: Api) -> None:
    r = api.http.post(
        "/api/v1/tsgs", content=b"{nope", headers={**api.admin, "Content-Type": "application/json"}
    )
    assert r.status_code == 400
    assert r.json()["code"] == "malformed_json"
