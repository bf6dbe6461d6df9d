"""Alembic environment: always called with a connection from
signery.server.persistence.migrate; it compares against every table
(signery.server.schema)."""

from __future__ import annotations

from alembic import context

from signery.server.schema import Base

connection = context.config.attributes.get("connection")
# Migrations are only run through signery.server.persistence.migrate.
if connection is None:  # pragma: no cover
    raise RuntimeError("run migrations with `signery db upgrade`")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    # SQLite cannot ALTER most things in place; batch mode copies the table.
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
