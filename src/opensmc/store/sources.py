"""Migration sources (``sources``) and the few job rows their deletion touches.

A source row is made by an agent's registration (service/agents.py); its
``disks`` and ``system_info`` columns hold the agent's last report as JSON
text. State changes are guarded UPDATEs; zero rows means the state was not
one the change allows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Row,
    Select,
    and_,
    bindparam,
    delete,
    exists,
    func,
    insert,
    or_,
    select,
    update,
)

from opensmc.domain.enums import ResourceType, SourceState
from opensmc.store import tags as tag_store
from opensmc.store.db import Database, Prepared, PreparedIn
from opensmc.store.tables import job_events, job_runs, jobs, sources, tags

SOURCE_TAG = ResourceType.SOURCE_SERVER.value
JOB_TAG = ResourceType.REPLICATION_JOB.value


def insert_source(conn: Connection, values: Mapping[str, Any]) -> None:
    conn.execute(insert(sources).values(**values))


def get(conn: Connection, account_id: str, source_id: str) -> Row[Any] | None:
    return conn.execute(select(sources).where(sources.c.account_id == account_id, sources.c.id == source_id)).first()


def get_any(conn: Connection, source_id: str) -> Row[Any] | None:
    """By ID alone: an agent's credential names its source, and the source names its account."""
    return conn.execute(select(sources).where(sources.c.id == source_id)).first()


def get_by_instance(conn: Connection, account_id: str, instance_id: str) -> Row[Any] | None:
    """The source of an agent identity (its state dir's instance id) in an account."""
    return conn.execute(
        select(sources).where(sources.c.account_id == account_id, sources.c.instance_id == instance_id)
    ).first()


def names_like(conn: Connection, account_id: str, base: str) -> set[str]:
    """Names in use that equal `base` or start with it (for picking a free `base-N`)."""
    rows = conn.execute(
        select(sources.c.name).where(
            sources.c.account_id == account_id,
            func.substr(sources.c.name, 1, len(base)) == base,
        )
    )
    return {name for (name,) in rows}


def name_taken(conn: Connection, account_id: str, name: str, exclude_id: str) -> bool:
    return (
        conn.execute(
            select(sources.c.id).where(
                sources.c.account_id == account_id, sources.c.name == name, sources.c.id != exclude_id
            )
        ).first()
        is not None
    )


def update_fields(conn: Connection, source_id: str, values: Mapping[str, Any]) -> int:
    return conn.execute(update(sources).where(sources.c.id == source_id).values(**values)).rowcount


def set_attributes(conn: Connection, account_id: str, source_id: str, values: Mapping[str, Any]) -> int:
    """Name/Description, guarded: not while Deleting."""
    return conn.execute(
        update(sources)
        .where(
            sources.c.account_id == account_id,
            sources.c.id == source_id,
            sources.c.state != SourceState.DELETING.value,
        )
        .values(**values)
    ).rowcount


def revive(conn: Connection, source_id: str) -> int:
    """Unavailable -> Available with its error cleared (an agent is heard from again)."""
    return conn.execute(
        update(sources)
        .where(sources.c.id == source_id, sources.c.state == SourceState.UNAVAILABLE.value)
        .values(state=SourceState.AVAILABLE.value, error_code="", status_info="")
    ).rowcount


# -- liveness ----------------------------------------------------------------------------------------------

#: States whose agent is expected to heartbeat: an InUse source whose agent died goes
#: Unavailable too, and the orchestrator then fails its running job (SourceServer.Offline).
_LIVE = (SourceState.AVAILABLE.value, SourceState.IN_USE.value)


def silent_since(conn: Connection, cutoff: datetime) -> list[tuple[str, datetime | None, datetime]]:
    """(id, last heartbeat, created) of Available or InUse sources not heard from since `cutoff`."""
    last = func.coalesce(sources.c.last_heartbeat_at, sources.c.created_at)
    rows = conn.execute(
        select(sources.c.id, sources.c.last_heartbeat_at, sources.c.created_at).where(
            sources.c.state.in_(_LIVE), last < cutoff
        )
    )
    return [(r.id, r.last_heartbeat_at, r.created_at) for r in rows]


