"""The error vocabulary: stable, unique codes; one HTTP status per kind; and the
client rebuilds the server's error class from a problem document."""

from __future__ import annotations

import ast
import importlib
import json
import pkgutil
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

import signery
import signery.client
import signery.server.app
from signery.errors import (
    AssertionReplayed,
    DigestLengthMismatch,
    ErrorKind,
    InvalidGrant,
    KeyDisabled,
    KeyMaterialMissing,
    SigneryError,
    error_from_problem,
)
from signery.server.http.problems import STATUS_BY_KIND, problem_response

# Codes that two classes may share on purpose. There are none: the client maps a
# code to exactly one class, so a shared code would rebuild the wrong one.
INTENTIONAL_DUPLICATES: dict[str, set[str]] = {}
CODE_SHAPE = re.compile(r"[a-z][a-z0-9]*(_[a-z0-9]+)*")


def import_every_module() -> None:
    """Load every module of the package so that every SigneryError subclass exists."""
    for module in pkgutil.walk_packages(signery.__path__, "signery."):
        importlib.import_module(module.name)


def all_error_classes() -> list[type[SigneryError]]:
    import_every_module()
    seen: list[type[SigneryError]] = []
    stack: list[type[SigneryError]] = [SigneryError]
    while stack:
        cls = stack.pop()
        if cls not in seen:
            seen.append(cls)
            stack.extend(cls.__subclasses__())
    # Test modules may define their own subclasses; only the product's count.
    return sorted(
        (c for c in seen if c.__module__.split(".")[0] == "signery"), key=lambda c: c.__qualname__
    )


ERROR_CLASSES = all_error_classes()


def test_the_walk_finds_errors_of_every_part_of_the_product() -> None:
    modules = {c.__module__ for c in ERROR_CLASSES}
    # errors.py, and the client's local errors defined next to the code that raises them.
    assert {"signery.errors", "signery.formats", "signery.client._client"} <= modules
    assert len(ERROR_CLASSES) > 50


def test_no_error_class_is_defined_in_a_server_or_key_store_module() -> None:
    """What the server raises is shared vocabulary: a class defined in a module the
    client does not import would reach a build machine as a generic error."""
    assert [
        f"{c.__module__}.{c.__qualname__}"
        for c in ERROR_CLASSES
        if c.__module__.startswith(("signery.server", "signery.keystores"))
    ] == []


def test_every_error_code_is_unique() -> None:
    by_code: dict[str, set[str]] = defaultdict(set)
    for cls in ERROR_CLASSES:
        by_code[cls.code].add(f"{cls.__module__}.{cls.__qualname__}")

    duplicates = {code: names for code, names in by_code.items() if len(names) > 1}
    assert duplicates == INTENTIONAL_DUPLICATES


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__qualname__)
def test_every_error_declares_its_own_code_title_and_kind(cls: type[SigneryError]) -> None:
    # A subclass that inherits its parent's code would be indistinguishable on the wire.
    assert "code" in cls.__dict__
    assert CODE_SHAPE.fullmatch(cls.code)
    assert cls.title
    assert isinstance(cls.kind, ErrorKind)


def test_every_kind_has_an_http_status() -> None:
    assert set(STATUS_BY_KIND) == set(ErrorKind)
    for kind, status in STATUS_BY_KIND.items():
        assert 400 <= status <= 599, kind
    assert STATUS_BY_KIND[ErrorKind.INTERNAL] == 500
    assert STATUS_BY_KIND[ErrorKind.UNAVAILABLE] == 503


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        ("digest_length_mismatch", DigestLengthMismatch),
        ("key_disabled", KeyDisabled),
        ("assertion_replayed", AssertionReplayed),
        ("invalid_grant", InvalidGrant),
        ("key_material_missing", KeyMaterialMissing),
    ],
)
def test_error_from_problem_rebuilds_the_class(code: str, cls: type[SigneryError]) -> None:
    problem = {
        "type": "about:blank",
        "title": cls.title,
        "status": STATUS_BY_KIND[cls.kind],
        "detail": f"the server said {code}",
        "code": code,
        "request_id": "req-1",
    }

    err = error_from_problem(problem)

    assert type(err) is cls
    assert err.code == code
    assert err.detail == f"the server said {code}"
    assert err.extra["request_id"] == "req-1"
    assert err.extra["status"] == STATUS_BY_KIND[cls.kind]


def test_error_from_problem_finds_classes_defined_outside_errors_py() -> None:
    for cls in ERROR_CLASSES:
        if cls.__module__ != "signery.errors":
            assert type(error_from_problem({"code": cls.code, "detail": "x"})) is cls


def test_an_unknown_code_stays_a_signery_error_with_its_code() -> None:
    err = error_from_problem(
        {"title": "Teapot", "status": 418, "detail": "short and stout", "code": "teapot_refused"}
    )

    assert type(err) is SigneryError
    assert err.code == "teapot_refused"
    assert err.detail == "short and stout"
    assert err.extra["status"] == 418


