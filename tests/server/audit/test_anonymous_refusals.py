"""Refusals of unauthenticated requests, against a server: one event each up to
a share per source and interval, then one summing event per reason, written when
the interval ends or the server stops; authenticated refusals one event each."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from fastapi.testclient import TestClient

from signery.server.app import create_app
from tests.support import Api, Installation, assertion_claims, raw_jwt

BAD_TOKEN = {"Authorization": "Bearer sgy_pat_0123456789abcdef_not-a-secret"}


@contextlib.contextmanager
def server_with(installation: Installation, **settings: Any) -> Iterator[Api]:
    app = create_app(installation.settings.model_copy(update=settings))
    with TestClient(app, base_url="http://signery.test") as client:
        yield Api(
            client,
            installation.admin_token,
            installation.init.issuer,
            installation.init.root_tsg_id,
        )


def refusals_counted(events: list[dict[str, Any]]) -> dict[tuple[str, str], int]:
    """Refusals per (kind, reason) that ``events`` account for, summaries included."""
    counted: dict[tuple[str, str], int] = {}
    for e in events:
        key = (e["kind"], e["reason"])
        counted[key] = counted.get(key, 0) + int(e["details"].get("aggregated", 1))
    return counted


def test_anonymous_refusals_beyond_the_share_are_summed_at_shutdown(
    api: Api, installation: Installation
) -> None:
    """Regression: every anonymous refusal was a durable, fsynced row of its own."""
    seq = api.last_seq()
    with server_with(
        installation, audit_anonymous_refusals=2, audit_refusal_interval_seconds=3600
    ) as flooded:
        for _ in range(7):
            assert flooded.http.get("/api/v1/keys", headers=BAD_TOKEN).status_code == 401
        now = api.events_after(seq)
        assert [(e["kind"], e["reason"]) for e in now] == [
            ("auth.authentication.failed", "invalid_token")
        ] * 2
        assert all("aggregated" not in e["details"] for e in now)
    # Stopping the server writes the summary of the interval under way.
    events = api.events_after(seq)
    assert len(events) == 3
    summary = events[2]
    assert (summary["kind"], summary["reason"], summary["outcome"]) == (
        "auth.authentication.failed",
        "invalid_token",
        "denied",
    )
    assert summary["principal"]["type"] == "anonymous"
    assert summary["details"]["aggregated"] == 5
    assert summary["details"]["example"] == {"method": "GET", "path": "/api/v1/keys"}
    assert summary["client_ip"] == "testclient"


def test_summaries_are_written_when_their_interval_ends(
    api: Api, installation: Installation
) -> None:
    seq = api.last_seq()
    with server_with(
        installation, audit_anonymous_refusals=1, audit_refusal_interval_seconds=3
    ) as flooded:
        account = flooded.create_account(flooded.create_tsg()["id"])
        forged = raw_jwt(
            {"alg": "ES256", "typ": "JWT"},
            assertion_claims(account.client_id, flooded.issuer),
            b"\x00" * 64,
        )
        seq = api.last_seq()
        for _ in range(6):
            assert flooded.http.get("/api/v1/keys", headers=BAD_TOKEN).status_code == 401
            assert flooded.token_response(forged).status_code == 400
        expected = {
            ("auth.authentication.failed", "invalid_token"): 6,
            ("auth.token.refused", "assertion_signature_invalid"): 6,
        }
        # While the server runs, the summaries come as their interval ends.
        deadline = time.monotonic() + 30
        while refusals_counted(events := api.events_after(seq)) != expected:
            assert time.monotonic() < deadline, refusals_counted(events)
            time.sleep(0.1)
    assert len(events) < 12
    assert any("aggregated" in e["details"] for e in events)


def test_authenticated_refusals_stay_one_event_each(api: Api, installation: Installation) -> None:
    seq = api.last_seq()
    with server_with(
        installation, audit_anonymous_refusals=1, audit_refusal_interval_seconds=3600
    ) as flooded:
        for _ in range(5):
            r = flooded.http.get("/api/v1/keys/no-such-key", headers=flooded.admin)
            assert r.status_code == 404
    events = api.events_after(seq)
    assert [(e["kind"], e["reason"], e["principal"]["type"]) for e in events] == [
        ("request.refused", "key_not_found", "user")
    ] * 5
