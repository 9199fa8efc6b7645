"""Accounts, AccessKey pairs and signature nonces."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Connection, delete, func, insert, select
from sqlalchemy.dialects import postgresql, sqlite

from opensmc.store.tables import access_keys, accounts, keys_version, nonces


def count_accounts(conn: Connection) -> int:
    return int(conn.execute(select(func.count()).select_from(accounts)).scalar_one())


def create_account(conn: Connection, account_id: str, name: str, now: datetime) -> None:
    conn.execute(insert(accounts).values(id=account_id, name=name, created_at=now))


def add_access_key(conn: Connection, key_id: str, account_id: str, secret_enc: str, now: datetime) -> None:
    conn.execute(
        insert(access_keys).values(
            id=key_id, account_id=account_id, secret_enc=secret_enc, enabled=True, created_at=now
        )
    )


def get_access_key(conn: Connection, key_id: str) -> tuple[str, str] | None:
    """(account_id, sealed secret) of an enabled key, or None."""
    row = conn.execute(
        select(access_keys.c.account_id, access_keys.c.secret_enc).where(
            access_keys.c.id == key_id, access_keys.c.enabled.is_(True)
        )
    ).first()
    return (row.account_id, row.secret_enc) if row else None


def remember_nonce(conn: Connection, key_id: str, nonce: str, now: datetime) -> bool:
    """Record a nonce; False when it was seen already (a replay).

    One statement (INSERT ... ON CONFLICT DO NOTHING), no savepoint: the primary
    key decides, across every process that shares the database.
    """
    values = {"access_key_id": key_id, "nonce": nonce, "seen_at": now}
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    # RETURNING rather than rowcount: psycopg reports no rowcount for a conflicting-or-not insert.
    stmt = dialect.insert(nonces).values(**values).on_conflict_do_nothing().returning(nonces.c.nonce)
    return conn.execute(stmt).first() is not None


def get_keys_version(conn: Connection) -> int:
    """The AccessKey change counter (0 on a database migrated before anything changed)."""
    return int(conn.execute(select(keys_version.c.version).where(keys_version.c.id == 1)).scalar_one_or_none() or 0)


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