def mark_unavailable(conn: Connection, source_id: str, cutoff: datetime, code: str, info: str) -> int:
    """Guarded: still Available/InUse and still silent (a heartbeat may have arrived meanwhile)."""
    last = func.coalesce(sources.c.last_heartbeat_at, sources.c.created_at)
    return conn.execute(
        update(sources)
        .where(sources.c.id == source_id, sources.c.state.in_(_LIVE), last < cutoff)
        .values(state=SourceState.UNAVAILABLE.value, error_code=code, status_info=info)
    ).rowcount


# -- DescribeSourceServers ---------------------------------------------------------------------------------


def _page(where: ColumnElement[bool]) -> Select[Any]:
    # The total rides along with the page (COUNT(*) OVER ()): one statement instead of two.
    stmt = select(sources, func.count().over().label("total_matches")).where(where)
    return stmt.order_by(sources.c.created_at.desc(), sources.c.id)


_PAGE_OF_ACCOUNT = (
    _page(sources.c.account_id == bindparam("account_id")).offset(bindparam("offset")).limit(bindparam("limit"))
)


def describe(
    conn: Connection,
    account_id: str,
    *,
    ids: Sequence[str],
    name: str | None,
    state: str | None,
    job_id: str | None,
    workgroup_id: str | None,
    related_job_types: Sequence[int],
    resource_group_id: str | None,
    tag_filters: Sequence[tuple[str, str | None]],
    offset: int,
    limit: int,
) -> tuple[int, list[Row[Any]]]:
    """(total matches, the page's rows), newest first."""
    conds: list[ColumnElement[bool]] = [sources.c.account_id == account_id]
    if ids:
        conds.append(sources.c.id.in_(list(ids)))
    if name is not None:
        conds.append(sources.c.name == name)
    if state is not None:
        conds.append(sources.c.state == state)
    if workgroup_id is not None:
        conds.append(sources.c.workgroup_id == workgroup_id)
    if resource_group_id is not None:
        conds.append(sources.c.resource_group_id == resource_group_id)
    if job_id is not None:
        conds.append(
            or_(
                sources.c.job_id == job_id,
                exists(select(jobs.c.id).where(jobs.c.id == job_id, jobs.c.source_id == sources.c.id)),
            )
        )
    if related_job_types:
        conds.append(
            exists(
                select(jobs.c.id).where(jobs.c.source_id == sources.c.id, jobs.c.job_type.in_(list(related_job_types)))
            )
        )
    tag_cond = tag_store.match_all(SOURCE_TAG, sources.c.id, tag_filters)
    if tag_cond is not None:
        conds.append(tag_cond)
    where = and_(*conds)
    if len(conds) == 1:  # no filter but the account: the statement built once (building it cost more than running it)
        rows = list(conn.execute(_PAGE_OF_ACCOUNT, {"account_id": account_id, "offset": offset, "limit": limit}))
    else:
        rows = list(conn.execute(_page(where).offset(offset).limit(limit)))
    if rows:
        return int(rows[0].total_matches), rows
    if offset == 0:
        return 0, rows
    # A page past the end has no row to carry the total.
    return int(conn.execute(select(func.count()).select_from(sources).where(where)).scalar_one()), rows


_PAGE_OF_ACCOUNT_PREPARED = Prepared(_PAGE_OF_ACCOUNT)
_COUNT_OF_ACCOUNT = Prepared(
    select(func.count().label("n")).select_from(sources).where(sources.c.account_id == bindparam("account_id"))
)


def _latest_in(n: int) -> Any:
    return (
        select(jobs.c.source_id, jobs.c.id)
        .where(jobs.c.source_id.in_([bindparam(f"v{i}") for i in range(n)]))
        .order_by(jobs.c.created_at, jobs.c.id)
    )


_LATEST_IN = PreparedIn(_latest_in)


