"""Engine, connections and transactions, for SQLite and PostgreSQL alike.

``Database`` is the store's one entry point: ``with db.begin() as conn`` opens
a transaction that commits on success and rolls back on any exception, so a
crash at any point loses no committed data and leaves no half-made change.
SQLite runs in WAL mode with a busy timeout so that the API threads, the
orchestrator and the receiver can share one file.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.pool import NullPool


def normalize_url(url: str) -> str:
    """Accept plain ``postgresql://`` URLs and use the psycopg 3 driver for them."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


class Database:
    """A SQLAlchemy engine plus the dialect facts the queries need."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url = normalize_url(url)
        self.is_sqlite = self.url.startswith("sqlite")
        kwargs: dict[str, Any] = {"echo": echo, "future": True}
        if self.is_sqlite:
            # One connection per checkout: SQLite connections are cheap and this
            # avoids sharing one across threads.
            kwargs["poolclass"] = NullPool
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        else:
            kwargs["pool_pre_ping"] = True
            kwargs["pool_size"] = 10
        self.engine: Engine = create_engine(self.url, **kwargs)
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
            # pysqlite's own transaction handling defers BEGIN; take it over so
            # that a write transaction holds its lock from the start (no
            # upgrade deadlocks between concurrent starters).
            event.listen(self.engine, "begin", _sqlite_begin_immediate)
        # Job transitions are logged when their transaction commits, never for one rolled back.
        event.listen(self.engine, "commit", _emit_after_commit)
        event.listen(self.engine, "rollback", _drop_after_rollback)

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        """A transaction: committed when the block ends, rolled back on error."""
        with self.engine.begin() as conn:
            yield conn

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        """A read-only unit of work (still one transaction, rolled back at the end)."""
        with self.engine.connect() as conn:
            yield conn

    @property
    def supports_skip_locked(self) -> bool:
        return not self.is_sqlite

    def dispose(self) -> None:
        self.engine.dispose()


#: key in ``Connection.info`` of the log lines that wait for this transaction's commit
PENDING_LOGS = "opensmc.pending_logs"


def log_on_commit(conn: Connection, logger: logging.Logger, message: str, fields: dict[str, Any]) -> None:
    """Log ``message`` (INFO, with structured ``fields``) once the transaction of ``conn`` commits."""
    conn.info.setdefault(PENDING_LOGS, []).append((logger, message, fields))


def _emit_after_commit(conn: Connection) -> None:
    for logger, message, fields in conn.info.pop(PENDING_LOGS, ()):
        logger.info(message, extra={"fields": fields})


def _drop_after_rollback(conn: Connection) -> None:
    conn.info.pop(PENDING_LOGS, None)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (see _sqlite_begin_immediate)
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def _sqlite_begin_immediate(conn: Connection) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE")
