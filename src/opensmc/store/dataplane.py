"""Queries of the data plane: leases on long steps, the jobs each step works on, run totals.

Long steps (allocation, sealing an image, cleaning) hold a lease on the job
row (``lease_owner``/``lease_until``) instead of a row lock, so several server
processes never work on one job at once and a dead process's lease expires.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row, or_, select, update

from opensmc.domain.enums import BusinessStatus, JobStatus
from opensmc.store.tables import job_runs, jobs, sources


def claim_lease(
    conn: Connection,
    job_id: str,
    business: BusinessStatus,
    owner: str,
    now: datetime,
    until: datetime,
    stale_owner: str | None = None,
) -> bool:
    """Take the job's lease if it is Running/`business` and nobody else (alive) holds it."""
    free = [jobs.c.lease_until.is_(None), jobs.c.lease_until < now, jobs.c.lease_owner == owner]
    if stale_owner:
        free.append(jobs.c.lease_owner == stale_owner)
    res = conn.execute(
        update(jobs)
        .where(
            jobs.c.id == job_id,
            jobs.c.status == JobStatus.RUNNING.value,
            jobs.c.business_status == business.value,
            or_(*free),
        )
        .values(lease_owner=owner, lease_until=until)
    )
    return res.rowcount == 1


def renew_lease(conn: Connection, job_id: str, owner: str, until: datetime) -> None:
    conn.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.lease_owner == owner).values(lease_until=until))


def release_lease(conn: Connection, job_id: str, owner: str) -> None:
    conn.execute(
        update(jobs).where(jobs.c.id == job_id, jobs.c.lease_owner == owner).values(lease_owner=None, lease_until=None)
    )


def jobs_in(conn: Connection, business: BusinessStatus, limit: int = 100) -> list[Row[Any]]:
    """(id, lease_owner) of jobs in Running/`business`."""
    return list(
        conn.execute(
            select(jobs.c.id, jobs.c.lease_owner)
            .where(jobs.c.status == JobStatus.RUNNING.value, jobs.c.business_status == business.value)
            .order_by(jobs.c.id)
            .limit(limit)
        )
    )


def job_with_disks(conn: Connection, job_id: str) -> tuple[Row[Any], str]:
    """The job row and its source's reported disks (JSON)."""
    job = conn.execute(select(jobs).where(jobs.c.id == job_id)).one()
    disks = conn.execute(select(sources.c.disks).where(sources.c.id == job.source_id)).scalar_one()
    return job, str(disks or "")


def syncing_job_of_source(conn: Connection, source_id: str) -> tuple[Row[Any], str] | None:
    """The source's job in Running/Syncing, with the source's disks, or None."""
    job = conn.execute(
        select(jobs).where(
            jobs.c.source_id == source_id,
            jobs.c.status == JobStatus.RUNNING.value,
            jobs.c.business_status == BusinessStatus.SYNCING.value,
        )
    ).first()
    if job is None:
        return None
    disks = conn.execute(select(sources.c.disks).where(sources.c.id == source_id)).scalar_one()
    return job, str(disks or "")


def job_status(conn: Connection, job_id: str) -> Row[Any] | None:
    """(status, business_status, source_id, replication_parameters) of a job."""
    cols = [jobs.c.status, jobs.c.business_status, jobs.c.source_id, jobs.c.replication_parameters]
    return conn.execute(select(*cols).where(jobs.c.id == job_id)).first()


def record_synced_run(conn: Connection, run_id: int, total: int, agent_stats: Any) -> None:
    conn.execute(
        update(job_runs)
        .where(job_runs.c.id == run_id)
        .values(bytes_total=total, bytes_done=total, detail=json.dumps({"agent": agent_stats}))
    )


def set_run_checksum(conn: Connection, run_id: int, verified: bool | None) -> None:
    conn.execute(update(job_runs).where(job_runs.c.id == run_id).values(checksum_verified=verified))


def jobs_that_may_run(conn: Connection, job_ids: list[str], statuses: tuple[str, ...]) -> set[str]:
    """Those of `job_ids` that exist in one of `statuses`."""
    return {r.id for r in conn.execute(select(jobs.c.id).where(jobs.c.id.in_(job_ids), jobs.c.status.in_(statuses)))}


def syncing_run_of_source(conn: Connection, source_id: str) -> list[tuple[str, int, str, str | None]]:
    """(job id, open run id, replication_parameters, receiver) of the source's job in Running/Syncing.

    One query on indexed columns (jobs.source_id, job_runs.job_id): the agent
    channel's long-poll asks it a few times a second per connected agent.
    """
    rows = conn.execute(
        select(jobs.c.id, job_runs.c.id.label("run_id"), jobs.c.replication_parameters, jobs.c.receiver)
        .join(job_runs, (job_runs.c.job_id == jobs.c.id) & job_runs.c.end_time.is_(None))
        .where(
            jobs.c.source_id == source_id,
            jobs.c.status == JobStatus.RUNNING.value,
            jobs.c.business_status == BusinessStatus.SYNCING.value,
        )
        .order_by(job_runs.c.id.desc())
    )
    out: dict[str, tuple[str, int, str, str | None]] = {}
    for r in rows:
        out.setdefault(r.id, (r.id, int(r.run_id), str(r.replication_parameters or ""), r.receiver))
    return list(out.values())


def syncing_runs_of_sources(
    conn: Connection, source_ids: list[str]
) -> dict[str, list[tuple[str, int, str, str | None]]]:
    """:func:`syncing_run_of_source` for many sources in one query (the shared long-poll read)."""
    rows = conn.execute(
        select(
            jobs.c.source_id, jobs.c.id, job_runs.c.id.label("run_id"), jobs.c.replication_parameters, jobs.c.receiver
        )
        .join(job_runs, (job_runs.c.job_id == jobs.c.id) & job_runs.c.end_time.is_(None))
        .where(
            jobs.c.source_id.in_(source_ids),
            jobs.c.status == JobStatus.RUNNING.value,
            jobs.c.business_status == BusinessStatus.SYNCING.value,
        )
        .order_by(job_runs.c.id.desc())
    )
    out: dict[str, dict[str, tuple[str, int, str, str | None]]] = {sid: {} for sid in source_ids}
    for r in rows:
        out[r.source_id].setdefault(r.id, (r.id, int(r.run_id), str(r.replication_parameters or ""), r.receiver))
    return {sid: list(found.values()) for sid, found in out.items()}
