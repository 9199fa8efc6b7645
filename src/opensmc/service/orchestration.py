"""The time-driven job transitions: one orchestrator pass, :func:`run_due`.

Each job is moved in its own short transaction. Candidates are read without
locks, then each is locked and re-checked (``FOR UPDATE SKIP LOCKED`` on
PostgreSQL, so several orchestrators on one database split the work instead
of queueing; on SQLite, BEGIN IMMEDIATE serialises writers anyway). A job
another process moved in the meantime simply no longer matches.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, Connection, and_, or_

from opensmc.domain.enums import JobStatus, RunType, SourceState
from opensmc.domain.errors import SmcError
from opensmc.domain.transitions import TRANSITIONS, JobEvent
from opensmc.service import jobs as job_service
from opensmc.service.context import Services
from opensmc.store import jobs as q
from opensmc.store.tables import jobs

log = logging.getLogger(__name__)

EXPIRED_KEPT = timedelta(days=7)
OFFLINE = "SourceServer.Offline"


def run_due(svc: Services, now: datetime) -> int:
    """Perform every transition due at `now`; the number of jobs moved."""
    moved = 0
    moved += _expire(svc, now)
    moved += _delete_expired(svc, now)
    moved += _start_scheduled(svc, now)
    moved += _fail_offline(svc, now)
    moved += _finish_deletions(svc)
    return moved


def _candidates(svc: Services, where: ColumnElement[bool]) -> list[str]:
    with svc.db.connect() as conn:
        return q.due_ids(conn, where)


def _each(svc: Services, ids: list[str], where: ColumnElement[bool], act: Callable[[Connection, str], bool]) -> int:
    moved = 0
    for job_id in ids:
        try:
            with svc.db.begin() as conn:
                row = q.lock_if_still(conn, job_id, where, skip_locked=svc.db.supports_skip_locked)
                if row is not None and act(conn, job_id):
                    moved += 1
        except SmcError as exc:
            # Lost a race with a user action: the job is no longer in the state we saw.
            log.info("orchestrator skipped %s: %s", job_id, exc.message)
    return moved


def _expirable(now: datetime) -> ColumnElement[bool]:
    statuses = sorted({s.value for s, _b in TRANSITIONS[JobEvent.EXPIRE].sources})
    return and_(jobs.c.status.in_(statuses), jobs.c.valid_time <= now)


def _expire(svc: Services, now: datetime) -> int:
    where = _expirable(now)

    def act(conn: Connection, job_id: str) -> bool:
        q.transition(conn, job_id, JobEvent.EXPIRE, now, values={"expired_at": now, "next_run_at": None})
        return True

    return _each(svc, _candidates(svc, where), where, act)


def _delete_expired(svc: Services, now: datetime) -> int:
    where = and_(jobs.c.status == JobStatus.EXPIRED.value, jobs.c.expired_at <= now - EXPIRED_KEPT)

    def act(conn: Connection, job_id: str) -> bool:
        q.transition(conn, job_id, JobEvent.DELETE, now, detail={"reason": "expired 7 days ago"})
        return True

    return _each(svc, _candidates(svc, where), where, act)


def _start_scheduled(svc: Services, now: datetime) -> int:
    where = and_(
        jobs.c.status == JobStatus.WAITING.value,
        or_(jobs.c.next_run_at <= now, and_(jobs.c.next_run_at.is_(None), jobs.c.scheduled_start_time <= now)),
    )

    def act(conn: Connection, job_id: str) -> bool:
        row = q.get_job(conn, job_id)
        found = q.source_state(conn, row.source_id)
        state = found[0] if found else "Deleted"
        if state != SourceState.AVAILABLE.value:
            info = job_service.status_info(
                "SourceServerState.Invalid",
                f"The scheduled run is due but the source server {row.source_id} is {state}; "
                "it starts once the source is Available.",
            )
            if row.status_info != info:
                q.update_job(conn, job_id, {"status_info": info})
            return False
        job_service.begin_run(conn, row, JobEvent.SCHEDULED_START, RunType.SCHEDULE, now)
        return True

    return _each(svc, _candidates(svc, where), where, act)


def _fail_offline(svc: Services, now: datetime) -> int:
    with svc.db.connect() as conn:
        ids = q.running_on_unavailable_sources(conn)
    where = jobs.c.status == JobStatus.RUNNING.value

    def act(conn: Connection, job_id: str) -> bool:
        row = q.get_job(conn, job_id)
        found = q.source_state(conn, row.source_id)
        if found is None or found[0] != SourceState.UNAVAILABLE.value:
            return False  # the agent came back meanwhile
        message = (
            f"The agent of source server {row.source_id} stopped sending heartbeats for longer than "
            "its grace period. Restart the agent and start the job again."
        )
        q.transition(
            conn,
            job_id,
            JobEvent.FAIL,
            now,
            values={"error_code": OFFLINE, "status_info": job_service.status_info(OFFLINE, message)},
            detail={"error_code": OFFLINE},
        )
        q.close_open_runs(conn, job_id, now)
        return True

    return _each(svc, ids, where, act)


def _finish_deletions(svc: Services) -> int:
    # Nothing holds staging for a Deleting job yet (the data plane releases it with the run),
    # so the pass completes every deletion.
    ids = _candidates(svc, jobs.c.status == JobStatus.DELETING.value)
    return sum(1 for job_id in ids if job_service.finish_deletion(svc, job_id))
