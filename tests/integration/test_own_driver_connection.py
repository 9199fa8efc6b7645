"""A thread that keeps its own PostgreSQL driver connection (the API's read lane): reused, healed, closed.

``keep_driver_connection`` makes ``Database.driver()`` on that thread hand
out one autocommit connection of its own instead of a pooled one; a
connection the server dropped is replaced, and ``dispose`` closes it.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import text

from opensmc.store import db as db_module
from opensmc.store.db import Database, keep_driver_connection

pytestmark = pytest.mark.postgres


@pytest.fixture
def pg(pg_database: Database) -> Iterator[Database]:
    db = Database(pg_database.url)  # a process of its own: its own pool and its own connections
    yield db
    db.dispose()


@pytest.fixture
def lane() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=1, initializer=keep_driver_connection) as executor:
        yield executor


def _use(db: Database) -> tuple[Any, int, bool]:
    with db.driver() as conn:
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        return conn, int(pid), bool(conn.autocommit)


def test_the_thread_reuses_one_autocommit_connection_and_others_use_the_pool(
    pg: Database, lane: ThreadPoolExecutor
) -> None:
    first, pid1, auto1 = lane.submit(_use, pg).result()
    second, pid2, auto2 = lane.submit(_use, pg).result()
    assert first is second and pid1 == pid2 and auto1 and auto2
    pooled, pid3, _auto = _use(pg)  # this thread keeps none
    assert pooled is not first and pid3 != pid1
    assert not pooled.autocommit  # a pooled connection is given back as the pool's other users expect it


def test_a_connection_the_server_dropped_is_replaced(
    pg: Database, pg_database: Database, lane: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    _conn, pid, _auto = lane.submit(_use, pg).result()
    with pg_database.connect() as admin:
        admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    monkeypatch.setattr(db_module, "PING_IDLE", 0.0)  # idle long enough to be pinged before use
    _conn2, pid2, _auto = lane.submit(_use, pg).result()
    assert pid2 != pid
    # Dropped while in use (no ping: it was used a moment ago): that use fails, the next one works.
    monkeypatch.setattr(db_module, "PING_IDLE", 3600.0)
    with pg_database.connect() as admin:
        admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid2})
    with pytest.raises(Exception):  # noqa: B017 - psycopg's OperationalError, whatever its subclass
        lane.submit(_use, pg).result()
    _conn3, pid3, _auto = lane.submit(_use, pg).result()
    assert pid3 not in (pid, pid2)


def test_dispose_closes_the_kept_connections(pg: Database, lane: ThreadPoolExecutor) -> None:
    conn, _pid, _auto = lane.submit(_use, pg).result()
    pg.dispose()
    assert conn.closed
