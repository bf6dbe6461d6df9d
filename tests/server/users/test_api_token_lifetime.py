"""API tokens always expire, at most ``api_token_max_lifetime_days`` after they are
made (issue 12, item 18): the bootstrap token too, and tokens that never expired
before the upgrade get an expiry when the schema is upgraded."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select, text

from signery.server.app import create_app
from signery.server.persistence import migrate
from signery.server.persistence.db import make_engine
from signery.server.users.models import ApiTokenRow
from tests.support import Api, Installation, new_installation, postgres_database, refused_once

DEFAULT_MAX_DAYS = 90
MIGRATION_SLACK = timedelta(minutes=5)


def lifetime(token: dict[str, Any]) -> timedelta:
    created = datetime.fromisoformat(token["created_at"])
    return datetime.fromisoformat(token["expires_at"]) - created


def create(api: Api, body: dict[str, Any]) -> Any:
    return api.http.post("/api/v1/users/me/tokens", json=body, headers=api.admin)


def test_a_token_that_never_expires_is_refused(api: Api) -> None:
    with refused_once(api, reason="api_token_lifetime_too_long"):
        r = create(api, {"name": "forever", "expires_in_days": None})
        assert r.status_code == 400, r.text
    assert r.json()["max_days"] == DEFAULT_MAX_DAYS
    assert "token" not in r.json()


def test_a_lifetime_over_the_maximum_is_refused(api: Api) -> None:
    with refused_once(api, reason="api_token_lifetime_too_long"):
        assert create(
            api, {"name": "long", "expires_in_days": DEFAULT_MAX_DAYS + 1}
        ).status_code == (400)
    at_max = api.ok(create(api, {"name": "max", "expires_in_days": DEFAULT_MAX_DAYS}), 201)
    assert lifetime(at_max) == timedelta(days=DEFAULT_MAX_DAYS)
    short = api.ok(create(api, {"name": "short", "expires_in_days": 1}), 201)
    assert lifetime(short) == timedelta(days=1)


def test_an_omitted_lifetime_is_the_maximum(api: Api) -> None:
    token = api.ok(create(api, {"name": "default"}), 201)
    assert lifetime(token) == timedelta(days=DEFAULT_MAX_DAYS)


def test_the_maximum_is_a_setting_that_the_bootstrap_token_follows(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    data_dir = tmp_path_factory.mktemp("short-tokens")
    with new_installation("sqlite", data_dir, api_token_max_lifetime_days=7) as inst:
        bootstrap = _tokens(inst)
        assert [(t.name, t.expires_at - t.created_at) for t in bootstrap] == [
            ("bootstrap", timedelta(days=7))
        ]
        app = create_app(inst.settings)
        with TestClient(app, base_url="http://signery.test") as client:
            api = Api(client, inst.admin_token, inst.init.issuer, inst.init.root_tsg_id)
            assert lifetime(api.ok(create(api, {"name": "default"}), 201)) == timedelta(days=7)
            r = create(api, {"name": "too long", "expires_in_days": 8})
            assert (r.status_code, r.json()["code"], r.json()["max_days"]) == (
                400,
                "api_token_lifetime_too_long",
                7,
            )


def _tokens(inst: Installation) -> list[ApiTokenRow]:
    engine = make_engine(inst.settings.resolved_database_url, pool_size=1)
    try:
        from sqlalchemy.orm import Session

        with Session(engine) as s:
            return list(s.scalars(select(ApiTokenRow)))
    finally:
        engine.dispose()


# ------------------------------------------------------------------ on upgrade


@contextlib.contextmanager
def database_at_0004(backend: str, directory: Path) -> Iterator[Engine]:
    with contextlib.ExitStack() as stack:
        url = (
            f"sqlite:///{directory / 'upgrade.db'}"
            if backend == "sqlite"
            else stack.enter_context(postgres_database())
        )
        engine = make_engine(url, pool_size=1)
        stack.callback(engine.dispose)
        cfg = migrate.alembic_config()
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0004")
        yield engine


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_tokens_that_never_expired_get_the_maximum_lifetime_from_the_upgrade(
    backend: str, tmp_path: Path
) -> None:
    long_ago = datetime(2020, 1, 1, tzinfo=UTC)
    with database_at_0004(backend, tmp_path) as engine:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO tsgs (id, name, parent_id, path, depth, created_at) "
                    "VALUES ('0000000001', 'root', NULL, '/0000000001/', 0, :t)"
                ),
                {"t": long_ago},
            )
            conn.execute(
                text(
                    "INSERT INTO users (id, username, password_hash, tsg_id, is_active, "
                    "created_at) VALUES ('u', 'u', NULL, '0000000001', :yes, :t)"
                ),
                {"t": long_ago, "yes": True},
            )
            for token_id, expires in (
                ("never", None),
                ("ten-years", long_ago + timedelta(days=3650 * 2)),
                ("soon", long_ago + timedelta(days=30)),
            ):
                conn.execute(
                    text(
                        "INSERT INTO api_tokens (id, user_id, name, secret_hash, created_at, "
                        "expires_at) VALUES (:id, 'u', :id, :hash, :t, :e)"
                    ),
                    {"id": token_id, "hash": "0" * 64, "t": long_ago, "e": expires},
                )
        upgraded_at = datetime.now(UTC)
        migrate.upgrade(engine)
        from sqlalchemy.orm import Session

        with Session(engine) as s:
            expiry = {t.id: t.expires_at for t in s.scalars(select(ApiTokenRow))}
    cap = upgraded_at + timedelta(days=DEFAULT_MAX_DAYS)
    for token_id in ("never", "ten-years"):
        assert cap - MIGRATION_SLACK <= expiry[token_id] <= cap + MIGRATION_SLACK, token_id
    assert expiry["soon"] == long_ago + timedelta(days=30), "shorter expiries are kept"
