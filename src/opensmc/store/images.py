"""Image records: one row per image a job run made (the bytes live in the image store)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row, delete, insert, select

from opensmc.store.tables import images


def name_taken(conn: Connection, account_id: str, name: str) -> bool:
    return (
        conn.execute(select(images.c.id).where(images.c.account_id == account_id, images.c.name == name)).first()
        is not None
    )


def add_image(
    conn: Connection,
    *,
    image_id: str,
    account_id: str,
    job_id: str,
    run_id: int | None,
    name: str,
    manifest: str,
    now: datetime,
) -> None:
    conn.execute(
        insert(images).values(
            id=image_id,
            account_id=account_id,
            job_id=job_id,
            run_id=run_id,
            name=name,
            state="Available",
            created_at=now,
            manifest=manifest,
        )
    )


def get_image(conn: Connection, image_id: str, account_id: str | None = None) -> Row[Any] | None:
    stmt = select(images).where(images.c.id == image_id)
    if account_id is not None:
        stmt = stmt.where(images.c.account_id == account_id)
    return conn.execute(stmt).first()


def images_of_job(conn: Connection, job_id: str) -> list[Row[Any]]:
    """A job's images, oldest first."""
    return list(
        conn.execute(select(images).where(images.c.job_id == job_id).order_by(images.c.created_at, images.c.id))
    )


def list_images(conn: Connection, account_id: str) -> list[Row[Any]]:
    return list(
        conn.execute(select(images).where(images.c.account_id == account_id).order_by(images.c.created_at, images.c.id))
    )


def remove_image(conn: Connection, image_id: str) -> None:
    conn.execute(delete(images).where(images.c.id == image_id))
