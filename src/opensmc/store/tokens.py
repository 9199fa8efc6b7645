"""Activation codes (access tokens): rows in ``access_tokens``.

Only a salted hash of the code is stored; the code itself is shown once by
CreateAccessToken. Whether a code is expired depends on its own
TimeToLiveInDays, so status filtering happens in the service layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row, delete, insert, select, update

from opensmc.store.tables import access_tokens


def insert_token(
    conn: Connection,
    *,
    token_id: str,
    account_id: str,
    name: str,
    description: str,
    code_hash: str,
    count: int,
    ttl_days: int,
    now: datetime,
) -> None:
    conn.execute(
        insert(access_tokens).values(
            id=token_id,
            account_id=account_id,
            name=name,
            description=description,
            code_hash=code_hash,
            count=count,
            registered_count=0,
            ttl_days=ttl_days,
            disabled=False,
            created_at=now,
        )
    )


def get_token(conn: Connection, token_id: str, account_id: str | None = None) -> Row[Any] | None:
    """One token; with `account_id` only if that account owns it (registration looks it up by ID alone)."""
    stmt = select(access_tokens).where(access_tokens.c.id == token_id)
    if account_id is not None:
        stmt = stmt.where(access_tokens.c.account_id == account_id)
    return conn.execute(stmt).first()


def list_tokens(conn: Connection, account_id: str, ids: Sequence[str], name: str | None) -> list[Row[Any]]:
    stmt = select(access_tokens).where(access_tokens.c.account_id == account_id)
    if ids:
        stmt = stmt.where(access_tokens.c.id.in_(list(ids)))
    if name is not None:
        stmt = stmt.where(access_tokens.c.name == name)
    return list(conn.execute(stmt.order_by(access_tokens.c.created_at.desc(), access_tokens.c.id)))


def delete_token(conn: Connection, account_id: str, token_id: str) -> int:
    return conn.execute(
        delete(access_tokens).where(access_tokens.c.id == token_id, access_tokens.c.account_id == account_id)
    ).rowcount


def disable_token(conn: Connection, account_id: str, token_id: str) -> int:
    return conn.execute(
        update(access_tokens)
        .where(access_tokens.c.id == token_id, access_tokens.c.account_id == account_id)
        .values(disabled=True)
    ).rowcount


def claim_registration(conn: Connection, token_id: str) -> bool:
    """Count one more registered source, if the code still has room and is enabled (a guarded UPDATE)."""
    return bool(
        conn.execute(
            update(access_tokens)
            .where(
                access_tokens.c.id == token_id,
                access_tokens.c.disabled.is_(False),
                access_tokens.c.registered_count < access_tokens.c.count,
            )
            .values(registered_count=access_tokens.c.registered_count + 1)
        ).rowcount
    )
