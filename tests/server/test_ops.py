"""Operations: health, readiness, metrics, OpenAPI, problem documents, request ids."""

from __future__ import annotations

import hashlib

from tests.support import Api


def test_health_and_readiness(api: Api) -> None:
    assert api.ok(api.http.get("/healthz")) == {"status": "ok", "checks": {}}
    ready = api.ok(api.http.get("/readyz"))
    assert ready["status"] == "ok"
    assert ready["checks"] == {"database": "ok", "keystore:builtin": "ok", "audit_writer": "ok"}


def test_metrics_count_requests_and_signings(api: Api) -> None:
    tsg = api.create_tsg()
    key = api.create_key(tsg["id"], "EC_P256", ca="none")
    token = api.access_token(api.create_account(tsg["id"]))
    api.ok(api.sign(token, key["name"], hashlib.sha256(b"m").digest()))
    api.sign(token, key["name"], b"bad")
    text = api.http.get("/metrics").text
    labels = f'key_id="{key["id"]}",key_name="{key["name"]}"'
    assert f'signery_signings_total{{{labels},outcome="succeeded"}} 1.0' in text
    assert f'signery_signings_total{{{labels},outcome="invalid"}} 1.0' in text
    assert (
        'signery_http_requests_total{method="POST",route="/api/v1/signing/keys/{key}/sign",status="200"}'
        in text
    )
    assert "signery_signing_duration_seconds_bucket" in text
    assert "signery_http_request_duration_seconds_bucket" in text


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
