"""Accounts, AccessKey pairs and signature nonces."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row, delete, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite

from opensmc.store.db import Database
from opensmc.store.tables import access_keys, accounts, keys_version, nonces


def count_accounts(conn: Connection) -> int:
    return int(conn.execute(select(func.count()).select_from(accounts)).scalar_one())


def create_account(conn: Connection, account_id: str, name: str, now: datetime) -> None:
    conn.execute(insert(accounts).values(id=account_id, name=name, created_at=now))


def get_account(conn: Connection, account_id: str) -> Row[Any] | None:
    return conn.execute(select(accounts).where(accounts.c.id == account_id)).first()


def list_accounts(conn: Connection) -> list[Row[Any]]:
    return list(conn.execute(select(accounts).order_by(accounts.c.created_at, accounts.c.id)))


def add_access_key(
    conn: Connection, key_id: str, account_id: str, secret_enc: str, now: datetime, policy: str = "FullAccess"
) -> None:
    conn.execute(
        insert(access_keys).values(
            id=key_id, account_id=account_id, secret_enc=secret_enc, enabled=True, created_at=now, policy=policy
        )
    )


def get_access_key(conn: Connection, key_id: str) -> tuple[str, str, str] | None:
    """(account_id, sealed secret, policy) of an enabled key, or None."""
    row = conn.execute(
        select(access_keys.c.account_id, access_keys.c.secret_enc, access_keys.c.policy).where(
            access_keys.c.id == key_id, access_keys.c.enabled.is_(True)
        )
    ).first()
    return (row.account_id, row.secret_enc, row.policy) if row else None


def list_access_keys(conn: Connection, account_id: str | None = None) -> list[Row[Any]]:
    """Keys without their secrets, oldest first; of one account, or all."""
    cols = (access_keys.c.id, access_keys.c.account_id, access_keys.c.enabled, access_keys.c.policy,
            access_keys.c.created_at)  # fmt: skip
    query = select(*cols).order_by(access_keys.c.created_at, access_keys.c.id)
    if account_id is not None:
        query = query.where(access_keys.c.account_id == account_id)
    return list(conn.execute(query))


def all_sealed_secrets(conn: Connection) -> list[tuple[str, str]]:
    """(key id, sealed secret) of every key, locked for re-sealing under a new master key."""
    rows = conn.execute(select(access_keys.c.id, access_keys.c.secret_enc).with_for_update())
    return [(r.id, r.secret_enc) for r in rows]


# Each change that must stop a key from verifying bumps keys_version in its own transaction,
# so that every process's verified-key cache drops the key at its next request.


def reseal(conn: Connection, key_id: str, secret_enc: str) -> None:
    conn.execute(update(access_keys).where(access_keys.c.id == key_id).values(secret_enc=secret_enc))
    bump_keys_version(conn)


def set_key_enabled(conn: Connection, key_id: str, enabled: bool) -> int:
    n = conn.execute(update(access_keys).where(access_keys.c.id == key_id).values(enabled=enabled)).rowcount
    bump_keys_version(conn)
    return n


def delete_access_key(conn: Connection, key_id: str) -> int:
    conn.execute(delete(nonces).where(nonces.c.access_key_id == key_id))
    n = conn.execute(delete(access_keys).where(access_keys.c.id == key_id)).rowcount
    bump_keys_version(conn)
    return n


def _driver_sql(conn: Connection, sql: str) -> str:
    """``?`` placeholders in the driver's own style (sqlite3: ``?``; psycopg: ``%s``)."""
    return sql if conn.dialect.paramstyle == "qmark" else sql.replace("?", "%s")


# The two statements every signed request runs go to the driver as plain SQL: building and
# compiling them with SQLAlchemy cost more than running them (bench/bench_api.py).
_REMEMBER_NONCE = (
    "INSERT INTO nonces (access_key_id, nonce, seen_at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING RETURNING nonce"
)
_KEYS_VERSION = "SELECT version FROM keys_version WHERE id = 1"


def remember_nonce(conn: Connection, key_id: str, nonce: str, now: datetime) -> bool:
    """Record a nonce; False when it was seen already (a replay).

    One statement (INSERT ... ON CONFLICT DO NOTHING), no savepoint: the primary
    key decides, across every process that shares the database. RETURNING rather
    than rowcount: psycopg reports no rowcount for it.
    """
    to_db = nonces.c.seen_at.type.bind_processor(conn.dialect)  # the column's own storage format
    seen = to_db(now) if to_db is not None else now
    found = conn.exec_driver_sql(_driver_sql(conn, _REMEMBER_NONCE), (key_id, nonce, seen)).first()
    return found is not None


#: rows per INSERT of :func:`remember_nonces` (3 parameters each: well under SQLite's 32,766)
NONCE_BATCH_MAX = 500
_REMEMBER_NONCES = (
    "INSERT INTO nonces (access_key_id, nonce, seen_at) VALUES {} ON CONFLICT DO NOTHING RETURNING access_key_id, nonce"
)


