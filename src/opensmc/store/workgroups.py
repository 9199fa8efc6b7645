"""Workgroups and their membership (the `sources.workgroup_id` column).

A source in state Deleting no longer counts as a member: it is on its way
out, so it neither blocks DeleteWorkgroup nor uses up the workgroup's quota.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row, delete, func, insert, select, update

from opensmc.domain.enums import JobStatus, SourceState
from opensmc.store import tags as tag_store
from opensmc.store.tables import accounts, jobs, sources, workgroups

#: the tags table's resource_type for workgroups (sources and jobs use domain.enums.ResourceType)
TAG_TYPE = "workgroup"


@dataclass(frozen=True)
class MemberJob:
    """A member source and the status of its latest job (None: the source has no job)."""

    source_id: str
    status: str | None
    business_status: str
    final_run: bool
    has_run: bool


def lock_account(conn: Connection, account_id: str) -> None:
    """Serialize workgroup creation per account (quota and name checks); SQLite locks anyway."""
    conn.execute(select(accounts.c.id).where(accounts.c.id == account_id).with_for_update())


def insert_workgroup(conn: Connection, account_id: str, wg_id: str, name: str, description: str, now: datetime) -> None:
    conn.execute(
        insert(workgroups).values(id=wg_id, account_id=account_id, name=name, description=description, created_at=now)
    )


def get(conn: Connection, account_id: str, wg_id: str, *, for_update: bool = False) -> Row[Any] | None:
    stmt = select(workgroups).where(workgroups.c.account_id == account_id, workgroups.c.id == wg_id)
    if for_update:
        stmt = stmt.with_for_update()
    return conn.execute(stmt).first()


def id_by_name(conn: Connection, account_id: str, name: str) -> str | None:
    row = conn.execute(
        select(workgroups.c.id).where(workgroups.c.account_id == account_id, workgroups.c.name == name)
    ).first()
    return str(row.id) if row else None


def count(conn: Connection, account_id: str) -> int:
    return int(
        conn.execute(
            select(func.count()).select_from(workgroups).where(workgroups.c.account_id == account_id)
        ).scalar_one()
    )


def update_attrs(conn: Connection, account_id: str, wg_id: str, values: dict[str, str]) -> None:
    if values:
        conn.execute(
            update(workgroups).where(workgroups.c.account_id == account_id, workgroups.c.id == wg_id).values(**values)
        )


def delete_workgroup(conn: Connection, account_id: str, wg_id: str) -> None:
    # Sources still pointing here are Deleting ones (members block the delete); let go of them.
    conn.execute(
        update(sources)
        .where(sources.c.account_id == account_id, sources.c.workgroup_id == wg_id)
        .values(workgroup_id="")
    )
    tag_store.delete_all_for(conn, TAG_TYPE, wg_id)
    conn.execute(delete(workgroups).where(workgroups.c.account_id == account_id, workgroups.c.id == wg_id))


def search(
    conn: Connection,
    account_id: str,
    *,
    ids: Sequence[str],
    name: str | None,
    tag_filters: Sequence[tuple[str, str | None]],
) -> list[Row[Any]]:
    """Every workgroup matching the filters, newest first (status is filtered by the caller)."""
    stmt = select(workgroups).where(workgroups.c.account_id == account_id)
    if ids:
        stmt = stmt.where(workgroups.c.id.in_(list(ids)))
    if name:
        stmt = stmt.where(workgroups.c.name == name)
    clause = tag_store.match_all(TAG_TYPE, workgroups.c.id, tag_filters)
    if clause is not None:
        stmt = stmt.where(clause)
    return list(conn.execute(stmt.order_by(workgroups.c.created_at.desc(), workgroups.c.id)))


# membership ---------------------------------------------------------------


def member_ids(conn: Connection, account_id: str, wg_id: str) -> list[str]:
    rows = conn.execute(
        select(sources.c.id)
        .where(
            sources.c.account_id == account_id,
            sources.c.workgroup_id == wg_id,
            sources.c.state != SourceState.DELETING.value,
        )
        .order_by(sources.c.id)
    )
    return [str(r.id) for r in rows]


def sources_by_id(conn: Connection, account_id: str, ids: Sequence[str]) -> dict[str, tuple[str, str]]:
    """(state, workgroup_id) of each of `ids` the account owns."""
    rows = conn.execute(
        select(sources.c.id, sources.c.state, sources.c.workgroup_id).where(
            sources.c.account_id == account_id, sources.c.id.in_(list(ids))
        )
    )
    return {str(r.id): (str(r.state), str(r.workgroup_id)) for r in rows}


def set_membership(conn: Connection, account_id: str, ids: Sequence[str], *, expect: Sequence[str], to: str) -> int:
    """Set workgroup_id for sources whose workgroup_id is one of `expect`; returns rows changed."""
    return int(
        conn.execute(
            update(sources)
            .where(
                sources.c.account_id == account_id,
                sources.c.id.in_(list(ids)),
                sources.c.workgroup_id.in_(list(expect)),
            )
            .values(workgroup_id=to)
        ).rowcount
    )


def members_with_jobs(conn: Connection, account_id: str, wg_ids: Sequence[str]) -> dict[str, list[MemberJob]]:
    """For each workgroup, its member sources with their latest (non-Deleting) job."""
    out: dict[str, list[MemberJob]] = {w: [] for w in wg_ids}
    if not wg_ids:
        return out
    members = conn.execute(
        select(sources.c.id, sources.c.workgroup_id)
        .where(
            sources.c.account_id == account_id,
            sources.c.workgroup_id.in_(list(wg_ids)),
            sources.c.state != SourceState.DELETING.value,
        )
        .order_by(sources.c.id)
    ).all()
    if not members:
        return out
    latest: dict[str, Any] = {}
    job_rows = conn.execute(
        select(
            jobs.c.source_id,
            jobs.c.status,
            jobs.c.business_status,
            jobs.c.final_run,
            jobs.c.has_run,
        )
        .where(
            jobs.c.account_id == account_id,
            jobs.c.source_id.in_([m.id for m in members]),
            jobs.c.status != JobStatus.DELETING.value,
        )
        .order_by(jobs.c.created_at, jobs.c.id)
    )
    for r in job_rows:
        latest[str(r.source_id)] = r  # ordered oldest first: the last one wins
    for m in members:
        job = latest.get(str(m.id))
        out[str(m.workgroup_id)].append(
            MemberJob(
                source_id=str(m.id),
                status=str(job.status) if job else None,
                business_status=str(job.business_status) if job else "",
                final_run=bool(job.final_run) if job else False,
                has_run=bool(job.has_run) if job else False,
            )
        )
    return out
