"""Queries of the receiver registry: who receives, how loaded each is, and whose runs to hand over.

A receiver process keeps its row (``receivers``, keyed by the endpoint it
tells agents) fresh; a job in Running/Preparing or Syncing names the receiver
its run sends to (``jobs.receiver``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite

from opensmc.domain.enums import BusinessStatus, JobStatus
from opensmc.store.tables import jobs, receivers

#: the phases whose runs occupy a receiver
ACTIVE = (BusinessStatus.PREPARING.value, BusinessStatus.SYNCING.value)


@dataclass(frozen=True)
class ReceiverLoad:
    endpoint: str
    instance: str  #: the process that last beat for it
    capacity: int
    active: int  #: runs placed on it now (Running/Preparing or Syncing)
    heartbeat_at: datetime


def beat(conn: Connection, endpoint: str, instance: str, capacity: int, now: datetime) -> None:
    """Insert or renew the receiver's row (a restarted receiver takes its endpoint's row back)."""
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    stmt = dialect.insert(receivers).values(
        endpoint=endpoint, instance=instance, capacity=capacity, started_at=now, heartbeat_at=now
    )
    conn.execute(
        stmt.on_conflict_do_update(
            index_elements=[receivers.c.endpoint],
            set_={"instance": instance, "capacity": capacity, "heartbeat_at": now},
        )
    )


def remove(conn: Connection, endpoint: str, instance: str) -> None:
    """A receiver that stops cleanly drops its row (unless another process took the endpoint since)."""
    conn.execute(delete(receivers).where(receivers.c.endpoint == endpoint, receivers.c.instance == instance))


def forget_older_than(conn: Connection, cutoff: datetime) -> int:
    """Rows of receivers silent since before `cutoff` and holding no run (long gone)."""
    busy = select(jobs.c.receiver).where(jobs.c.receiver.is_not(None), jobs.c.status == JobStatus.RUNNING.value)
    return conn.execute(
        delete(receivers).where(receivers.c.heartbeat_at < cutoff, receivers.c.endpoint.not_in(busy))
    ).rowcount


def any_registered(conn: Connection) -> bool:
    return conn.execute(select(receivers.c.endpoint).limit(1)).first() is not None


def loads(conn: Connection, alive_since: datetime) -> list[ReceiverLoad]:
    """The receivers that heartbeated since `alive_since`, with the runs placed on each."""
    active = (
        select(jobs.c.receiver, func.count().label("n"))
        .where(jobs.c.status == JobStatus.RUNNING.value, jobs.c.business_status.in_(ACTIVE))
        .group_by(jobs.c.receiver)
        .subquery()
    )
    rows = conn.execute(
        select(receivers.c.endpoint, receivers.c.instance, receivers.c.capacity, receivers.c.heartbeat_at, active.c.n)
        .outerjoin(active, active.c.receiver == receivers.c.endpoint)
        .where(receivers.c.heartbeat_at >= alive_since)
        .order_by(receivers.c.endpoint)
    )
    return [ReceiverLoad(r.endpoint, r.instance, int(r.capacity), int(r.n or 0), r.heartbeat_at) for r in rows]


def set_receiver(conn: Connection, job_id: str, endpoint: str | None, expected: str | None = None) -> bool:
    """Place the job's run on `endpoint` if it is still Running/Preparing or Syncing (and, with
    `expected`, still on that receiver: two orchestrators handing one job over, one wins)."""
    cond = [jobs.c.id == job_id, jobs.c.status == JobStatus.RUNNING.value, jobs.c.business_status.in_(ACTIVE)]
    if expected is not None:
        cond.append(jobs.c.receiver == expected)
    return conn.execute(update(jobs).where(*cond).values(receiver=endpoint)).rowcount == 1


def orphaned(conn: Connection, live: list[str], limit: int = 100) -> list[tuple[str, str]]:
    """(job id, receiver) of active runs placed on a receiver that is not one of `live`."""
    rows = conn.execute(
        select(jobs.c.id, jobs.c.receiver)
        .where(
            jobs.c.status == JobStatus.RUNNING.value,
            jobs.c.business_status.in_(ACTIVE),
            jobs.c.receiver.is_not(None),
            jobs.c.receiver.not_in(live),
        )
        .order_by(jobs.c.id)
        .limit(limit)
    )
    return [(r.id, str(r.receiver)) for r in rows]
