"""Image records: one row per image a job run made (the bytes live in the image store).

A row is written in state ``Creating`` before the image store is touched and
becomes ``Available`` once the image is made (and verified): a process killed
in between leaves a row that says which store entry to clean up, never an
image nobody knows about. Readers see only finished images.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row, delete, func, insert, select, update

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
    state: str = "Available",
) -> None:
    conn.execute(
        insert(images).values(
            id=image_id,
            account_id=account_id,
            job_id=job_id,
            run_id=run_id,
            name=name,
            state=state,
            created_at=now,
            manifest=manifest,
        )
    )


CREATING = "Creating"


def set_image(conn: Connection, image_id: str, **values: Any) -> None:
    conn.execute(update(images).where(images.c.id == image_id).values(**values))


def creating_of_job(conn: Connection, job_id: str) -> list[str]:
    """Images of a job left half-made by a process that died while making them."""
    rows = conn.execute(select(images.c.id).where(images.c.job_id == job_id, images.c.state == CREATING))
    return [r for (r,) in rows]


def get_image(conn: Connection, image_id: str, account_id: str | None = None) -> Row[Any] | None:
    stmt = select(images).where(images.c.id == image_id, images.c.state != CREATING)
    if account_id is not None:
        stmt = stmt.where(images.c.account_id == account_id)
    return conn.execute(stmt).first()


def images_of_job(conn: Connection, job_id: str) -> list[Row[Any]]:
    """A job's images, oldest first: by run (two runs can finish within the second that
    ``created_at`` keeps, and rotation must never take the newer for the older)."""
    return list(
        conn.execute(
            select(images)
            .where(images.c.job_id == job_id, images.c.state != CREATING)
            .order_by(func.coalesce(images.c.run_id, 0), images.c.created_at, images.c.id)
        )
    )


def list_images(conn: Connection, account_id: str) -> list[Row[Any]]:
    return list(
        conn.execute(
            select(images)
            .where(images.c.account_id == account_id, images.c.state != CREATING)
            .order_by(images.c.created_at, images.c.id)
        )
    )


def recorded_ids(conn: Connection) -> set[str]:
    """The id of every image row, in any state (one being made included)."""
    return {r for (r,) in conn.execute(select(images.c.id))}


def remove_image(conn: Connection, image_id: str) -> None:
    conn.execute(delete(images).where(images.c.id == image_id))


def mark_disks_verified(conn: Connection, image_id: str, positions: Iterable[int], now: datetime) -> None:
    """Record in the image's manifest JSON that these disks were read back whole and matched every hash."""
    row = conn.execute(select(images.c.manifest).where(images.c.id == image_id).with_for_update()).first()
    if row is None:
        return
    try:
        doc = json.loads(row.manifest or "{}")
    except ValueError:
        doc = {}
    if not isinstance(doc, dict):
        return
    doc["verified_disks"] = sorted(set(doc.get("verified_disks") or []) | set(positions))
    doc["verified_at"] = now.isoformat()
    conn.execute(update(images).where(images.c.id == image_id).values(manifest=json.dumps(doc, sort_keys=True)))
