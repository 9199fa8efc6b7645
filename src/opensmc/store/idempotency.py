"""ClientToken idempotency: the first result of (account, action, token) is the result."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Connection, insert, select

from opensmc.store.tables import idempotency


def lookup(conn: Connection, account_id: str, action: str, token: str) -> tuple[str, str] | None:
    """(params_hash, result_id) recorded for the token, or None."""
    row = conn.execute(
        select(idempotency.c.params_hash, idempotency.c.result_id).where(
            idempotency.c.account_id == account_id,
            idempotency.c.action == action,
            idempotency.c.client_token == token,
        )
    ).first()
    return (row.params_hash, row.result_id) if row else None


def record(
    conn: Connection,
    account_id: str,
    action: str,
    token: str,
    params_hash: str,
    result_id: str,
    now: datetime,
) -> None:
    conn.execute(
        insert(idempotency).values(
            account_id=account_id,
            action=action,
            client_token=token,
            params_hash=params_hash,
            result_id=result_id,
            created_at=now,
        )
    )
