"""Whatever a caller puts in a request is refused with a problem document, never a 5xx.

Regression tests for issue 12 items 8 and 10: on PostgreSQL a NUL in a name
reached the database and came back as a 500/503, and out-of-range query
parameters (a cursor beyond 64 bits, a date past year 9999 once in UTC, a day
count beyond timedelta) were 500s on both databases.

The route tests enumerate the routes and parameters of the server's own OpenAPI
document, and the body tests every request model, so a route or a model added
later is covered without touching this file.
"""

from __future__ import annotations

import base64
import re
import typing
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from pydantic import BaseModel, ValidationError

from signery import protocol as p
from signery.protocol import JWT_BEARER_GRANT, WireModel
from tests.support import Api, assertion_claims, raw_jwt, refused_once

# NUL (PostgreSQL cannot store it), other C0 controls, ESC (terminal escapes in
# CLI output), DEL, a C1 control (NEL) and a line feed (log lines).
CONTROL_CHARACTERS = ["\x00", "\x01", "\x1b", "\x7f", "\x85", "\n"]

# What a careless or hostile caller sends for any parameter, whatever its type.
HOSTILE_VALUES = [
    "1000000000000",
    "99999999999999999999999999",
    "-99999999999999999999999999",
    "-1",
    "0",
    "9999-12-31T23:59:59-14:00",
    "0001-01-01T00:00:00+14:00",
    "9999-12-31",
    "0001-01-01",
    "1e400",
    "nan",
    "garbage",
    "",
]


@dataclass(frozen=True)
class Param:
    method: str
    path: str  # as in the OpenAPI document: /api/v1/keys/{key}
    name: str
    where: str  # "path" or "query"

    def __str__(self) -> str:
        return f"{self.method} {self.path} {self.where}:{self.name}"

    def url(self, value: str) -> str:
        """The path with this parameter set to ``value`` (others: a plain word)."""
        path = self.path
        for name in re.findall(r"{([^}]+)}", path):
            given = value if self.where == "path" and name == self.name else "x"
            path = path.replace("{" + name + "}", quote(given, safe=""))
        if self.where == "query":
            path += f"?{self.name}={quote(value, safe='')}"
        return path


def operations(api: Api) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(method, path, operation) of every route in the server's OpenAPI document."""
    doc = api.ok(api.http.get("/api/v1/openapi.json"))
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            yield method.upper(), path, operation


def parameters(api: Api, where: str) -> list[Param]:
    return [
        Param(method, path, param["name"], where)
        for method, path, operation in operations(api)
        for param in operation.get("parameters", [])
        if param["in"] == where
    ]


def call(api: Api, method: str, url: str) -> httpx.Response | str:
    """The response, or what the in-process server raised instead of answering."""
    try:
        return api.http.request(
            method,
            url,
            headers=api.admin,
            json={} if method in ("POST", "PUT", "PATCH") else None,
        )
    except Exception as e:  # the TestClient re-raises what the app did not handle
        return f"raised {type(e).__name__}: {e}"


def refusal(response: httpx.Response | str) -> str | None:
    """None if the response is a proper refusal (400 or 404, problem+json with a
    code), otherwise what is wrong with it."""
    if isinstance(response, str):
        return response
    if response.status_code not in (400, 404):
        return f"{response.status_code} {response.text[:160]}"
    if not response.headers.get("content-type", "").startswith("application/problem+json"):
        return f"{response.status_code} without a problem document: {response.text[:160]}"
    if not response.json().get("code"):
        return f"{response.status_code} problem without a code: {response.text[:160]}"
    return None


def no_server_error(response: httpx.Response | str) -> str | None:
    if isinstance(response, str):
        return response
    if response.status_code >= 500:
        return f"{response.status_code} {response.text[:160]}"
    if response.status_code >= 400 and not response.json().get("code"):
        return f"{response.status_code} problem without a code: {response.text[:160]}"
    return None


# ------------------------------------------------------------------ control characters


def test_every_route_has_parameters_to_try(api: Api) -> None:
    # The enumeration below is only as good as what it finds.
    assert len(parameters(api, "path")) > 20
    assert len(parameters(api, "query")) > 20


