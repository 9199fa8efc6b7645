"""Replication jobs, their runs and events: the queries and the guarded transitions.

Every status change goes through :func:`transition`: it locks the row (FOR
UPDATE on PostgreSQL; SQLite's BEGIN IMMEDIATE already serialises writers),
checks the move against ``domain/transitions.py``, performs it as an UPDATE
guarded by the allowed source states, and writes a ``job_events`` row in the
same transaction. The few source columns a job owns while it runs
(``state`` Available↔InUse and ``job_id``) are changed here too, guarded the
same way, so a job and its source never disagree after a commit.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Row,
    and_,
    delete,
    func,
    insert,
    or_,
    select,
    update,
)

from opensmc.domain.enums import BusinessStatus, JobStatus, ResourceType, SourceState
from opensmc.domain.errors import InvalidJobStatus, NotFound
from opensmc.domain.transitions import TRANSITIONS, JobEvent, State, describe, next_state
from opensmc.store import tags as tagq
from opensmc.store.db import log_on_commit
from opensmc.store.tables import job_events, job_runs, jobs, sources

log = logging.getLogger("opensmc.jobs")

JOB_RTYPE = ResourceType.REPLICATION_JOB.value


def job_not_found(job_id: str) -> NotFound:
    return NotFound("JobId", job_id, code="InvalidJobId.NotFound")


def state_of(row: Row[Any]) -> State:
    return (JobStatus(row.status), BusinessStatus(row.business_status))


# reads ------------------------------------------------------------------------


def get_job(conn: Connection, job_id: str, account_id: str | None = None, *, lock: bool = False) -> Row[Any]:
    """The job row, or InvalidJobId.NotFound; `account_id` None means any account (data plane)."""
    stmt = select(jobs).where(jobs.c.id == job_id)
    if account_id is not None:
        stmt = stmt.where(jobs.c.account_id == account_id)
    if lock:
        stmt = stmt.with_for_update()
    row = conn.execute(stmt).first()
    if row is None:
        raise job_not_found(job_id)
    return row


def lock_if_still(conn: Connection, job_id: str, where: ColumnElement[bool], *, skip_locked: bool) -> Row[Any] | None:
    """The job row locked for this transaction if it still matches `where`, else None.

    With `skip_locked` (PostgreSQL) a row another orchestrator holds is skipped
    rather than waited for.
    """
    stmt = select(jobs).where(jobs.c.id == job_id, where).with_for_update(skip_locked=skip_locked)
    return conn.execute(stmt).first()


def get_source(conn: Connection, source_id: str, account_id: str, *, lock: bool = False) -> Row[Any]:
    stmt = select(sources).where(sources.c.id == source_id, sources.c.account_id == account_id)
    if lock:
        stmt = stmt.with_for_update()
    row = conn.execute(stmt).first()
    if row is None:
        raise NotFound("SourceId", source_id, code="InvalidSourceId.NotFound")
    return row


def source_state(conn: Connection, source_id: str) -> tuple[str, str] | None:
    """(state, job_id) of a source, None if it is gone."""
    row = conn.execute(select(sources.c.state, sources.c.job_id).where(sources.c.id == source_id)).first()
    return (row.state, row.job_id) if row else None


def name_owner(conn: Connection, account_id: str, name: str) -> str | None:
    return conn.execute(
        select(jobs.c.id).where(jobs.c.account_id == account_id, jobs.c.name == name)
    ).scalar_one_or_none()


def count_jobs(conn: Connection, account_id: str) -> int:
    return int(conn.execute(select(func.count()).select_from(jobs).where(jobs.c.account_id == account_id)).scalar_one())


def unfinished_job_of(conn: Connection, source_id: str, statuses: Sequence[str]) -> tuple[str, str] | None:
    """(id, status) of the source's unfinished job, if any."""
    row = conn.execute(
        select(jobs.c.id, jobs.c.status).where(jobs.c.source_id == source_id, jobs.c.status.in_(list(statuses)))
    ).first()
    return (row.id, row.status) if row else None


def open_run(conn: Connection, job_id: str) -> Row[Any] | None:
    """The job's run that has not ended, if any."""
    return conn.execute(
        select(job_runs)
        .where(job_runs.c.job_id == job_id, job_runs.c.end_time.is_(None))
        .order_by(job_runs.c.id.desc())
    ).first()


def runs_of(conn: Connection, job_ids: Sequence[str]) -> dict[str, list[Row[Any]]]:
    out: dict[str, list[Row[Any]]] = {i: [] for i in job_ids}
    if job_ids:
        for row in conn.execute(select(job_runs).where(job_runs.c.job_id.in_(list(job_ids))).order_by(job_runs.c.id)):
            out[row.job_id].append(row)
    return out


