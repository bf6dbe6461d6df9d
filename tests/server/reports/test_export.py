"""GET /api/v1/audit/export: every field of every event round-trips through JSON
lines and CSV; client strings cannot forge a line, a row or a spreadsheet formula.
SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime
from typing import Any

import pytest

from tests.server.audit.bulk import HOSTILE, insert_events
from tests.support import Api, Installation

START = datetime(2097, 3, 1, tzinfo=UTC)
COUNT = 300
WINDOW = {"since": START.isoformat(), "until": datetime(2097, 3, 2, tzinfo=UTC).isoformat()}


@pytest.fixture(scope="module")
def expected(api: Api, installation: Installation) -> list[dict[str, Any]]:
    insert_events(installation, START, COUNT)
    events: list[dict[str, Any]] = []
    cursor = None
    while True:
        page = api.ok(
            api.http.get(
                "/api/v1/audit/events",
                params={**WINDOW, "limit": 100, **({"cursor": cursor} if cursor else {})},
                headers=api.admin,
            )
        )
        events += page["events"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(events) == COUNT
    return events


def export(api: Api, fmt: str) -> tuple[str, str]:
    r = api.http.get("/api/v1/audit/export", params={**WINDOW, "format": fmt}, headers=api.admin)
    assert r.status_code == 200, r.text
    return r.headers["content-type"], r.text


def test_jsonl_round_trips_every_event_one_line_each(
    api: Api, expected: list[dict[str, Any]]
) -> None:
    content_type, text = export(api, "jsonl")
    assert content_type.startswith("application/jsonl")
    # str.splitlines also splits at U+2028 and \r: escaping keeps every event on one line.
    lines = text.splitlines()
    assert len(lines) == COUNT
    assert text.isascii()
    assert [json.loads(line) for line in lines] == expected


def undo_defusing(cell: str) -> str:
    return cell[1:] if cell.startswith("'") else cell


def test_csv_round_trips_every_event_and_defuses_formulas(
    api: Api, expected: list[dict[str, Any]]
) -> None:
    content_type, text = export(api, "csv")
    assert content_type.startswith("text/csv")
    rows = list(csv.reader(io.StringIO(text, newline="")))
    header, body = rows[0], rows[1:]
    assert len(body) == COUNT
    for row, event in zip(body, expected, strict=True):
        assert len(row) == len(header)
        # No cell a spreadsheet would evaluate.
        assert not [c for c in row if c[:1] in ("=", "+", "-", "@", "\t", "\r")], row
        cells = dict(zip(header, map(undo_defusing, row), strict=True))
        principal = event["principal"]
        flat = {k: v for k, v in event.items() if k != "principal"}
        flat |= {f"principal_{k}": v for k, v in principal.items()}
        for name, value in flat.items():
            if name == "details":
                assert json.loads(cells[name]) == value
            elif value is None:
                assert cells[name] == "", name
            else:
                assert cells[name] == str(value), name
    assert {undo_defusing(r[header.index("principal_name")]) for r in body} == set(HOSTILE)


def test_export_refuses_bad_formats_and_anonymous_callers(api: Api) -> None:
    bad = api.http.get("/api/v1/audit/export", params={"format": "xml"}, headers=api.admin)
    assert bad.status_code == 400
    anonymous = api.http.get("/api/v1/audit/export", params={**WINDOW, "format": "jsonl"})
    assert anonymous.status_code == 401
