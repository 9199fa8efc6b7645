"""Leases on long data-plane steps: a crashed server's lease does not block a restarted one."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from datetime import timedelta

from sqlalchemy import select, update

from opensmc.domain.enums import BusinessStatus
from opensmc.service import leases
from opensmc.service.context import Caller, Services
from opensmc.store.tables import jobs
from tests.conftest import ActionCaller
from tests.integration.jobs_support import add_source


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_dead_local_owner() -> None:
    host = leases.MACHINE
    assert leases.dead_local_owner(f"{host}:{dead_pid()}")
    assert not leases.dead_local_owner(f"{host}:{os.getppid()}")  # alive
    assert not leases.dead_local_owner(f"{host}:{os.getpid()}")  # ourselves
    assert not leases.dead_local_owner(f"some-other-host:{dead_pid()}")  # can only expire
    # Another machine with our host name (a clone, a container): its pids are not ours to judge.
    same_name = f"{os.uname().nodename[:24]}/0123456789"
    assert same_name != host
    assert not leases.dead_local_owner(f"{same_name}:{dead_pid()}")
    assert not leases.dead_local_owner(f"{os.uname().nodename}:{dead_pid()}")  # the format before machines
    assert not leases.dead_local_owner(None)


def test_lease_of_a_dead_process_is_taken_over(call: ActionCaller, services: Services, caller: Caller) -> None:
    src = add_source(services, caller)
    job_id = call("CreateReplicationJob", RegionId="local", SourceId=src)["JobId"]
    call("StartReplicationJob", JobId=job_id)
    host = leases.MACHINE
    held_by_dead = f"{host}:{dead_pid()}"
    with services.db.begin() as conn:
        conn.execute(
            update(jobs)
            .where(jobs.c.id == job_id)
            .values(lease_owner=held_by_dead, lease_until=services.clock() + timedelta(minutes=10))
        )
    [(found, stale)] = leases.ids_in(services, BusinessStatus.PREPARING)
    assert (found, stale) == (job_id, held_by_dead)
    assert leases.claim(services, job_id, BusinessStatus.PREPARING, stale)
    # A live lease of another process is respected.
    with services.db.begin() as conn:
        conn.execute(update(jobs).where(jobs.c.id == job_id).values(lease_owner=f"{host}:{os.getppid()}"))
    [(_, stale)] = leases.ids_in(services, BusinessStatus.PREPARING)
    assert stale is None
    assert not leases.claim(services, job_id, BusinessStatus.PREPARING, stale)


def test_a_leased_step_on_its_own_thread(call: ActionCaller, services: Services, caller: Caller) -> None:
    """start_leased: the lease is taken and held while the step runs on its thread; the job is busy in this
    process (each_leased and a second start skip it, though its lease is this process's); released after."""
    src = add_source(services, caller)
    job_id = call("CreateReplicationJob", RegionId="local", SourceId=src)["JobId"]
    call("StartReplicationJob", JobId=job_id)
    running, go_on = threading.Event(), threading.Event()

    def step() -> None:
        running.set()
        assert go_on.wait(30)

    assert leases.start_leased(services, job_id, BusinessStatus.PREPARING, None, step)
    assert running.wait(30)
    assert leases.busy(job_id)
    assert not leases.start_leased(services, job_id, BusinessStatus.PREPARING, None, step)
    assert list(leases.each_leased(services, BusinessStatus.PREPARING)) == []
    with services.db.connect() as conn:
        owner = conn.execute(select(jobs.c.lease_owner).where(jobs.c.id == job_id)).scalar()
    assert owner == leases.OWNER
    go_on.set()
    assert leases.wait_idle(30)
    assert not leases.busy(job_id)
    with services.db.connect() as conn:
        assert conn.execute(select(jobs.c.lease_owner).where(jobs.c.id == job_id)).scalar() is None


def test_a_leased_step_that_raises_frees_its_job(call: ActionCaller, services: Services, caller: Caller) -> None:
    src = add_source(services, caller)
    job_id = call("CreateReplicationJob", RegionId="local", SourceId=src)["JobId"]
    call("StartReplicationJob", JobId=job_id)

    def broken() -> None:
        raise RuntimeError("a bug")

    assert leases.start_leased(services, job_id, BusinessStatus.PREPARING, None, broken)
    assert leases.wait_idle(30)
    assert list(leases.each_leased(services, BusinessStatus.PREPARING)) == [job_id]  # free for the next pass
