"""Leases on a job's long data-plane steps (allocation, sealing, cleaning), and worker threads for the longest.

A step takes the job's lease before it starts and drops it when done, so two
server processes never work on one job at once. A lease lasts :data:`LEASE`
(seconds, not minutes) and is renewed every :data:`RENEW` seconds by a thread
of the holding process for as long as it holds it, so a process that dies
(or loses its host) frees its leases within :data:`LEASE`, however long the
step, while a slow step keeps its own. A lease held by a process of this
machine that no longer runs is taken over at once.

The owner's name is ``<machine>:<pid>``, where the machine is the host name
(for people) and a digest of the kernel's boot id and the process's PID
namespace: two hosts (or containers) that share a host name never take each
other's leases for their own processes', and a restarted host is a new machine.

Processing runs on worker threads (:func:`start_leased`): OS adaptation and a
boot test take minutes, and the orchestrator's pass, which drives every other
job of this process, must not wait for them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

from opensmc.domain.enums import BusinessStatus
from opensmc.service import wakeup
from opensmc.service.context import Services
from opensmc.store import dataplane as q

log = logging.getLogger("opensmc.dataplane")

LEASE = timedelta(seconds=15)
#: seconds between renewals of the leases this process holds (well inside LEASE)
RENEW = 3.0


def _machine() -> str:
    """This host name (shortened) and what makes this boot's PID space unique."""
    parts = []
    for path in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/pid"):
        try:
            parts.append(Path(path).read_text() if "boot_id" in path else os.readlink(path))
        except OSError:
            parts.append(os.urandom(8).hex())  # unknown: only expiry frees our leases then
    digest = hashlib.sha256("|".join(parts).encode()).hexdigest()[:10]
    return f"{os.uname().nodename[:24]}/{digest}"


MACHINE = _machine()
OWNER = f"{MACHINE}:{os.getpid()}"


def dead_local_owner(owner: str | None) -> bool:
    """A lease held by a process of this machine that no longer runs (killed, crashed)."""
    host, _, pid = (owner or "").rpartition(":")
    if host != MACHINE or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, under another user
        return False
    return False


class _Keeper:
    """Renews the leases this process holds, every RENEW seconds, while it holds any."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, Services] = {}
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def hold(self, svc: Services, job_id: str) -> None:
        with self._lock:
            self._held[job_id] = svc
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="opensmc-lease-keeper", daemon=True)
                self._thread.start()

    def drop(self, job_id: str) -> None:
        with self._lock:
            self._held.pop(job_id, None)

    def _run(self) -> None:
        while True:
            self._wake.wait(RENEW)
            with self._lock:
                held = dict(self._held)
                if not held:
                    self._thread = None
                    return
            for job_id, svc in held.items():
                try:
                    now = svc.clock()
                    with svc.db.begin() as conn:
                        q.renew_lease(conn, job_id, OWNER, now + LEASE)
                except Exception as exc:  # the database is away: the next round tries again
                    log.warning("cannot renew the lease on job %s (%s)", job_id, exc)


_KEEPER = _Keeper()


def claim(svc: Services, job_id: str, business: BusinessStatus, stale_owner: str | None = None) -> bool:
    """Take the job's lease if it is Running/`business` and nobody else (alive) holds it.

    It is renewed in the background until :func:`release`.
    """
    now = svc.clock()
    with svc.db.begin() as conn:
        got = q.claim_lease(conn, job_id, business, OWNER, now, now + LEASE, stale_owner)
    if got:
        _KEEPER.hold(svc, job_id)
    return got


def release(svc: Services, job_id: str) -> None:
    _KEEPER.drop(job_id)
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
    A job a worker thread of this process holds (:func:`start_leased`) is
    skipped: its lease is this process's, so a claim would take it again.
    """
    for job_id, stale in ids_in(svc, business):
        if busy(job_id) or not claim(svc, job_id, business, stale):
            continue
        try:
            yield job_id
        finally:
            release(svc, job_id)


_busy_lock = threading.Lock()
#: jobs whose step runs on a worker thread of this process (:func:`start_leased`), with that thread
_busy: dict[str, threading.Thread] = {}


def busy(job_id: str) -> bool:
    """A worker thread of this process is running a step of this job."""
    with _busy_lock:
        return job_id in _busy


def start_leased(
    svc: Services, job_id: str, business: BusinessStatus, stale: str | None, work: Callable[[], None]
) -> bool:
    """Take the job's lease and run ``work`` on a thread of its own; False if busy here or leased elsewhere.

    The lease is renewed while ``work`` runs and released when it returns or
    raises, so the orchestrator's pass goes on at once and a long step (OS
    adaptation, a boot test) holds nothing but its own job. A crash frees the
    lease as for any step (at once on this machine, else within :data:`LEASE`),
    and the next pass starts the step again. The thread wakes the orchestrator
    when ``work`` returns (its job has moved on); after an exception it does
    not, so a step that keeps failing is retried at the pass interval.
    """
    with _busy_lock:
        if job_id in _busy:
            return False
        thread = threading.Thread(
            target=_run_leased, args=(svc, job_id, work), name=f"opensmc-{business.value.lower()}-{job_id}", daemon=True
        )
        _busy[job_id] = thread
    try:
        claimed = claim(svc, job_id, business, stale)
    except BaseException:
        with _busy_lock:
            _busy.pop(job_id, None)
        raise
    if not claimed:
        with _busy_lock:
            _busy.pop(job_id, None)
        return False
    thread.start()
    return True


def _run_leased(svc: Services, job_id: str, work: Callable[[], None]) -> None:
    finished = False
    try:
        work()
        finished = True
    except Exception:
        log.exception("job %s: a leased step failed; the next orchestrator pass tries again", job_id)
    finally:
        try:
            release(svc, job_id)
        except Exception as exc:  # the database is away: the lease expires on its own
            log.warning("cannot release the lease on job %s (%s)", job_id, exc)
        with _busy_lock:
            _busy.pop(job_id, None)
    if finished:
        wakeup.notify()


def wait_idle(timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for this process's worker threads to end; True if none is left."""
    deadline = time.monotonic() + timeout
    while True:
        with _busy_lock:
            threads = list(_busy.values())
        if not threads:
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        try:
            threads[0].join(min(left, 0.5))
        except RuntimeError:  # registered, not yet started (start_leased is claiming its lease)
            time.sleep(0.05)
