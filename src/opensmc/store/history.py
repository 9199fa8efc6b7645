"""Reads for the console that the SMC API has no action for: job events, run byte counts, last heartbeats."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Row, select

from opensmc.store.tables import job_events, job_runs, jobs, sources


def events_of(conn: Connection, job_id: str, limit: int = 500) -> list[Row[Any]]:
    """The job's latest events, oldest first."""
    rows = conn.execute(
        select(job_events).where(job_events.c.job_id == job_id).order_by(job_events.c.id.desc()).limit(limit)
    ).all()
    return list(reversed(rows))


def open_runs(conn: Connection, account_id: str) -> list[Row[Any]]:
    """(job_id, run_id, bytes_done, bytes_total) of the account's running jobs' open runs."""
    return list(
        conn.execute(
            select(jobs.c.id.label("job_id"), job_runs.c.id.label("run_id"), job_runs.c.bytes_done,
                   job_runs.c.bytes_total)
            .join(job_runs, job_runs.c.job_id == jobs.c.id)
            .where(jobs.c.account_id == account_id, jobs.c.status == "Running", job_runs.c.end_time.is_(None))
        )
    )  # fmt: skip


def heartbeats(conn: Connection, account_id: str) -> list[Row[Any]]:
    return list(
        conn.execute(select(sources.c.id, sources.c.last_heartbeat_at).where(sources.c.account_id == account_id))
    )