def workgroups_of(conn: Connection, source_ids: Sequence[str]) -> dict[str, str]:
    ids = [s for s in set(source_ids) if s]
    if not ids:
        return {}
    rows = conn.execute(select(sources.c.id, sources.c.workgroup_id).where(sources.c.id.in_(ids)))
    return {r.id: r.workgroup_id for r in rows}


@dataclass(frozen=True)
class JobFilter:
    account_id: str
    job_ids: Sequence[str] = ()
    source_ids: Sequence[str] = ()
    instance_ids: Sequence[str] = ()
    name: str | None = None
    status: str | None = None
    business_status: str | None = None
    job_type: int | None = None
    region_id: str | None = None
    resource_group_id: str | None = None
    tags: Sequence[tuple[str, str | None]] = ()


def list_jobs(conn: Connection, f: JobFilter, page_number: int, page_size: int) -> tuple[int, list[Row[Any]]]:
    """(TotalCount, the page's rows), newest first."""
    conds: list[ColumnElement[bool]] = [jobs.c.account_id == f.account_id]
    if f.job_ids:
        conds.append(jobs.c.id.in_(list(f.job_ids)))
    if f.source_ids:
        conds.append(jobs.c.source_id.in_(list(f.source_ids)))
    if f.instance_ids:
        conds.append(jobs.c.instance_id.in_(list(f.instance_ids)))
    if f.name is not None:
        conds.append(jobs.c.name == f.name)
    if f.status is not None:
        conds.append(jobs.c.status == f.status)
    if f.business_status is not None:
        conds.append(jobs.c.business_status == f.business_status)
    if f.job_type is not None:
        conds.append(jobs.c.job_type == f.job_type)
    if f.region_id is not None:
        conds.append(jobs.c.region_id == f.region_id)
    if f.resource_group_id is not None:
        conds.append(jobs.c.resource_group_id == f.resource_group_id)
    tag_clause = tagq.match_all(JOB_RTYPE, jobs.c.id, f.tags)
    if tag_clause is not None:
        conds.append(tag_clause)
    where = and_(*conds)
    # Two statements, both served by an index that leads with account_id (tables.py): the count
    # reads the index only, and the page walks ix_jobs_account_created in its order and stops at
    # LIMIT. (COUNT(*) OVER () in the page would read and sort every match: slower with 10,000.)
    total = int(conn.execute(select(func.count()).select_from(jobs).where(where)).scalar_one())
    rows = list(
        conn.execute(
            select(jobs)
            .where(where)
            .order_by(jobs.c.created_at.desc(), jobs.c.id)
            .limit(page_size)
            .offset((page_number - 1) * page_size)
        )
    )
    return total, rows


def due_ids(conn: Connection, where: ColumnElement[bool], limit: int = 500) -> list[str]:
    """Candidate job IDs for an orchestrator pass (rechecked under lock one by one)."""
    return [r for (r,) in conn.execute(select(jobs.c.id).where(where).order_by(jobs.c.id).limit(limit))]


def running_on_unavailable_sources(conn: Connection, limit: int = 500) -> list[str]:
    """Jobs that need their agent (Preparing, Syncing) whose source's agent is lost. Processing and
    Cleaning need nothing of the source: an image being made (adapted, boot-tested: minutes) is finished."""
    stmt = (
        select(jobs.c.id)
        .join(sources, sources.c.id == jobs.c.source_id)
        .where(
            jobs.c.status == JobStatus.RUNNING.value,
            jobs.c.business_status.in_([BusinessStatus.PREPARING.value, BusinessStatus.SYNCING.value]),
            sources.c.state == SourceState.UNAVAILABLE.value,
        )
        .order_by(jobs.c.id)
        .limit(limit)
    )
    return [r for (r,) in conn.execute(stmt)]


# writes -----------------------------------------------------------------------


def insert_job(conn: Connection, values: dict[str, Any]) -> None:
    conn.execute(insert(jobs).values(**values))


def update_job(conn: Connection, job_id: str, values: dict[str, Any]) -> None:
    conn.execute(update(jobs).where(jobs.c.id == job_id).values(**values))


def add_event(
    conn: Connection, job_id: str, event: str, frm: State, to: State, now: datetime, detail: str = ""
) -> None:
    conn.execute(
        insert(job_events).values(
            job_id=job_id,
            at=now,
            event=event,
            from_status=frm[0].value,
            from_business=frm[1].value,
            to_status=to[0].value,
            to_business=to[1].value,
            detail=detail,
        )
    )
    reason = _reason(event, detail)
    log_on_commit(
        conn,
        log,
        f"job {job_id}: {_label(frm)} -> {_label(to)} ({reason})",
        {"job_id": job_id, "event": event, "from": _label(frm), "to": _label(to), "reason": reason},
    )


