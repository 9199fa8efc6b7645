"""Engine, connections and transactions, for SQLite and PostgreSQL alike.

``Database`` is the store's one entry point: ``with db.begin() as conn`` opens
a transaction that commits on success and rolls back on any exception, so a
crash at any point loses no committed data and leaves no half-made change.
SQLite runs in WAL mode with a busy timeout so that the API threads, the
orchestrator and the receiver can share one file.

A full disk must not take reads down with it: WAL mode is set once, by the
first connection of the process (it is a property of the file), and one
extra connection stays open for the life of the :class:`Database`, so the
WAL's shared-memory index (``opensmc.db-shm``) is never dropped and rebuilt
(rebuilding it needs 32 KiB of disk, which fails on a full disk as "disk I/O
error" on every new connection). A write that cannot get disk space (SQLite's
``SQLITE_FULL``, PostgreSQL's ``disk_full``) is :class:`ServerDiskFull`, a 503
that says so, not an internal error.

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
import re
import sqlite3
import threading
import time
from collections import namedtuple
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import DisconnectionError, OperationalError
from sqlalchemy.pool import QueuePool

from opensmc.domain.errors import ServerDiskFull

#: Connection.info key: this connection's transaction only reads (a deferred BEGIN on SQLite)
_READ_ONLY = "opensmc.read_only"
#: pooled SQLite connections per process: more than the API's 40 worker threads (anyio's default), the
#: orchestrator and the receiver, so that connections are reused, not opened and closed under load
SQLITE_POOL_SIZE = 48
SQLITE_POOL_OVERFLOW = 16
#: pooled PostgreSQL connections per process, kept open, and how many more may be opened for a peak
PG_POOL_SIZE = 24
PG_POOL_OVERFLOW = 16


def normalize_url(url: str) -> str:
    """Accept plain ``postgresql://`` URLs and use the psycopg 3 driver for them."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


#: flags of the calling thread (see :func:`keep_driver_connection`)
_thread_flags = threading.local()


def keep_driver_connection() -> None:
    """Give the calling thread a PostgreSQL driver connection of its own for :meth:`Database.driver`.

    For a thread that runs many short reads one after the other (the API's
    read lane, ``api/threads.py``): its connection stays checked out of the
    pool and in autocommit, so a read costs no pool check-out and check-in,
    no autocommit switch there and back, and no reset on return (about an
    eighth of a small signed request's CPU on PostgreSQL, docs/performance.md).
    It is pinged before use after :data:`PING_IDLE` seconds idle, as a pooled
    one is, replaced when it is broken, and closed by :meth:`Database.dispose`.
    SQLite is unchanged: its connections cost nothing to hand over.
    """
    _thread_flags.own_driver = True


