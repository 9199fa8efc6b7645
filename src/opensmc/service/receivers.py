"""Several receivers on one database: registration, placement of runs, handover from a dead one.

Every receiver process (``--roles receiver``, or the default all-in-one
server) keeps a row in ``receivers`` under the endpoint it tells agents
(``--receiver-endpoint``), renewed every :data:`BEAT` seconds by
:class:`Presence`. A receiver is *live* while its row is younger than
:data:`TTL`.

The rule (docs/operations.md): a run is placed when its job leaves
Preparing, on the live receiver with the lowest share of its capacity in use
(runs in Running/Preparing or Syncing placed on it); ties go to the fewer
runs, then the endpoint's name. A receiver at capacity takes no more; a job
waits in Preparing until one has room. The orchestrator's pass hands every
run placed on a receiver that is no longer live over to another the same
way (:func:`hand_over`): the task the agent's channel answers then names the
new receiver, and the agent's next attempt (its connection to the dead one
failed) resumes there from the staging index, which every receiver shares.

With no receiver registered at all (a database nobody has run a receiver of
this version on), runs go to this process's ``--receiver-endpoint``, as
before receivers registered.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta

from sqlalchemy import Connection

from opensmc.service.context import Services
from opensmc.service.leases import OWNER, dead_local_owner
from opensmc.store import receivers as q
from opensmc.store.receivers import ReceiverLoad

log = logging.getLogger("opensmc.receivers")

#: seconds between a receiver's heartbeats
BEAT = 2.0
#: a receiver silent for this long is dead: its runs are handed over
TTL = timedelta(seconds=10)
#: rows of receivers silent this long, with no run placed on them, are deleted
FORGET = timedelta(days=1)
DEFAULT_CAPACITY = 100


class NoRoom(Exception):
    """Receivers are registered, but none is live with room for one more run."""


def heartbeat(svc: Services, endpoint: str, capacity: int) -> None:
    with svc.db.begin() as conn:
        q.beat(conn, endpoint, OWNER, capacity, svc.clock())


class Presence:
    """Keeps this receiver's row fresh on a thread of its own until :meth:`stop`."""

    def __init__(self, svc: Services, endpoint: str, capacity: int, interval: float = BEAT) -> None:
        self.svc = svc
        self.endpoint = endpoint
        self.capacity = capacity
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="opensmc-receiver-presence", daemon=True)

    def start(self) -> None:
        heartbeat(self.svc, self.endpoint, self.capacity)  # registered before the first agent is told of it
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                heartbeat(self.svc, self.endpoint, self.capacity)
            except Exception as exc:  # the database is away: try again at the next beat
                log.warning("receiver %s: heartbeat failed (%s)", self.endpoint, exc)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        try:
            with self.svc.db.begin() as conn:
                q.remove(conn, self.endpoint, OWNER)
        except Exception as exc:
            log.warning("receiver %s: could not unregister (%s); its row expires", self.endpoint, exc)


def pick(candidates: list[ReceiverLoad], exclude: str | None = None) -> str | None:
    """The placement rule: the lowest share of capacity in use, then fewer runs, then the name."""
    room = [c for c in candidates if c.active < c.capacity and c.endpoint != exclude]
    if not room:
        return None
    best = min(room, key=lambda c: (c.active / c.capacity, c.active, c.endpoint))
    return best.endpoint


def alive_since(svc: Services) -> datetime:
    return svc.clock() - TTL


def live(svc: Services, conn: Connection) -> list[ReceiverLoad]:
    """The live receivers with their load: heartbeated within TTL, and not a dead process of this
    machine (a server restarted here on another port need not wait TTL for its old receiver)."""
    return [r for r in q.loads(conn, alive_since(svc)) if not dead_local_owner(r.instance)]


def place(svc: Services, job_id: str) -> str | None:
    """Place the job's run on a receiver; its endpoint, or None for this server's own one.

    Raises :class:`NoRoom` when receivers are registered but none can take it now.
    """
    with svc.db.begin() as conn:
        if not q.any_registered(conn):
            q.set_receiver(conn, job_id, None)
            return None
        target = pick(live(svc, conn))
        if target is None:
            raise NoRoom("no live receiver has room for another run")
        q.set_receiver(conn, job_id, target)
        return target


def hand_over(svc: Services) -> int:
    """Move the runs of receivers that stopped heartbeating to live ones; how many moved."""
    with svc.db.connect() as conn:
        lost = q.orphaned(conn, [r.endpoint for r in live(svc, conn)])
    moved = 0
    for job_id, old in lost:
        with svc.db.begin() as conn:
            target = pick(live(svc, conn), exclude=old)
            if target is None:
                continue  # nobody has room: the agent keeps retrying; the next pass tries again
            if q.set_receiver(conn, job_id, target, expected=old):
                moved += 1
                log.warning("job %s: receiver %s is silent; its run goes on at %s", job_id, old, target)
    if lost:
        with svc.db.begin() as conn:
            q.forget_older_than(conn, svc.clock() - FORGET)
    return moved
