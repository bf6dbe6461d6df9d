"""The database on the hot path, on the DB-API directly.

A signing reads the account and the key and writes its audit event. Through a
SQLAlchemy Session each of those statements costs ~50-300 µs of Python; the
same statement on a raw DB-API cursor costs ~5 µs. This module keeps the
statements defined with SQLAlchemy Core (one source of truth for SQL and types)
and compiles each once per dialect (:class:`Prepared`); bind and result values
go through the column types' own processors (``bind_processor`` /
``result_processor``), so what is written here reads back identically through
the ORM, and the other way round.

Connections come from a separate engine without a pool: one long-lived
connection per thread (:class:`DirectConnections`). Readers run in autocommit
mode, so every read sees the latest committed state of every replica.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Dialect, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql import ClauseElement, Select
from sqlalchemy.sql.compiler import SQLCompiler

from signery.errors import DatabaseUnavailable

Processor = Callable[[Any], Any] | None


class WriterLock:
    """Queues the SQLite writers of all processes on one host (``--workers N``).

    Without it, a process that finds the database locked by another one's commit
    falls back on SQLite's busy handler, which sleeps 1, 2, 5, 10... ms between
    tries: tens of milliseconds per collision at a few thousand commits a second.
    A kernel file lock wakes the next writer as soon as the lock is released.
    """

    def __init__(self, database: Path) -> None:
        self._path = database.with_name(database.name + ".write-lock")
        self._fd: int | None = None
        self._local = threading.Lock()

    def __enter__(self) -> WriterLock:
        self._local.acquire()
        try:
            if self._fd is None:
                self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._local.release()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._local.release()


@dataclass(frozen=True, slots=True)
class Prepared:
    """A Core statement compiled once for one dialect."""

    sql: str
    positional: bool
    names: tuple[str, ...]
    binds: tuple[Processor, ...]
    results: tuple[Processor, ...]
    constants: dict[str, Any]  # literal values bound in the statement itself

    @classmethod
    def of(cls, statement: ClauseElement, dialect: Dialect) -> Prepared:
        compiled = statement.compile(dialect=dialect)
        assert isinstance(compiled, SQLCompiler)
        # dialect_impl(): the dialect's own type (e.g. SQLite's DATETIME, which
        # stores text), whose processors are the ones the ORM applies too.
        names = tuple(compiled.positiontup or ()) if compiled.positional else tuple(compiled.binds)
        binds = tuple(
            compiled.binds[n].type.dialect_impl(dialect).bind_processor(dialect) for n in names
        )
        results: tuple[Processor, ...] = ()
        if isinstance(statement, Select):
            results = tuple(
                c.type.dialect_impl(dialect).result_processor(dialect, None)
                for c in statement.selected_columns
            )
        constants = {n: b.effective_value for n, b in compiled.binds.items() if not b.required}
        return cls(compiled.string, compiled.positional, names, binds, results, constants)

    def params(self, values: Mapping[str, Any]) -> Sequence[Any] | dict[str, Any]:
        if self.constants:
            values = {**self.constants, **values}
        if not any(self.binds):
            return (
                [values[n] for n in self.names]
                if self.positional
                else {n: values[n] for n in self.names}
            )
        converted = [
            p(values[n]) if p else values[n] for n, p in zip(self.names, self.binds, strict=True)
        ]
        return converted if self.positional else dict(zip(self.names, converted, strict=True))

    def row(self, raw: Sequence[Any]) -> tuple[Any, ...]:
        return tuple(p(v) if p else v for p, v in zip(self.results, raw, strict=True))

    def fetchall(self, cursor: Any, values: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        cursor.execute(self.sql, self.params(values))
        return [self.row(r) for r in cursor.fetchall()]

    def execute(self, cursor: Any, values: Mapping[str, Any]) -> None:
        cursor.execute(self.sql, self.params(values))

    def executemany(self, cursor: Any, rows: Sequence[Mapping[str, Any]]) -> None:
        if rows:
            cursor.executemany(self.sql, [self.params(r) for r in rows])


class DirectConnections:
    """One raw DB-API connection per thread, opened on first use and kept.

    ``autocommit=True`` connections are for reads (each statement sees the
    latest commit); ``autocommit=False`` ones hold explicit transactions.
    """

    def __init__(self, engine: Engine, *, autocommit: bool) -> None:
        # ``engine`` has no pool (Database.direct builds it): same URL, same
        # connect-time settings (WAL, synchronous=FULL, busy timeout on SQLite).
        self._engine = engine
        self._autocommit = autocommit
        self._local = threading.local()
        self._all: list[Any] = []
        self._lock = threading.Lock()
        self.dialect = engine.dialect
        database = engine.url.database if self.dialect.name == "sqlite" else None
        self._writers: contextlib.AbstractContextManager[object] = (
            WriterLock(Path(database))
            if database and database != ":memory:"
            else contextlib.nullcontext()
        )

    def get(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:
                proxy = self._engine.raw_connection()
            except DBAPIError as e:
                raise DatabaseUnavailable("the database is unavailable") from e
            conn = proxy.driver_connection
            assert conn is not None
            if self.dialect.name == "postgresql":
                conn.autocommit = self._autocommit
            self._local.conn = conn
            self._local.proxy = proxy
            with self._lock:
                self._all.append(proxy)
        return conn

    def discard(self) -> None:
        """Forget this thread's connection (after an error); the next use reconnects."""
        proxy = getattr(self._local, "proxy", None)
        self._local.conn = None
        self._local.proxy = None
        if proxy is not None:
            with self._lock:
                if proxy in self._all:
                    self._all.remove(proxy)
            # The connection is being thrown away; a failure to close it changes nothing.
            with contextlib.suppress(Exception):
                proxy.invalidate()

    @contextmanager
    def cursor(self) -> Iterator[Any]:
        """A cursor on this thread's connection; a driver error drops the connection."""
        conn = self.get()
        try:
            cur = conn.cursor()
            try:
                yield cur
            finally:
                cur.close()
        except self.dialect.loaded_dbapi.Error as e:
            self.discard()
            raise DatabaseUnavailable(f"database error ({type(e).__name__})") from e

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        """A write transaction (BEGIN IMMEDIATE on SQLite) committed on success."""
        conn = self.get()
        with self._writers:
            try:
                cur = conn.cursor()
                try:
                    if self.dialect.name == "sqlite":
                        cur.execute("BEGIN IMMEDIATE")
                    yield cur
                    conn.commit()
                except BaseException:
                    conn.rollback()
                    raise
                finally:
                    cur.close()
            except self.dialect.loaded_dbapi.Error as e:
                self.discard()
                raise DatabaseUnavailable(f"database error ({type(e).__name__})") from e

    def close(self) -> None:
        with self._lock:
            proxies, self._all = self._all, []
        for proxy in proxies:
            with contextlib.suppress(Exception):  # at shutdown, nothing left to protect
                proxy.close()
        self._engine.dispose()
