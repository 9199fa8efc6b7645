"""Engine, connections and transactions, for SQLite and PostgreSQL alike.

``Database`` is the store's one entry point: ``with db.begin() as conn`` opens
a transaction that commits on success and rolls back on any exception, so a
crash at any point loses no committed data and leaves no half-made change.
SQLite runs in WAL mode with a busy timeout so that the API threads, the
orchestrator and the receiver can share one file.

On SQLite, connections are pooled (a new connection and its PRAGMAs cost more
than a whole short request) and a pooled connection is used by one thread at
a time, handed over between threads by the pool; WAL coordinates processes.
``begin()`` opens a write transaction with ``BEGIN IMMEDIATE`` (it holds the
write lock from the start, so two writers never deadlock upgrading), while
``connect()`` opens a deferred ``BEGIN``: readers run side by side, and with
writers, seeing the last committed state (WAL snapshot isolation).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.pool import QueuePool

#: Connection.info key: this connection's transaction only reads (a deferred BEGIN on SQLite)
_READ_ONLY = "opensmc.read_only"
#: pooled SQLite connections per process: more than the API's 40 worker threads (anyio's default), the
#: orchestrator and the receiver, so that connections are reused, not opened and closed under load
SQLITE_POOL_SIZE = 48
SQLITE_POOL_OVERFLOW = 16


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
            # Pooled: opening a connection and setting its PRAGMAs was most of a read's cost.
            # check_same_thread is off because the pool hands a connection from thread to
            # thread; it is never used by two threads at once (one checkout at a time).
            kwargs["poolclass"] = QueuePool
            kwargs["pool_size"] = SQLITE_POOL_SIZE
            kwargs["max_overflow"] = SQLITE_POOL_OVERFLOW
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        else:
            kwargs["pool_pre_ping"] = True
            kwargs["pool_size"] = 10
        self.engine: Engine = create_engine(self.url, **kwargs)
        self._writer = threading.RLock()  # re-entrant: a nested begin() of one thread must not hang here
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
        if self.is_sqlite:
            # One writer at a time per process, queued here: SQLite lets one writer in at a
            # time anyway, and a writer that finds the file locked sleeps in SQLite's busy
            # handler (up to 100 ms a try) instead of being woken when the lock is free.
            # Other processes still meet at the file lock (busy_timeout).
            with self._writer, self.engine.begin() as conn:
                yield conn
            return
        with self.engine.begin() as conn:
            yield conn

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        """A read-only unit of work (still one transaction, rolled back at the end).

        On SQLite it is a deferred transaction that takes no write lock, so reads
        never wait for each other or for a writer. Never write in it.
        """
        with self.engine.connect() as conn:
            conn.info[_READ_ONLY] = True
            try:
                yield conn
            finally:
                conn.info.pop(_READ_ONLY, None)  # the pooled connection's next user may write

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
    conn.exec_driver_sql("BEGIN" if conn.info.get(_READ_ONLY) else "BEGIN IMMEDIATE")