def test_a_problem_without_a_code_or_detail_is_still_an_error() -> None:
    err = error_from_problem({"title": "Bad Gateway", "status": 502})

    assert type(err) is SigneryError
    assert err.code == "internal_error"
    assert err.detail == "Bad Gateway"


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__qualname__)
def test_every_error_survives_the_trip_from_server_to_client(cls: type[SigneryError]) -> None:
    """The server's problem+json rendering, read back by the client, gives the
    same class, code and detail (the HTTP layer in between adds nothing)."""
    sent = cls("something specific happened", hint="try again")
    response = problem_response(sent, request_id="req-2", path="/api/v1/anything")
    body = json.loads(bytes(response.body))

    received = error_from_problem(body)

    assert response.status_code == STATUS_BY_KIND[cls.kind]
    assert type(received) is cls
    assert received.code == sent.code
    assert received.detail == "something specific happened"
    assert received.extra["hint"] == "try again"
    assert received.extra["request_id"] == "req-2"


# ------------------------------------------------------------------ the client knows the server

# Run in fresh interpreters, so that what one side imports cannot help the other:
# the server's vocabulary is every SigneryError subclass that exists once every
# module of the server and of the key stores is loaded; the client's is what a
# process that imports only signery.client makes of each code.
SERVER_VOCABULARY = """
import importlib, json, pkgutil, sys
import signery.keystores, signery.server, signery.server.app
from signery.errors import SigneryError
for package in (signery.server, signery.keystores):
    for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        importlib.import_module(module.name)
assert not any(m.startswith(("signery.client", "signery.formats")) for m in sys.modules)
found, stack = {}, [SigneryError]
while stack:
    cls = stack.pop()
    stack.extend(cls.__subclasses__())
    found[cls.__dict__.get("code", cls.code)] = [cls.__qualname__, cls.kind.value]
print(json.dumps(found))
"""
CLIENT_MAPPING = """
import json, sys
import signery.client
from signery.errors import error_from_problem
leaked = sorted(m for m in sys.modules if m.startswith(("signery.server", "signery.keystores")))
assert not leaked, leaked
mapped = {}
for code in json.load(sys.stdin):
    error = error_from_problem({"code": code, "detail": "from the server"})
    mapped[code] = [type(error).__qualname__, error.kind.value]
print(json.dumps(mapped))
"""
SERVER_SOURCES = [
    Path(signery.__file__).parent / "server",
    Path(signery.__file__).parent / "keystores",
]


def _python(program: str, stdin: str = "") -> Any:
    result = subprocess.run(
        [sys.executable, "-c", program],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def literal_codes(source: str) -> set[str]:
    """Error codes written as string literals instead of classes: assigned to a
    ``.code`` attribute (possibly through a dict lookup), passed as ``code=``, or
    put in a ``{"code": ...}`` document."""
    found: set[str] = set()

    def strings(node: ast.AST) -> set[str]:
        return {
            n.value
            for n in ast.walk(node)
            if isinstance(n, ast.Constant) and isinstance(n.value, str)
        }

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Attribute) and t.attr == "code" for t in node.targets
        ):
            found |= strings(node.value)
        elif isinstance(node, ast.keyword) and node.arg == "code":
            found |= strings(node.value) if isinstance(node.value, ast.Constant) else set()
        elif isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if isinstance(key, ast.Constant) and key.value == "code":
                    found |= strings(value) if isinstance(value, ast.Constant) else set()
    return found


def test_literal_codes_are_found() -> None:
    """The scan below sees each way a code can be written without a class."""
    source = (
        'e.code = {404: "a_code", 405: "b_code"}.get(s, "c_code")\n'
        'Problem(code="d_code")\n'
        'x = {"code": "e_code", "detail": "not a code"}\n'
    )
    assert literal_codes(source) == {"a_code", "b_code", "c_code", "d_code", "e_code"}


def test_a_process_that_imports_only_the_client_knows_every_code_the_server_answers_with() -> None:
    """Regression: 19 codes were defined in server and key-store modules, so a
    build machine turned e.g. ``digest_not_allowed`` into a generic internal error.
    Every error class the server can raise, and every code it writes as a literal,
    is mapped by the client package alone to the same class and kind."""
    server: dict[str, list[str]] = _python(SERVER_VOCABULARY)
    literals = set().union(
        *(literal_codes(f.read_text()) for root in SERVER_SOURCES for f in root.rglob("*.py"))
    )
    assert len(server) > 100
    client: dict[str, list[str]] = _python(CLIENT_MAPPING, json.dumps(sorted({*server, *literals})))

    unknown = {
        code: f"server: {server[code][0]} ({server[code][1]}); client: {client[code][0]} "
        f"({client[code][1]})"
        for code in server
        if client[code] != server[code]
    }
    assert unknown == {}
    unmapped_literals = {code for code in literals if client[code][0] == "SigneryError"}
    assert unmapped_literals <= {"internal_error"}
