"""Database plumbing: declarative base, engine with safe SQLite settings, helpers.

SQLite (the embedded default) runs in WAL mode with ``synchronous=FULL``: every
commit is fsync'ed, so an audit event that was committed survives power loss
(https://www.sqlite.org/pragma.html#pragma_synchronous). PostgreSQL is the
scale-out database; both run the same Alembic migrations and the same tests.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    DateTime,
    Dialect,
    Engine,
    MetaData,
    Table,
    bindparam,
    create_engine,
    event,
    func,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, sessionmaker
from sqlalchemy.orm import Session as Session
from sqlalchemy.pool import ConnectionPoolEntry, NullPool
from sqlalchemy.sql.dml import Insert
from sqlalchemy.types import TypeDecorator

from signery.errors import ConfigurationError, DatabaseError, DatabaseUnavailable

if TYPE_CHECKING:
    from signery.server.persistence.direct import DirectConnections

SQLITE_BUSY_TIMEOUT_MS = 15_000

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every database (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database; use UTC-aware datetimes")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def table(model: type[Base]) -> Table:
    """The Core table of a mapped class, typed as a Table (for Core statements)."""
    t = model.__table__
    assert isinstance(t, Table)
    return t


def new_id() -> str:
    return str(uuid.uuid4())


def make_engine(url: str, *, pool_size: int = 10, pooled: bool = True) -> Engine:
    """Create an engine; SQLite gets WAL + synchronous=FULL + busy timeout + foreign keys.

    ``pooled=False`` gives an engine without a pool, for connections that a
    caller keeps for the life of a thread (signery.server.persistence.direct)."""
    pool: dict[str, Any] = (
        {"pool_size": pool_size, "max_overflow": pool_size * 2}
        if pooled
        else {"poolclass": NullPool}
    )
    try:
        if url.startswith("sqlite"):
            engine = create_engine(
                url,
                connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
                **pool,
            )
            event.listen(engine, "connect", _sqlite_on_connect)
            event.listen(engine, "begin", _sqlite_on_begin)
        elif url.startswith("postgresql"):
            engine = create_engine(url, pool_pre_ping=pooled, **pool)
        else:
            raise ConfigurationError(
                "database_url must be a sqlite:// or postgresql+psycopg:// URL"
            )
    except ConfigurationError:
        raise
    except Exception as e:
        raise ConfigurationError(f"invalid database URL: {type(e).__name__}") from e
    return engine


def _sqlite_on_connect(dbapi_conn: Any, record: ConnectionPoolEntry) -> None:
    # pysqlite's own transaction handling defers BEGIN and breaks SAVEPOINT; we
    # issue BEGIN ourselves (SQLAlchemy "pysqlite serializable" recipe).
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    # Durability of committed audit events (issue: fail-closed audit): FULL fsyncs
    # the WAL on every commit; NORMAL could lose the last commits on power loss.
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA foreign_keys=ON")
    # Zero the pages of deleted rows, so erased key material does not linger in
    # free pages of the database file (https://www.sqlite.org/pragma.html#pragma_secure_delete).
    cur.execute("PRAGMA secure_delete=ON")
    cur.close()


def _sqlite_on_begin(conn: Connection) -> None:
    # A writing transaction takes the write lock at BEGIN (IMMEDIATE), so two
    # writers queue on busy_timeout; a deferred transaction that upgrades from
    # read to write in WAL mode fails at once with SQLITE_BUSY_SNAPSHOT instead.
    write = conn.get_execution_options().get(WRITE_OPTION, False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


WRITE_OPTION = "signery_write"


def writer(engine: Engine) -> Engine:
    """The engine for transactions that write (BEGIN IMMEDIATE on SQLite)."""
    return engine.execution_options(**{WRITE_OPTION: True})


def make_sessionmaker(engine: Engine, *, write: bool = True) -> sessionmaker[Session]:
    bind = writer(engine) if write else engine
    return sessionmaker(bind=bind, expire_on_commit=False, autoflush=False)


def upsert_statement(
    dialect: str,
    table: Table,
    *,
    key: Sequence[str],
    increment: Sequence[str] = (),
    replace: Sequence[str] = (),
    keep_if_null: Sequence[str] = (),
) -> Insert:
    """INSERT ... ON CONFLICT (key) DO UPDATE, for SQLite and PostgreSQL, with one
    bind parameter per column (named after it) so it can run with executemany.

    ``increment`` columns are added to the stored value, ``replace`` columns
    overwrite it, ``keep_if_null`` columns overwrite it unless the new value is NULL.
    """
    ins: Any
    if dialect == "postgresql":
        ins = postgresql.insert(table)
    elif dialect == "sqlite":
        ins = sqlite.insert(table)
    else:  # pragma: no cover - make_engine refuses other databases
        raise ConfigurationError(f"unsupported database {dialect}")
    columns = [*key, *increment, *replace, *keep_if_null]
    ins = ins.values({c: bindparam(c) for c in columns})
    excluded = ins.excluded
    set_: dict[str, Any] = {c: table.c[c] + excluded[c] for c in increment}
    set_.update({c: excluded[c] for c in replace})
    set_.update({c: func.coalesce(excluded[c], table.c[c]) for c in keep_if_null})
    stmt: Insert = ins.on_conflict_do_update(index_elements=list(key), set_=set_)
    return stmt


def sorted_by_key(rows: Sequence[Mapping[str, Any]], key: Sequence[str]) -> list[Mapping[str, Any]]:
    """Rows in key order, so that concurrent writers lock rows in the same order
    (no deadlock on PostgreSQL)."""
    return sorted(rows, key=lambda r: tuple(str(r[k]) for k in key))


def utcnow() -> datetime:
    return datetime.now(UTC)


class Database:
    """An engine with a reading and a writing session factory.

    Services decide their transaction boundaries with ``write()`` / ``read()``;
    SQLAlchemy's connection errors become :class:`DatabaseUnavailable` here, the
    one module that touches the driver.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._write = make_sessionmaker(engine, write=True)
        self._read = make_sessionmaker(engine, write=False)
        self._direct: list[DirectConnections] = []

    def direct(self, *, autocommit: bool) -> DirectConnections:
        """Per-thread raw connections for the hot path (see signery.server.persistence.direct)."""
        from signery.server.persistence.direct import DirectConnections

        twin = make_engine(self.engine.url.render_as_string(hide_password=False), pooled=False)
        connections = DirectConnections(twin, autocommit=autocommit)
        self._direct.append(connections)
        return connections

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A session in a transaction that commits on success and rolls back on error."""
        try:
            with self._write.begin() as session:
                yield session
        except (OperationalError, InterfaceError) as e:
            raise DatabaseUnavailable("the database is unavailable") from e
        except SQLAlchemyError as e:
            # Reported by type only: a driver message can quote the values written.
            raise DatabaseError(f"the database refused the change ({type(e).__name__})") from e

    @contextmanager
    def read(self) -> Iterator[Session]:
        try:
            # close() (not rollback()) ends the transaction without expiring the
            # loaded objects, so callers may keep using what they read.
            with self._read() as session:
                yield session
        except (OperationalError, InterfaceError) as e:
            raise DatabaseUnavailable("the database is unavailable") from e
        except SQLAlchemyError as e:
            raise DatabaseError(f"database error ({type(e).__name__})") from e

    def ping(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
        except SQLAlchemyError:
            return False
        return True

    def dispose(self) -> None:
        for connections in self._direct:
            connections.close()
        self.engine.dispose()


def flush_unique(session: Session, conflict: Exception) -> None:
    """Flush pending rows; a unique-constraint violation raised here means the name
    (or id) is taken, so it becomes ``conflict``. Any other database error keeps
    its own meaning: only this flush is interpreted, never a whole transaction."""
    try:
        session.flush()
    except IntegrityError as e:
        raise conflict from e
