"""Accounts, AccessKey pairs and signature nonces."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Connection, delete, func, insert, select
from sqlalchemy.exc import IntegrityError

from opensmc.store.tables import access_keys, accounts, nonces


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
    """Record a nonce; False when it was seen already (a replay)."""
    try:
        with conn.begin_nested():
            conn.execute(insert(nonces).values(access_key_id=key_id, nonce=nonce, seen_at=now))
    except IntegrityError:
        return False
    return True


def forget_nonces_before(conn: Connection, cutoff: datetime) -> int:
    return conn.execute(delete(nonces).where(nonces.c.seen_at < cutoff)).rowcount