def describe_account(
    db: Database, account_id: str, *, offset: int, limit: int
) -> tuple[int, list[Any], dict[str, list[tuple[str, str]]], dict[str, str]]:
    """An unfiltered page of an account's sources: (total, rows, their tags, latest job of each without one).

    What :func:`describe`, :func:`~opensmc.store.tags.tags_of` and
    :func:`latest_jobs` give, read in one snapshot on the driver's connection
    with statements compiled once (:class:`~opensmc.store.db.Prepared`): the
    commonest DescribeSourceServers call, without SQLAlchemy's per-call cost.
    """
    with db.driver() as dbapi_conn:
        rows = _PAGE_OF_ACCOUNT_PREPARED.rows(
            db, dbapi_conn, {"account_id": account_id, "offset": offset, "limit": limit}
        )
        if not rows:
            if offset == 0:
                return 0, rows, {}, {}
            # A page past the end has no row to carry the total.
            [count] = _COUNT_OF_ACCOUNT.rows(db, dbapi_conn, {"account_id": account_id})
            return int(count.n), rows, {}, {}
        tag_map = tag_store.tags_of_driver(db, dbapi_conn, SOURCE_TAG, [r.id for r in rows])
        without = [r.id for r in rows if not r.job_id]
        latest = {sid: jid for sid, jid in _LATEST_IN.rows(db, dbapi_conn, without, {})} if without else {}
        return int(rows[0].total_matches), rows, tag_map, latest


def latest_jobs(conn: Connection, source_ids: Sequence[str]) -> dict[str, str]:
    """Each source's newest job ID (for sources whose `job_id` column is not set)."""
    if not source_ids:
        return {}
    rows = conn.execute(
        select(jobs.c.source_id, jobs.c.id)
        .where(jobs.c.source_id.in_(list(source_ids)))
        .order_by(jobs.c.created_at, jobs.c.id)
    )
    return {sid: jid for sid, jid in rows}


# -- DeleteSourceServer ------------------------------------------------------------------------------------


def start_deleting(conn: Connection, account_id: str, source_id: str) -> int:
    """Guarded: any state but Deleting -> Deleting."""
    return conn.execute(
        update(sources)
        .where(
            sources.c.account_id == account_id,
            sources.c.id == source_id,
            sources.c.state != SourceState.DELETING.value,
        )
        .values(state=SourceState.DELETING.value)
    ).rowcount


def jobs_of(conn: Connection, account_id: str, source_id: str) -> list[Row[Any]]:
    return list(
        conn.execute(
            select(jobs.c.id, jobs.c.status, jobs.c.business_status)
            .where(jobs.c.account_id == account_id, jobs.c.source_id == source_id)
            .order_by(jobs.c.created_at, jobs.c.id)
            .with_for_update()
        )
    )


def set_job_status(conn: Connection, job_id: str, allowed: Sequence[tuple[str, str]], target: tuple[str, str]) -> int:
    """A guarded job transition: only from one of the `allowed` (Status, BusinessStatus) pairs."""
    guard = or_(*(and_(jobs.c.status == s, jobs.c.business_status == b) for s, b in allowed))
    return conn.execute(
        update(jobs).where(jobs.c.id == job_id, guard).values(status=target[0], business_status=target[1])
    ).rowcount


def add_job_event(
    conn: Connection,
    job_id: str,
    at: datetime,
    event: str,
    before: tuple[str, str],
    after: tuple[str, str],
    detail: str,
) -> None:
    conn.execute(
        insert(job_events).values(
            job_id=job_id,
            at=at,
            event=event,
            from_status=before[0],
            from_business=before[1],
            to_status=after[0],
            to_business=after[1],
            detail=detail,
        )
    )


def delete_jobs(conn: Connection, job_ids: Sequence[str]) -> None:
    """Job rows with their runs and tags (job_events stay as the audit trail)."""
    if not job_ids:
        return
    ids = list(job_ids)
    conn.execute(delete(job_runs).where(job_runs.c.job_id.in_(ids)))
    conn.execute(delete(tags).where(tags.c.resource_type == JOB_TAG, tags.c.resource_id.in_(ids)))
    conn.execute(delete(jobs).where(jobs.c.id.in_(ids)))


def delete_source(conn: Connection, account_id: str, source_id: str) -> int:
    conn.execute(delete(tags).where(tags.c.resource_type == SOURCE_TAG, tags.c.resource_id == source_id))
    return conn.execute(delete(sources).where(sources.c.account_id == account_id, sources.c.id == source_id)).rowcount
