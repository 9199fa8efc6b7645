"""Tags on sources and jobs, shared by the Describe filters and the Tag actions."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Connection, Select, and_, bindparam, delete, exists, insert, or_, select, update

from opensmc.store.db import Database, PreparedIn
from opensmc.store.tables import jobs, sources, tags


def tags_of(conn: Connection, resource_type: str, ids: Sequence[str]) -> dict[str, list[tuple[str, str]]]:
    """Each resource's (key, value) pairs, in key order."""
    out: dict[str, list[tuple[str, str]]] = {i: [] for i in ids}
    if not ids:
        return out
    rows = conn.execute(
        select(tags.c.resource_id, tags.c.key, tags.c.value)
        .where(tags.c.resource_type == resource_type, tags.c.resource_id.in_(list(ids)))
        .order_by(tags.c.resource_id, tags.c.created_at, tags.c.key)
    )
    for rid, key, value in rows:
        out.setdefault(rid, []).append((key, value))
    return out


def _tags_in(n: int) -> Any:
    ids: list[Any] = [bindparam(f"v{i}") for i in range(n)]
    return (
        select(tags.c.resource_id, tags.c.key, tags.c.value)
        .where(tags.c.resource_type == bindparam("resource_type"), tags.c.resource_id.in_(ids))
        .order_by(tags.c.resource_id, tags.c.created_at, tags.c.key)
    )


_TAGS_IN = PreparedIn(_tags_in)


def tags_of_driver(
    db: Database, dbapi_conn: Any, resource_type: str, ids: Sequence[str]
) -> dict[str, list[tuple[str, str]]]:
    """:func:`tags_of` on a driver connection (:meth:`Database.driver`)."""
    out: dict[str, list[tuple[str, str]]] = {i: [] for i in ids}
    if not ids:
        return out
    for rid, key, value in _TAGS_IN.rows(db, dbapi_conn, ids, {"resource_type": resource_type}):
        out.setdefault(rid, []).append((key, value))
    return out


def put_tags(
    conn: Connection,
    account_id: str,
    resource_type: str,
    resource_id: str,
    pairs: Iterable[tuple[str, str]],
    now: datetime,
) -> None:
    """Add tags; an existing key gets its value overwritten."""
    for key, value in pairs:
        updated = conn.execute(
            update(tags)
            .where(tags.c.resource_type == resource_type, tags.c.resource_id == resource_id, tags.c.key == key)
            .values(value=value)
        ).rowcount
        if not updated:
            conn.execute(
                insert(tags).values(
                    account_id=account_id,
                    resource_type=resource_type,
                    resource_id=resource_id,
                    key=key,
                    value=value,
                    created_at=now,
                )
            )


def remove_tags(conn: Connection, resource_type: str, resource_id: str, keys: Sequence[str] | None) -> None:
    """Remove the named keys, or every tag when `keys` is None."""
    stmt = delete(tags).where(tags.c.resource_type == resource_type, tags.c.resource_id == resource_id)
    if keys is not None:
        stmt = stmt.where(tags.c.key.in_(list(keys)))
    conn.execute(stmt)


def count_keys_after(conn: Connection, resource_type: str, resource_id: str, new_keys: Sequence[str]) -> int:
    """How many tags the resource would have after adding `new_keys`."""
    existing = {
        k
        for (k,) in conn.execute(
            select(tags.c.key).where(tags.c.resource_type == resource_type, tags.c.resource_id == resource_id)
        )
    }
    return len(existing | set(new_keys))


def match_all(
    resource_type: str, id_column: ColumnElement[str], filters: Sequence[tuple[str, str | None]]
) -> ColumnElement[bool] | None:
    """A WHERE clause: the resource has every (key, value) pair; a None value matches any value."""
    clauses: list[ColumnElement[bool]] = []
    for key, value in filters:
        cond = and_(tags.c.resource_type == resource_type, tags.c.resource_id == id_column, tags.c.key == key)
        if value is not None:
            cond = and_(cond, tags.c.value == value)
        clauses.append(exists(select(tags.c.key).where(cond)))
    return and_(*clauses) if clauses else None


def delete_all_for(conn: Connection, resource_type: str, resource_id: str) -> None:
    remove_tags(conn, resource_type, resource_id, None)


def tagged_query(resource_type: str) -> Select[tuple[str, str, str, str]]:
    return select(tags.c.resource_id, tags.c.resource_type, tags.c.key, tags.c.value).where(
        tags.c.resource_type == resource_type
    )


# The Tag actions (TagResources, UntagResources, ListTagResources) -------------


def existing_resources(conn: Connection, account_id: str, resource_type: str, ids: Sequence[str]) -> set[str]:
    """Which of `ids` name a resource of that type in the account (jobs being deleted do not count)."""
    if not ids:
        return set()
    if resource_type == "sourceserver":
        stmt = select(sources.c.id).where(sources.c.account_id == account_id, sources.c.id.in_(list(ids)))
    else:
        stmt = select(jobs.c.id).where(
            jobs.c.account_id == account_id, jobs.c.id.in_(list(ids)), jobs.c.status != "Deleting"
        )
    return {str(r.id) for r in conn.execute(stmt)}


def list_page(
    conn: Connection,
    account_id: str,
    resource_type: str,
    *,
    ids: Sequence[str],
    filters: Sequence[tuple[str, str | None]],
    after: tuple[str, str] | None,
    limit: int,
) -> list[tuple[str, str, str]]:
    """(resource_id, key, value) of every tag of the matching resources, by (resource_id, key).

    A resource matches when it has every filter pair; `after` is the last
    (resource_id, key) already returned (keyset pagination). Returns up to `limit` rows.
    """
    t = tags.alias("t")  # the tag filters' EXISTS subqueries use the plain table
    if resource_type == "sourceserver":
        alive = exists(select(sources.c.id).where(sources.c.id == t.c.resource_id, sources.c.account_id == account_id))
    else:
        alive = exists(
            select(jobs.c.id).where(
                jobs.c.id == t.c.resource_id, jobs.c.account_id == account_id, jobs.c.status != "Deleting"
            )
        )
    stmt = select(t.c.resource_id, t.c.key, t.c.value).where(
        t.c.account_id == account_id, t.c.resource_type == resource_type, alive
    )
    if ids:
        stmt = stmt.where(t.c.resource_id.in_(list(ids)))
    clause = match_all(resource_type, t.c.resource_id, filters)
    if clause is not None:
        stmt = stmt.where(clause)
    if after is not None:
        rid, key = after
        stmt = stmt.where(or_(t.c.resource_id > rid, and_(t.c.resource_id == rid, t.c.key > key)))
    rows = conn.execute(stmt.order_by(t.c.resource_id, t.c.key).limit(limit))
    return [(str(r.resource_id), str(r.key), str(r.value)) for r in rows]