def _reason(event: str, detail: str) -> str:
    """``fail error_code=SourceServerOffline``: the event and what it carried, for the log."""
    try:
        carried = json.loads(detail) if detail else {}
    except ValueError:
        carried = {"detail": detail}
    if not isinstance(carried, dict):
        carried = {"detail": carried}
    return " ".join([event, *(f"{k}={v}" for k, v in carried.items())])


def _label(state: State) -> str:
    status, business = state
    return f"{status.value}/{business.value}" if business.value else status.value


def transition(
    conn: Connection,
    job_id: str,
    event: JobEvent,
    now: datetime,
    *,
    account_id: str | None = None,
    values: dict[str, Any] | None = None,
    detail: dict[str, Any] | None = None,
) -> tuple[State, State]:
    """Move the job by `event` (guarded UPDATE + job_events row); (from, to) states.

    Raises InvalidJobId.NotFound or ReplicationJob.InvalidStatus (naming the
    current and the allowed statuses).
    """
    row = get_job(conn, job_id, account_id, lock=True)
    current = state_of(row)
    target = next_state(event, current)
    allowed = TRANSITIONS[event].sources
    guard = or_(*(and_(jobs.c.status == s.value, jobs.c.business_status == b.value) for s, b in allowed))
    changed = conn.execute(
        update(jobs)
        .where(jobs.c.id == job_id, guard)
        .values(status=target[0].value, business_status=target[1].value, **(values or {}))
    ).rowcount
    if changed != 1:
        # Another transaction moved it between our read and our write.
        now_row = get_job(conn, job_id, account_id)
        raise InvalidJobStatus(describe(state_of(now_row)), TRANSITIONS[event].allowed_statuses)
    add_event(conn, job_id, event.value, current, target, now, json.dumps(detail or {}, sort_keys=True))
    return current, target


def claim_source(conn: Connection, source_id: str, job_id: str) -> bool:
    """Available (or InUse by this very job) → InUse for `job_id`; False if the source is not usable."""
    return (
        conn.execute(
            update(sources)
            .where(
                sources.c.id == source_id,
                or_(
                    sources.c.state == SourceState.AVAILABLE.value,
                    and_(sources.c.state == SourceState.IN_USE.value, sources.c.job_id == job_id),
                ),
            )
            .values(state=SourceState.IN_USE.value, job_id=job_id)
        ).rowcount
        == 1
    )


def release_source(conn: Connection, source_id: str, job_id: str) -> None:
    """InUse by `job_id` → Available; any other state (Unavailable, Deleting) is left to its owner."""
    conn.execute(
        update(sources)
        .where(
            sources.c.id == source_id,
            sources.c.state == SourceState.IN_USE.value,
            sources.c.job_id == job_id,
        )
        .values(state=SourceState.AVAILABLE.value)
    )


def point_source_at(conn: Connection, source_id: str, job_id: str) -> None:
    """The source's JobId is its last job."""
    conn.execute(update(sources).where(sources.c.id == source_id).values(job_id=job_id))


def start_run(conn: Connection, job_id: str, run_type: str, now: datetime) -> int:
    result = conn.execute(
        insert(job_runs).values(job_id=job_id, type=run_type, start_time=now, image_id="", detail="{}")
    )
    pk = result.inserted_primary_key
    assert pk is not None
    return int(pk[0])


def update_run(conn: Connection, run_id: int, values: dict[str, Any]) -> int:
    return conn.execute(update(job_runs).where(job_runs.c.id == run_id).values(**values)).rowcount


def close_open_runs(conn: Connection, job_id: str, now: datetime, image_id: str | None = None) -> None:
    values: dict[str, Any] = {"end_time": now}
    if image_id is not None:
        values["image_id"] = image_id
    conn.execute(update(job_runs).where(job_runs.c.job_id == job_id, job_runs.c.end_time.is_(None)).values(**values))


def remove_job(conn: Connection, job_id: str) -> None:
    """The row and everything hanging off it; the source forgets it as its last job."""
    conn.execute(delete(job_runs).where(job_runs.c.job_id == job_id))
    tagq.remove_tags(conn, JOB_RTYPE, job_id, None)
    conn.execute(update(sources).where(sources.c.job_id == job_id).values(job_id=""))
    conn.execute(delete(jobs).where(jobs.c.id == job_id))
