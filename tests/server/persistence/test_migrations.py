"""The Alembic migrations and the SQLAlchemy models describe the same schema,
on SQLite and on PostgreSQL, and upgrading is idempotent."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Column, Engine, MetaData, String, inspect, text

from signery.server.persistence import migrate
from signery.server.persistence.db import make_engine
from signery.server.schema import Base
from tests.support import postgres_database

BACKENDS = ["sqlite", "postgresql"]


@contextlib.contextmanager
def empty_database(backend: str, directory: Path) -> Iterator[Engine]:
    with contextlib.ExitStack() as stack:
        if backend == "sqlite":
            url = f"sqlite:///{directory / 'schema.db'}"
        else:
            url = stack.enter_context(postgres_database())
        engine = make_engine(url, pool_size=1)
        stack.callback(engine.dispose)
        yield engine


@pytest.fixture(scope="module", params=BACKENDS)
def engine(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Engine]:
    with empty_database(request.param, tmp_path_factory.mktemp("schema")) as e:
        assert migrate.current_revision(e) is None
        migrate.upgrade(e)
        yield e


def schema(engine: Engine) -> dict[str, Any]:
    """Tables with their columns, indexes, unique and foreign keys, as reflected."""
    with engine.connect() as conn:
        inspector = inspect(conn)
        return {
            name: {
                "columns": [
                    (c["name"], str(c["type"]), c["nullable"]) for c in inspector.get_columns(name)
                ],
                "pk": inspector.get_pk_constraint(name)["constrained_columns"],
                "indexes": sorted(
                    (i["name"] or "", tuple(i["column_names"]), bool(i["unique"]))
                    for i in inspector.get_indexes(name)
                ),
                "unique": sorted(
                    (u["name"] or "", tuple(u["column_names"]))
                    for u in inspector.get_unique_constraints(name)
                ),
                "foreign_keys": sorted(
                    (tuple(f["constrained_columns"]), f["referred_table"])
                    for f in inspector.get_foreign_keys(name)
                ),
            }
            for name in sorted(inspector.get_table_names())
        }


def test_the_migrations_create_exactly_the_models(engine: Engine) -> None:
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        drift = compare_metadata(context, Base.metadata)

    assert drift == []


def test_the_drift_check_sees_a_model_change(engine: Engine) -> None:
    """Guards the test above against passing vacuously on either database."""
    altered = MetaData(naming_convention=Base.metadata.naming_convention)
    for table in Base.metadata.tables.values():
        table.to_metadata(altered)
    altered.tables["server_meta"].append_column(Column("added_later", String(8), nullable=True))
    with engine.connect() as conn:
        drift = compare_metadata(MigrationContext.configure(conn), altered)

    assert [(d[0], d[2], d[3].name) for d in drift] == [
        ("add_column", "server_meta", "added_later")
    ]


def test_every_model_table_exists_after_upgrade(engine: Engine) -> None:
    tables = set(schema(engine))
    # The drift check above would also see this; said plainly, it cannot pass vacuously.
    assert set(Base.metadata.tables) <= tables
    assert tables - set(Base.metadata.tables) == {"alembic_version"}
    assert "builtin_key_material" in tables


def test_the_database_is_at_the_single_head(engine: Engine) -> None:
    heads = ScriptDirectory.from_config(migrate.alembic_config()).get_heads()

    assert heads == [migrate.head_revision()]
    assert migrate.current_revision(engine) == migrate.head_revision()


def test_upgrading_again_changes_nothing(engine: Engine) -> None:
    before = schema(engine)
    with engine.connect() as conn:
        versions_before = list(conn.execute(text("SELECT version_num FROM alembic_version")))

    migrate.upgrade(engine)
    migrate.upgrade(engine)

    assert schema(engine) == before
    with engine.connect() as conn:
        versions = list(conn.execute(text("SELECT version_num FROM alembic_version")))
    assert versions == versions_before
    assert [v.version_num for v in versions] == [migrate.head_revision()]


def test_upgrade_keeps_existing_rows(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO server_meta (key, value) VALUES ('migration-test', 'kept')"))
    try:
        migrate.upgrade(engine)
        with engine.connect() as conn:
            value = conn.execute(
                text("SELECT value FROM server_meta WHERE key = 'migration-test'")
            ).scalar_one()
        assert value == "kept"
    finally:
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM server_meta WHERE key = 'migration-test'"))