@dataclass(slots=True)
class _OwnConnection:
    fairy: Any  #: the pool's proxy, checked out for good
    last_used: float


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
            # Kept open: an overflow connection is closed when it is given back, and opening one
            # (a new server process on PostgreSQL's side) cost more than the requests it served;
            # under load the API's worker threads use about as many as they are.
            kwargs["pool_size"] = PG_POOL_SIZE
            kwargs["max_overflow"] = PG_POOL_OVERFLOW
            kwargs["pool_use_lifo"] = True  # the connections in use stay warm; the others idle (and are pinged)
        self.engine: Engine = create_engine(self.url, **kwargs)
        if not self.is_sqlite:
            # A pooled PostgreSQL connection is pinged before use only when it sat idle (the server
            # may have restarted meanwhile); SQLAlchemy's pool_pre_ping pinged at every checkout, one
            # more round trip per transaction under load.
            event.listen(self.engine, "checkout", _ping_if_idle)
            event.listen(self.engine, "checkin", _note_checkin)
        self._writer = threading.RLock()  # re-entrant: a nested begin() of one thread must not hang here
        #: held open while the Database lives (SQLite): keeps the WAL index mapped (see the module doc)
        self._keeper: sqlite3.Connection | None = None
        #: driver connections of threads that keep their own (thread ident -> connection)
        self._own: dict[int, _OwnConnection] = {}
        self._own_lock = threading.Lock()
        self._keeper_lock = threading.Lock()
        if self.is_sqlite:
            event.listen(self.engine, "connect", self._sqlite_connected)
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
            with _disk_full_is_clear(), self._writer, self.engine.begin() as conn:
                yield conn
            return
        with _disk_full_is_clear(), self.engine.begin() as conn:
            yield conn

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        """A read-only unit of work (still one transaction, rolled back at the end).

        On SQLite it is a deferred transaction that takes no write lock, so reads
        never wait for each other or for a writer. On PostgreSQL it runs in
        autocommit: each statement sees the last committed state, as it does in
        a READ COMMITTED transaction (PostgreSQL's default, and ours), without
        the BEGIN and ROLLBACK round trips. Never write in it.
        """
        with _disk_full_is_clear(), self.engine.connect() as conn:
            if not self.is_sqlite:
                conn.execution_options(isolation_level="AUTOCOMMIT")  # reset when the pool takes it back
            conn.info[_READ_ONLY] = True
            try:
                yield conn
            finally:
                conn.info.pop(_READ_ONLY, None)  # the pooled connection's next user may write

    @contextmanager
    def driver(self) -> Iterator[Any]:
        """A pooled driver (DBAPI) connection for the hot path's precompiled statements (:class:`Prepared`).

        A read-only unit of work, like :meth:`connect`: on SQLite one deferred
        transaction (one snapshot for every statement, no write lock), on
        PostgreSQL autocommit (each statement sees the last committed state, and
        a single statement that writes is its own transaction). No SQLAlchemy
        ``Connection``, transaction or ``Result`` is made per use: for a small read
        they cost more than the statement (docs/performance.md). Disk-full
        errors are :class:`ServerDiskFull`, as everywhere. A thread that keeps
        a connection of its own (:func:`keep_driver_connection`) uses it.
        """
        if not self.is_sqlite and getattr(_thread_flags, "own_driver", False):
            with self._own_driver() as own:
                yield own
            return
        fairy = self.engine.raw_connection()
        dbapi_conn: Any = fairy.driver_connection
        try:
            with _driver_disk_full_is_clear():
                if self.is_sqlite:
                    dbapi_conn.execute("BEGIN")
                    try:
                        yield dbapi_conn
                    finally:
                        dbapi_conn.execute("ROLLBACK")
                else:
                    dbapi_conn.autocommit = True
                    try:
                        yield dbapi_conn
                    finally:
                        dbapi_conn.autocommit = False  # as the pool's other users expect it
        except BaseException:
            if _is_broken(dbapi_conn):
                fairy.invalidate()  # the pool must not hand a dead connection out again
            raise
        finally:
            fairy.close()  # back to the pool

    @contextmanager
    def driver_begin(self) -> Iterator[Any]:
        """:meth:`driver` for writes: a transaction, committed when the block ends, rolled back on error.

        On SQLite ``BEGIN IMMEDIATE`` behind this process's writer lock, as :meth:`begin`.
        """
        fairy = self.engine.raw_connection()
        dbapi_conn: Any = fairy.driver_connection
        try:
            with _driver_disk_full_is_clear(), self._writer if self.is_sqlite else _nothing():
                if self.is_sqlite:
                    dbapi_conn.execute("BEGIN IMMEDIATE")
                try:
                    yield dbapi_conn
                except BaseException:
                    dbapi_conn.rollback()
                    raise
                dbapi_conn.commit()
        except BaseException:
            if _is_broken(dbapi_conn):
                fairy.invalidate()
            raise
        finally:
            fairy.close()

    @contextmanager
    def _own_driver(self) -> Iterator[Any]:
        """The calling thread's own autocommit PostgreSQL connection (:func:`keep_driver_connection`)."""
        ident = threading.get_ident()
        own = self._own.get(ident)
        if own is not None and time.monotonic() - own.last_used > PING_IDLE and not _answers(own.fairy):
            self._drop_own(ident)  # the server went away while it sat idle, as _ping_if_idle finds
            own = None
        if own is None:
            fairy = self.engine.raw_connection()
            new_conn: Any = fairy.driver_connection
            new_conn.autocommit = True
            own = _OwnConnection(fairy, time.monotonic())
            with self._own_lock:
                self._own[ident] = own
        dbapi_conn: Any = own.fairy.driver_connection
        try:
            with _driver_disk_full_is_clear():
                yield dbapi_conn
        except BaseException:
            if _is_broken(dbapi_conn):
                self._drop_own(ident)
            raise
        finally:
            own.last_used = time.monotonic()

    def _drop_own(self, ident: int) -> None:
        with self._own_lock:
            own = self._own.pop(ident, None)
        if own is not None:
            own.fairy.invalidate()  # closed, and never handed out again

    @property
    def supports_skip_locked(self) -> bool:
        return not self.is_sqlite

    def dispose(self) -> None:
        with self._own_lock:
            owned, self._own = list(self._own.values()), {}
        for own in owned:
            own.fairy.invalidate()
        self.engine.dispose()
        with self._keeper_lock:
            if self._keeper is not None:
                self._keeper.close()
                self._keeper = None

    def _sqlite_connected(self, dbapi_conn: Any, _record: Any) -> None:
        _sqlite_pragmas(dbapi_conn)
        with self._keeper_lock:
            if self._keeper is not None:
                return
            cur = dbapi_conn.cursor()
            # Once per process, not per connection: WAL is a property of the file, and
            # re-issuing it (or any first touch of a closed WAL) needs disk space.
            if str(cur.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
                cur.execute("PRAGMA journal_mode=WAL")
            cur.close()
            database = self.engine.url.database
            if not database or database == ":memory:":
                return
            keeper = sqlite3.connect(database, isolation_level=None, check_same_thread=False, timeout=30)
            keeper.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()  # maps the WAL index
            self._keeper = keeper


#: seconds a pooled PostgreSQL connection may sit in the pool and still be used without a ping
PING_IDLE = 1.0
_CHECKED_IN = "opensmc.checked_in"


def _note_checkin(_dbapi_conn: Any, record: Any) -> None:
    record.info[_CHECKED_IN] = time.monotonic()


def _ping_if_idle(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
    """Pessimistic disconnect handling, for connections idle longer than :data:`PING_IDLE`.

    A dead connection raises ``DisconnectionError``: the pool drops it and
    checks out another (SQLAlchemy's documented recipe, and what
    ``pool_pre_ping`` does at every checkout).
    """
    last = record.info.get(_CHECKED_IN)
    if last is not None and time.monotonic() - last < PING_IDLE:
        return
    try:
        cur = dbapi_conn.cursor()
        try:
            cur.execute("SELECT 1")
        finally:
            cur.close()
        dbapi_conn.rollback()  # the ping's transaction: leave the connection idle, as the pool gives it
    except Exception as exc:
        raise DisconnectionError(f"pooled connection is dead: {exc}") from exc


_DISK_FULL = (
    "The server's disk is full: its database could not get the space this call needs. Free "
    "space on the server's disk (or delete images you no longer need) and try again; calls "
    "that need no disk space still work."
)


@contextmanager
def _disk_full_is_clear() -> Iterator[None]:
    """A write the database's disk has no room for becomes :class:`ServerDiskFull`."""
    try:
        yield
    except OperationalError as err:
        if not _is_disk_full(err.orig):
            raise
        raise ServerDiskFull(_DISK_FULL) from err


@contextmanager
def _driver_disk_full_is_clear() -> Iterator[None]:
    """:func:`_disk_full_is_clear` for the driver's own exceptions (no SQLAlchemy wrapper)."""
    try:
        yield
    except Exception as err:
        if not _is_disk_full(err):
            raise
        raise ServerDiskFull(_DISK_FULL) from err


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def _answers(fairy: Any) -> bool:
    """Whether a connection answers a ``SELECT 1`` (in autocommit: no transaction is left open)."""
    try:
        fairy.driver_connection.execute("SELECT 1").close()
    except Exception:
        return False
    return True


def _is_broken(dbapi_conn: Any) -> bool:
    """A driver connection that cannot be used again (psycopg's ``broken``: the server went away)."""
    return bool(getattr(dbapi_conn, "broken", False) or getattr(dbapi_conn, "closed", False))


#: a named parameter in the psycopg dialect's SQL (a literal percent sign there is %%)
_NAMED = re.compile(r"(?<!%)%\((\w+)\)s")


class Prepared:
    """A SQLAlchemy Core statement compiled once per dialect, run on the driver's cursor.

    The statement's SQL and its parameter order are fixed at the first use on
    a dialect; each run binds the parameters (through the column types' bind
    processors, e.g. SQLite's datetime strings), executes, and turns the rows
    into named tuples through the result processors of the selected columns:
    the values SQLAlchemy would give, without its per-execution cache look-up,
    execution context and ``Result``.
    """

    def __init__(self, stmt: Any) -> None:
        self.stmt = stmt
        self.keys = tuple(c.key for c in stmt.selected_columns) if hasattr(stmt, "selected_columns") else ()
        self.row = namedtuple("Row", self.keys, rename=True) if self.keys else None
        self._compiled: dict[str, tuple[str, tuple[str, ...], dict[str, Any], list[Any]]] = {}
        self._lock = threading.Lock()

    def _for(self, dialect: Any) -> tuple[str, tuple[str, ...], dict[str, Any], list[Any]]:
        found = self._compiled.get(dialect.name)
        if found is None:
            with self._lock:
                compiled = self.stmt.compile(dialect=dialect)
                binds = {}
                for name, bind in compiled.binds.items():
                    proc = bind.type.dialect_impl(dialect).bind_processor(dialect)
                    if proc is not None:
                        binds[name] = proc
                results = [
                    c.type.dialect_impl(dialect).result_processor(dialect, None) for c in self.stmt.selected_columns
                ]
                sql = compiled.string
                if compiled.positional:
                    order = tuple(compiled.positiontup or ())
                else:
                    # psycopg's named style (%(name)s) as its positional one (%s): with a tuple,
                    # psycopg maps no names at each execution.
                    order = tuple(_NAMED.findall(sql))
                    sql = _NAMED.sub("%s", sql)
                found = self._compiled[dialect.name] = (sql, order, binds, results)
        return found

    def rows(self, db: Database, dbapi_conn: Any, params: dict[str, Any]) -> list[Any]:
        """The statement's rows, as named tuples of the selected columns' keys."""
        sql, order, binds, results = self._for(db.engine.dialect)
        for name, proc in binds.items():
            params[name] = proc(params[name])
        args = tuple(params[n] for n in order)
        cur = dbapi_conn.cursor()
        try:
            cur.execute(sql, args)
            fetched = cur.fetchall()
        finally:
            cur.close()
        if not fetched:
            return []
        assert self.row is not None
        if any(results):
            procs = list(enumerate(results))
            return [self.row(*(p(r[i]) if p is not None else r[i] for i, p in procs)) for r in fetched]
        return [self.row(*r) for r in fetched]


class PreparedIn:
    """:class:`Prepared` statements with an ``IN`` list, one per length of the list.

    ``factory(n)`` makes the statement for ``n`` values, bound as ``v0`` … ``v{n-1}``.
    """

    def __init__(self, factory: Callable[[int], Any]) -> None:
        self.factory = factory
        self._by_length: dict[int, Prepared] = {}

    def rows(self, db: Database, dbapi_conn: Any, values: Sequence[Any], params: dict[str, Any]) -> list[Any]:
        prepared = self._by_length.get(len(values))
        if prepared is None:
            prepared = self._by_length.setdefault(len(values), Prepared(self.factory(len(values))))
        return prepared.rows(db, dbapi_conn, {**params, **{f"v{i}": v for i, v in enumerate(values)}})


def _is_disk_full(orig: BaseException | None) -> bool:
    if isinstance(orig, sqlite3.OperationalError):
        # SQLITE_FULL (13); SQLITE_IOERR_SHMSIZE (4874) is a WAL index that cannot grow
        return getattr(orig, "sqlite_errorcode", None) in (13, 4874) or "disk is full" in str(orig)
    # psycopg: SQLSTATE 53100 disk_full
    return getattr(orig, "sqlstate", None) == "53100"


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


def _sqlite_pragmas(dbapi_conn: Any) -> None:
    dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (see _sqlite_begin_immediate)
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def _sqlite_begin_immediate(conn: Connection) -> None:
    conn.exec_driver_sql("BEGIN" if conn.info.get(_READ_ONLY) else "BEGIN IMMEDIATE")