@pytest.mark.parametrize("char", CONTROL_CHARACTERS, ids=repr)
def test_a_control_character_in_any_path_parameter_is_refused(api: Api, char: str) -> None:
    failures = []
    for param in parameters(api, "path"):
        problem = refusal(call(api, param.method, param.url(f"a{char}b")))
        if problem is not None:
            failures.append(f"{param}: {problem}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("char", CONTROL_CHARACTERS, ids=repr)
def test_a_control_character_in_any_query_parameter_is_refused(api: Api, char: str) -> None:
    failures = []
    for param in parameters(api, "query"):
        problem = refusal(call(api, param.method, param.url(f"a{char}b")))
        if problem is not None:
            failures.append(f"{param}: {problem}")
    assert not failures, "\n".join(failures)


def test_the_edge_names_what_it_refused(api: Api) -> None:
    for url in ("/api/v1/keys/a%00b", "/api/v1/keys?tsg_id=%1b"):
        r = api.http.get(url, headers=api.admin)
        assert r.status_code == 400, r.text
        assert r.json()["code"] == "control_characters"


def test_a_refusal_at_the_edge_is_audited_once_as_the_caller(api: Api) -> None:
    seq = api.last_seq()
    with refused_once(api, reason="control_characters", kind="request.refused"):
        r = api.http.get("/api/v1/keys/a%00b", headers=api.admin)
        assert r.status_code == 400, r.text
    (event,) = api.events_after(seq)
    assert event["principal"]["name"] == "admin"
    assert event["details"]["path"] == "/api/v1/keys/a\x00b"  # as JSON text: \u0000


def test_a_key_name_encoded_twice_is_not_decoded_twice(server_api: Api) -> None:
    # The sign route decoded its path a second time: %2500 became a NUL there.
    # (A real server: the TestClient itself decodes paths twice.)
    api = server_api
    token = api.access_token(api.create_account(api.create_tsg()["id"]))
    r = api.sign(token, "a%2500b", b"\0" * 32)
    assert r.status_code == 404, r.text
    assert r.json()["code"] == "key_not_found"


def test_a_tsg_name_with_a_nul_is_refused(api: Api) -> None:
    for name in ("a\x00b", "a\x1b[31mb", "line\nbreak", "\ud800"):
        r = api.http.post(
            "/api/v1/tsgs",
            content=f'{{"name": {_json_string(name)}}}',
            headers={**api.admin, "Content-Type": "application/json"},
        )
        assert r.status_code == 400, r.text
        assert r.json()["code"] == "validation_failed"


def _json_string(value: str) -> str:
    """JSON text for a string, escaping every non-ASCII code point (lone surrogates too)."""
    return (
        '"'
        + "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else f"\\u{ord(c):04x}" for c in value)
        + '"'
    )


def test_a_basic_username_with_a_control_character_is_an_unknown_user(api: Api) -> None:
    for username in (b"ad\x00min", b"ad\x1bmin"):
        credentials = base64.b64encode(username + b":correct horse battery").decode()
        r = api.http.post(
            "/api/v1/users/me/tokens",
            json={"name": "t"},
            headers={"Authorization": f"Basic {credentials}"},
        )
        assert r.status_code == 401, r.text
        assert r.json()["code"] == "invalid_credentials"


def test_an_assertion_from_a_client_id_with_a_nul_is_an_unknown_client(api: Api) -> None:
    claims = assertion_claims("x\x00y", api.issuer)
    assertion = raw_jwt({"alg": "ES256", "typ": "JWT"}, claims, b"s" * 64)
    r = api.http.post(
        "/api/v1/oauth/token", data={"grant_type": JWT_BEARER_GRANT, "assertion": assertion}
    )
    assert r.status_code == 400, r.text
    assert r.json()["code"] == "unknown_client"


def test_a_signed_assertion_whose_jti_has_a_nul_is_refused(api: Api) -> None:
    account = api.create_account(api.create_tsg()["id"])
    key = serialization.load_pem_private_key(account.private_key_pem.encode(), None)
    claims = assertion_claims(account.client_id, api.issuer, jti=f"{uuid.uuid4()}\x00")
    assertion = jwt.encode(claims, key, algorithm="ES256")  # type: ignore[arg-type]
    r = api.http.post(
        "/api/v1/oauth/token", data={"grant_type": JWT_BEARER_GRANT, "assertion": assertion}
    )
    assert r.status_code == 400, r.text
    assert r.json()["code"] == "assertion_claims_invalid"


# ------------------------------------------------------------------ request bodies


def wire_models() -> list[type[WireModel]]:
    found: list[type[WireModel]] = []
    todo: list[type[WireModel]] = [WireModel]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            found.append(sub)
            todo.append(sub)
    return sorted(found, key=lambda c: c.__name__)


# A valid value for each required field of a request model, by field name.
REQUIRED_EXAMPLES: dict[str, object] = {
    "pid": 1,
    "name": "n",
    "username": "u",
    "public_key_pem": "-----BEGIN PUBLIC KEY-----",
    "kind": "csr",
    "roots_pem": "-----BEGIN CERTIFICATE-----",
    "subject": {},
    "chain_pem": "-----BEGIN CERTIFICATE-----",
    "url": "https://ca.example/.well-known/est",
    "algorithm": "EC_P256",
    "key": "k",
    "account": "a",
    "principal_id": "p",
    "role": "auditor",
    "tsg_id": "1234567890",
    "digest": "AAAA",
    "digest_algorithm": "sha256",
    "scheme": "ecdsa",
    "scope": "any_digest",
}
# Where one model takes a field in another shape than the others.
MODEL_EXAMPLES: dict[str, dict[str, object]] = {
    "DigestToSign": {"digest": "ab" * 32},  # hex, where a signing request sends base64
}


def text_fields(model: type[BaseModel]) -> Iterator[tuple[str, object]]:
    """(field, a value with a NUL in the right shape) for each field holding text.
    Fields marked ENCODED are parsed strictly by their own decoder, which refuses
    a NUL with its own code (a digest: tests/e2e/test_refusals.py)."""
    for name, info in model.model_fields.items():
        if p.ENCODED in info.metadata:
            continue
        args = typing.get_args(info.annotation) or (info.annotation,)
        if str in args:
            yield name, "a\x00"
        elif any(typing.get_origin(a) is list and typing.get_args(a) == (str,) for a in args):
            yield name, ["a\x00"]


def body_models(schema: dict[str, Any]) -> Iterator[str]:
    """The names of the models a request body schema stands for."""
    if "$ref" in schema:
        yield schema["$ref"].rsplit("/", 1)[-1]
    elif "anyOf" in schema:
        for option in schema["anyOf"]:
            yield from body_models(option)
    elif schema.get("type") != "null":
        yield schema.get("title", f"an untitled schema {schema}")


def test_every_json_request_body_is_a_wire_model(api: Api) -> None:
    # The refusal of control characters is a rule of WireModel: a body of any
    # other kind would not have it.
    bodies = set()
    for _, _, operation in operations(api):
        content = operation.get("requestBody", {}).get("content", {})
        if "application/json" in content:
            bodies.update(body_models(content["application/json"]["schema"]))
    assert len(bodies) > 15
    assert [b for b in sorted(bodies) if not issubclass(getattr(p, b, object), WireModel)] == []


@pytest.mark.parametrize("model", wire_models(), ids=lambda m: m.__name__)
def test_no_text_field_of_a_request_takes_a_nul(model: type[WireModel]) -> None:
    required = [n for n, f in model.model_fields.items() if f.is_required()]
    assert set(required) <= set(REQUIRED_EXAMPLES), "add an example for the new field"
    examples = {**REQUIRED_EXAMPLES, **MODEL_EXAMPLES.get(model.__name__, {})}
    valid = {n: examples[n] for n in required}
    model.model_validate(valid)
    accepted = []
    for name, value in text_fields(model):
        try:
            model.model_validate({**valid, name: value})
        except ValidationError as e:
            if any(error["loc"][0] == name for error in e.errors()):
                continue
        accepted.append(name)
    assert accepted == []


def test_names_take_no_line_breaks_but_pem_and_comments_do() -> None:
    with pytest.raises(ValidationError):
        p.TsgCreate(name="a\nb")
    with pytest.raises(ValidationError):
        p.KeySubject(common_name="a\tb")
    assert p.AccountKeyAdd(public_key_pem="-----BEGIN\r\nx\n-----END\n").public_key_pem
    assert p.ApprovalDecide(comment="line one\n\tline two").comment


# ------------------------------------------------------------------ ranges


@pytest.mark.parametrize("value", HOSTILE_VALUES)
def test_no_query_parameter_value_is_a_server_error(api: Api, value: str) -> None:
    failures = []
    for param in parameters(api, "query"):
        problem = no_server_error(call(api, param.method, param.url(value)))
        if problem is not None:
            failures.append(f"{param}: {problem}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("value", HOSTILE_VALUES)
def test_no_path_parameter_value_is_a_server_error(api: Api, value: str) -> None:
    failures = []
    for param in parameters(api, "path"):
        if not value:
            continue  # an empty segment is another route (or none)
        problem = no_server_error(call(api, param.method, param.url(value)))
        if problem is not None:
            failures.append(f"{param}: {problem}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("/api/v1/keys?expiring_within_days=1000000000000", "validation_failed"),
        ("/api/v1/audit/events?cursor=99999999999999999999999999", "invalid_request"),
        ("/api/v1/audit/events?cursor=9" + "9" * 5000, "invalid_request"),
        ("/api/v1/audit/events?until=9999-12-31T23%3A59%3A59-14%3A00", "validation_failed"),
        ("/api/v1/audit/events?since=0001-01-01T00%3A00%3A00%2B14%3A00", "validation_failed"),
        ("/api/v1/audit/events?limit=99999999999999999999", "validation_failed"),
    ],
)
def test_out_of_range_values_are_refused_as_invalid(api: Api, url: str, code: str) -> None:
    r = api.http.get(url, headers=api.admin)
    assert r.status_code == 400, r.text
    assert r.json()["code"] == code


def test_a_query_time_without_an_offset_is_taken_as_utc(api: Api) -> None:
    # It reached the database naive and was refused there: a 500.
    def events(**params: str) -> list[dict[str, Any]]:
        page = api.ok(api.http.get("/api/v1/audit/events", params=params, headers=api.admin))
        return page["events"]  # type: ignore[no-any-return]

    assert events(since="2000-01-01", limit="1")
    assert events(since="2000-01-01T00:00:00", limit="1")
    assert events(since="2999-01-01T00:00:00") == []
    assert events(until="2000-01-01") == []
