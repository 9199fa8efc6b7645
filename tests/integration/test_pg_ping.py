"""PostgreSQL: a pooled connection the server dropped is replaced before use when it sat idle."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from opensmc.store import db as dbmod
from opensmc.store.db import Database

pytestmark = pytest.mark.postgres


def test_a_connection_killed_while_idle_is_replaced(pg_database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    db = Database(pg_database.url)
    try:
        with db.connect() as conn:
            pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        with pg_database.connect() as other:
            other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        monkeypatch.setattr(dbmod, "PING_IDLE", 0.0)  # as if it had sat idle past the threshold
        with db.connect() as conn:  # pinged, found dead, replaced: no error
            assert conn.execute(text("SELECT pg_backend_pid()")).scalar_one() != pid
    finally:
        db.dispose()


def test_a_busy_connection_is_not_pinged(pg_database: Database) -> None:
    db = Database(pg_database.url)
    try:
        with db.connect() as conn:
            conn.execute(text("SELECT 1"))
        pinged: list[bool] = []
        real = dbmod._ping_if_idle

        def spy(dbapi_conn: object, record: object, proxy: object) -> None:
            before = dict(record.info)  # type: ignore[attr-defined]
            real(dbapi_conn, record, proxy)
            pinged.append(dbmod._CHECKED_IN not in before or before[dbmod._CHECKED_IN] is None)

        from sqlalchemy import event

        event.remove(db.engine, "checkout", real)
        event.listen(db.engine, "checkout", spy)
        with db.connect() as conn:  # checked in a moment ago: used without a ping
            conn.execute(text("SELECT 1"))
        assert pinged == [False]
    finally:
        db.dispose()