def remember_nonces(conn: Connection, claims: Sequence[tuple[str, str]], now: datetime) -> set[tuple[str, str]]:
    """Record many (key id, nonce) pairs in one statement; the pairs this statement inserted.

    A pair not returned was recorded already (a replay), by any process that
    shares the database: the primary key decides, as in :func:`remember_nonce`.
    The pairs must be distinct and at most :data:`NONCE_BATCH_MAX`.
    """
    if not claims:
        return set()
    to_db = nonces.c.seen_at.type.bind_processor(conn.dialect)
    seen = to_db(now) if to_db is not None else now
    sql = _driver_sql(conn, _REMEMBER_NONCES.format(", ".join(["(?, ?, ?)"] * len(claims))))
    args: list[Any] = []
    for key_id, nonce in claims:
        args += (key_id, nonce, seen)
    return {(str(k), str(n)) for k, n in conn.exec_driver_sql(sql, tuple(args))}


# The nonces of a batch of requests with the keys_version check, as one statement on PostgreSQL: in
# autocommit it is its own transaction, one round trip instead of four (BEGIN, the version, the
# insert, COMMIT). The version and the insert share the statement's snapshot, as they shared the
# transaction before; the v row always exists (an aggregate), so the version comes back even when
# nothing was inserted.
_CLAIM_NONCES_PG = """WITH v AS (SELECT COALESCE(MAX(version), 0) AS version FROM keys_version WHERE id = 1),
ins AS (
  INSERT INTO nonces (access_key_id, nonce, seen_at)
  SELECT c.k, c.n, %s::timestamptz FROM (VALUES {}) AS c(k, n, kv), v
  WHERE c.kv IS NULL OR c.kv = v.version
  ON CONFLICT DO NOTHING
  RETURNING access_key_id, nonce)
SELECT v.version, ins.access_key_id, ins.nonce FROM v LEFT JOIN ins ON true"""


def claim_nonces(
    db: Database, claims: Sequence[tuple[str, str, int | None]], now: datetime
) -> tuple[int, set[tuple[str, str]]]:
    """Record the (key id, nonce) of each claim made at the current keys_version (or with None).

    Returns that keys_version and the pairs inserted; a pair made at the
    version but not inserted was recorded already (a replay), by any process:
    the primary key decides, as in :func:`remember_nonce`. One transaction on
    the driver's connection (:meth:`Database.driver_begin`; on PostgreSQL one
    autocommit statement). The pairs must be distinct, at most
    :data:`NONCE_BATCH_MAX`, and hold no NUL.
    """
    if not db.is_sqlite:
        sql = _CLAIM_NONCES_PG.format(", ".join(["(%s, %s, %s::bigint)"] * len(claims)))
        args: list[Any] = [now]
        for key_id, nonce, key_version in claims:
            args += (key_id, nonce, key_version)
        with db.driver() as dbapi_conn:
            cur = dbapi_conn.cursor()
            try:
                rows = cur.execute(sql, args).fetchall()
            finally:
                cur.close()
        return int(rows[0][0]), {(str(k), str(n)) for _v, k, n in rows if k is not None}
    with db.driver_begin() as dbapi_conn:
        found = dbapi_conn.execute(_KEYS_VERSION).fetchone()
        version = int(found[0]) if found is not None else 0
        fresh = [(k, n) for k, n, kv in claims if kv is None or kv == version]
        if not fresh:
            return version, set()
        to_db = nonces.c.seen_at.type.dialect_impl(db.engine.dialect).bind_processor(db.engine.dialect)
        seen = to_db(now) if to_db is not None else now
        sql = _REMEMBER_NONCES.format(", ".join(["(?, ?, ?)"] * len(fresh)))
        flat: list[Any] = []
        for key_id, nonce in fresh:
            flat += (key_id, nonce, seen)
        return version, {(str(k), str(n)) for k, n in dbapi_conn.execute(sql, flat).fetchall()}


def nonce_used(conn: Connection, key_id: str, nonce: str) -> bool:
    """Whether a nonce is recorded (read-only: for a database that cannot take the insert)."""
    stmt = select(nonces.c.nonce).where(nonces.c.access_key_id == key_id, nonces.c.nonce == nonce)
    return conn.execute(stmt).first() is not None


def get_keys_version(conn: Connection) -> int:
    """The AccessKey change counter (0 on a database migrated before anything changed)."""
    found = conn.exec_driver_sql(_KEYS_VERSION).first()
    return int(found[0]) if found is not None else 0


def bump_keys_version(conn: Connection) -> None:
    """Call in the same transaction as any change that must stop a key from verifying.

    Disabling, deleting or re-sealing an AccessKey must bump it: every process's
    verified-key cache (``service/keycache.py``) compares it, inside the request's
    nonce transaction, with the version its cached entry was read at, and drops
    the entry on a difference, so the change takes effect at the next request
    everywhere.
    """
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    # An upsert: the row is made by the migration, but a table emptied by hand must not turn
    # every later bump into a no-op (the caches would never see a change again).
    stmt = dialect.insert(keys_version).values(id=1, version=1)
    conn.execute(
        stmt.on_conflict_do_update(index_elements=[keys_version.c.id], set_={"version": keys_version.c.version + 1})
    )


def forget_nonces_before(conn: Connection, cutoff: datetime) -> int:
    return conn.execute(delete(nonces).where(nonces.c.seen_at < cutoff)).rowcount
