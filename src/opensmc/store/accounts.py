"""Accounts, AccessKey pairs and signature nonces."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from opensmc.store.tables import access_keys, accounts, nonces


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


def reseal(conn: Connection, key_id: str, secret_enc: str) -> None:
    conn.execute(update(access_keys).where(access_keys.c.id == key_id).values(secret_enc=secret_enc))


def set_key_enabled(conn: Connection, key_id: str, enabled: bool) -> int:
    return conn.execute(update(access_keys).where(access_keys.c.id == key_id).values(enabled=enabled)).rowcount


def delete_access_key(conn: Connection, key_id: str) -> int:
    conn.execute(delete(nonces).where(nonces.c.access_key_id == key_id))
    return conn.execute(delete(access_keys).where(access_keys.c.id == key_id)).rowcount


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
