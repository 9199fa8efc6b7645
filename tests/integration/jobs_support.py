"""Helpers for the job tests: sources inserted directly, a settable clock, error assertions."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import insert, select, update

from opensmc.clock import new_id
from opensmc.domain.errors import SmcError
from opensmc.service.context import Caller, Services
from opensmc.store.tables import job_events, jobs, sources

GIB = 1024**3
T0 = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)

DISKS: list[dict[str, Any]] = [
    {
        "index": 0,
        "path": "/dev/vda",
        "size_bytes": 20 * GIB,
        "partitions": [
            {"device": "0_0", "offset": 1048576, "size_bytes": 20 * GIB - 1048576, "can_block": True},
        ],
    },
    {"index": 1, "path": "/dev/vdb", "size_bytes": 50 * GIB, "partitions": []},
]


class Clock:
    """services.clock, moved by hand."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kw: float) -> datetime:
        self.now += timedelta(**kw)
        return self.now


def add_source(
    services: Services,
    caller: Caller,
    *,
    state: str = "Available",
    disks: list[dict[str, Any]] | None = None,
) -> str:
    sid = new_id("s-")
    with services.db.begin() as conn:
        conn.execute(
            insert(sources).values(
                id=sid,
                account_id=caller.account_id,
                name="src-" + sid[2:10],
                state=state,
                machine_id=sid,
                instance_id=f"machine:{sid}",  # identity is (account, instance): one per source
                agent_secret_hash="x",
                disks=json.dumps(DISKS if disks is None else disks),
                created_at=services.clock(),
            )
        )
    return sid


def source_row(services: Services, sid: str) -> Any:
    with services.db.connect() as conn:
        return conn.execute(select(sources).where(sources.c.id == sid)).one()


def set_source_state(services: Services, sid: str, state: str) -> None:
    with services.db.begin() as conn:
        conn.execute(update(sources).where(sources.c.id == sid).values(state=state))


def job_row(services: Services, job_id: str) -> Any:
    with services.db.connect() as conn:
        return conn.execute(select(jobs).where(jobs.c.id == job_id)).first()


def events_of(services: Services, job_id: str) -> list[tuple[str, str, str]]:
    with services.db.connect() as conn:
        rows = conn.execute(
            select(job_events.c.event, job_events.c.to_status, job_events.c.to_business)
            .where(job_events.c.job_id == job_id)
            .order_by(job_events.c.id)
        )
        return [(r.event, r.to_status, r.to_business) for r in rows]


def raises(code: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> SmcError:
    with pytest.raises(SmcError) as info:
        fn(*args, **kw)
    assert info.value.code == code, info.value.message
    return info.value


def one_job(call: Callable[..., dict[str, Any]], job_id: str) -> dict[str, Any]:
    out = call("DescribeReplicationJobs", JobId__1=job_id)
    items = out["ReplicationJobs"]["ReplicationJob"]
    assert len(items) == 1, out
    job: dict[str, Any] = items[0]
    return job
