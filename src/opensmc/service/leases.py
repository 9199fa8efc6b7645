"""Leases on a job's long data-plane steps (allocation, sealing, cleaning).

A step takes the job's lease before it starts and drops it when done, so two
server processes never work on one job at once. A lease held by a process of
this host that no longer runs is taken over at once; other hosts' leases can
only expire.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import timedelta

from opensmc.domain.enums import BusinessStatus
from opensmc.service.context import Services
from opensmc.store import dataplane as q

LEASE = timedelta(minutes=10)
_HOST = os.uname().nodename
OWNER = f"{_HOST}:{os.getpid()}"


def dead_local_owner(owner: str | None) -> bool:
    """A lease held by a process of this host that no longer runs (killed, crashed)."""
    host, _, pid = (owner or "").rpartition(":")
    if host != _HOST or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, under another user
        return False
    return False


def claim(svc: Services, job_id: str, business: BusinessStatus, stale_owner: str | None = None) -> bool:
    """Take the job's lease if it is Running/`business` and nobody else (alive) holds it."""
    now = svc.clock()
    with svc.db.begin() as conn:
        return q.claim_lease(conn, job_id, business, OWNER, now, now + LEASE, stale_owner)


def release(svc: Services, job_id: str) -> None:
    with svc.db.begin() as conn:
        q.release_lease(conn, job_id, OWNER)


def ids_in(svc: Services, business: BusinessStatus) -> list[tuple[str, str | None]]:
    """(job id, lease owner if that owner is a dead process of this host) of jobs in Running/`business`."""
    with svc.db.connect() as conn:
        rows = q.jobs_in(conn, business)
    return [(r.id, r.lease_owner if dead_local_owner(r.lease_owner) else None) for r in rows]


def each_leased(svc: Services, business: BusinessStatus) -> Iterator[str]:
    """The ids of jobs in Running/`business` whose lease this process got, one at a time.

    Each lease is released when the loop moves on, or leaves, whatever happened.
    """
    for job_id, stale in ids_in(svc, business):
        if not claim(svc, job_id, business, stale):
            continue
        try:
            yield job_id
        finally:
            release(svc, job_id)
