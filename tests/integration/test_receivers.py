"""Several receivers on one database: placement by room, handover from a silent one, short leases."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from opensmc.domain.enums import BusinessStatus
from opensmc.service import agent_tasks, leases, receivers, staging
from opensmc.service.context import Caller, Services
from opensmc.store import receivers as rq
from opensmc.store.tables import jobs
from tests.conftest import ActionCaller
from tests.integration.jobs_support import Clock, add_source, job_row

SMALL = [{"index": 0, "path": "/dev/vda", "size_bytes": 64 << 20, "partitions": []}]
A, B = "http://10.0.0.1:8081", "http://10.0.0.2:8081"


def started_job(call: ActionCaller, services: Services, caller: Caller) -> tuple[str, str]:
    src = add_source(services, caller, disks=SMALL)
    job_id = call("CreateReplicationJob", RegionId="local", SourceId=src)["JobId"]
    call("StartReplicationJob", JobId=job_id)
    return job_id, src


def until(services: Services, job_id: str) -> Any:
    """The job's lease_until, timezone-aware (SQLite hands it back naive)."""
    value: datetime | None = job_row(services, job_id).lease_until
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


@pytest.fixture
def clock(services: Services) -> Clock:
    c = Clock()
    services.clock = c
    return c


def test_without_registered_receivers_runs_go_to_the_servers_own(
    call: ActionCaller, services: Services, caller: Caller, clock: Clock
) -> None:
    job_id, src = started_job(call, services, caller)
    assert staging.prepare(services) == 1
    assert job_row(services, job_id).receiver is None
    [task] = agent_tasks.tasks_for(services, src)
    assert task["receiver"] == services.settings.receiver_endpoint


def test_runs_go_to_the_receiver_with_most_room_and_wait_when_all_are_full(
    call: ActionCaller, services: Services, caller: Caller, clock: Clock
) -> None:
    receivers.heartbeat(services, A, 2)
    receivers.heartbeat(services, B, 1)
    placed = []
    for _ in range(3):
        job_id, src = started_job(call, services, caller)
        assert staging.prepare(services) == 1
        placed.append(job_row(services, job_id).receiver)
        [task] = agent_tasks.tasks_for(services, src)
        assert task["receiver"] == placed[-1]
    # A 0/2 and B 0/1 tie at 0 %: the name decides (A); then B (0 %) before A (50 %); then A.
    assert placed == [A, B, A]
    waiting, _src = started_job(call, services, caller)
    assert staging.prepare(services) == 0  # both full: the job waits in Preparing
    row = job_row(services, waiting)
    assert (row.status, row.business_status) == ("Running", BusinessStatus.PREPARING.value)
    # A receiver that went silent is not given runs.
    clock.advance(seconds=receivers.TTL.total_seconds() + 1)
    receivers.heartbeat(services, "http://10.0.0.3:8081", 5)
    assert staging.prepare(services) == 1
    assert job_row(services, waiting).receiver == "http://10.0.0.3:8081"


def test_a_silent_receivers_runs_are_handed_over_and_the_agent_is_told(
    call: ActionCaller, services: Services, caller: Caller, clock: Clock
) -> None:
    receivers.heartbeat(services, A, 10)
    job_id, src = started_job(call, services, caller)
    assert staging.prepare(services) == 1
    assert job_row(services, job_id).receiver == A
    before = agent_tasks.view_version(services, src)
    receivers.heartbeat(services, B, 10)
    assert receivers.hand_over(services) == 0  # A is alive
    clock.advance(seconds=receivers.TTL.total_seconds() + 1)
    receivers.heartbeat(services, B, 10)  # only B kept beating
    assert receivers.hand_over(services) == 1
    assert job_row(services, job_id).receiver == B
    [task] = agent_tasks.tasks_for(services, src)
    assert task["receiver"] == B
    assert agent_tasks.view_version(services, src) != before  # the channel answers the agent at once
    # The same staging volume: the run resumes from what the dead receiver stored.
    assert task["disks"][0]["volume_id"] == staging.volume_id(job_row(services, job_id).transition_instance_id, 0)
    # With nobody live to take it, the run stays where it is (the agent keeps retrying).
    clock.advance(seconds=receivers.TTL.total_seconds() + 1)
    assert receivers.hand_over(services) == 0
    assert job_row(services, job_id).receiver == B


def test_a_restarted_receiver_takes_its_endpoint_back_and_a_clean_stop_unregisters(
    services: Services, clock: Clock
) -> None:
    receivers.heartbeat(services, A, 3)
    with services.db.begin() as conn:
        rq.beat(conn, A, "other-process", 7, clock.advance(seconds=1))
    with services.db.connect() as conn:
        [load] = rq.loads(conn, clock.now - receivers.TTL)
    assert (load.endpoint, load.capacity) == (A, 7)
    with services.db.begin() as conn:
        rq.remove(conn, A, leases.OWNER)  # not ours any more: kept
        assert rq.any_registered(conn)
        rq.remove(conn, A, "other-process")
        assert not rq.any_registered(conn)


def test_a_held_lease_is_renewed_until_released(
    call: ActionCaller, services: Services, caller: Caller, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(leases, "RENEW", 0.05)
    job_id, _src = started_job(call, services, caller)
    assert leases.claim(services, job_id, BusinessStatus.PREPARING)
    first = until(services, job_id)
    assert first == clock.now + leases.LEASE
    clock.advance(seconds=10)
    deadline = time.monotonic() + 30
    while until(services, job_id) == first:
        assert time.monotonic() < deadline, "the lease was never renewed"
        time.sleep(0.05)
    assert until(services, job_id) == clock.now + leases.LEASE
    leases.release(services, job_id)
    row = job_row(services, job_id)
    assert (row.lease_owner, row.lease_until) == (None, None)
    # Once released it is not renewed again (the keeper forgot it).
    with services.db.begin() as conn:
        conn.execute(jobs.update().where(jobs.c.id == job_id).values(lease_owner=leases.OWNER, lease_until=clock.now))
    time.sleep(0.3)
    assert until(services, job_id) == clock.now
    # A lease of a dead machine lasts LEASE, not minutes.
    with services.db.begin() as conn:
        conn.execute(
            jobs.update().where(jobs.c.id == job_id).values(lease_owner="elsewhere/0:1", lease_until=clock.now)
        )
    assert not leases.claim(services, job_id, BusinessStatus.PREPARING)
    clock.advance(seconds=1)
    assert leases.claim(services, job_id, BusinessStatus.PREPARING)
    leases.release(services, job_id)
    assert leases.LEASE <= timedelta(seconds=30)


def test_a_dead_receiver_process_of_this_machine_is_not_waited_for(
    call: ActionCaller, services: Services, caller: Caller, clock: Clock
) -> None:
    """A server restarted here on another port: its old receiver's row is fresh, but its process is gone."""
    from tests.integration.test_dataplane_leases import dead_pid

    with services.db.begin() as conn:
        rq.beat(conn, A, f"{leases.MACHINE}:{dead_pid()}", 10, clock.now)
    job_id, _src = started_job(call, services, caller)
    receivers.heartbeat(services, B, 10)
    assert staging.prepare(services) == 1
    assert job_row(services, job_id).receiver == B  # A is not live, although it beat just now
    with services.db.begin() as conn:
        conn.execute(jobs.update().where(jobs.c.id == job_id).values(receiver=A))
    assert receivers.hand_over(services) == 1  # and its runs move at once
    assert job_row(services, job_id).receiver == B
