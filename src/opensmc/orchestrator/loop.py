"""The orchestrator: drives time-based changes of jobs and sources.

Every `interval` seconds (0.5 by default), and at once when a job of this
process changes state (``service/wakeup.py``: a Start, an agent's result, a
step of its own), it starts due scheduled and incremental runs,
expires and deletes jobs past their ValidTime, fails running jobs whose
agent is lost, marks silent agents Unavailable and forgets old signature
nonces. Each step is its own short transaction that locks the rows it
changes (`FOR UPDATE SKIP LOCKED` on PostgreSQL), so any number of server
processes can run this loop against one database.
"""

from __future__ import annotations

import logging
import threading
import time

from opensmc.service import accounts, dataplane, leases, orchestration, sources, wakeup
from opensmc.service.context import Services

log = logging.getLogger("opensmc.orchestrator")

#: seconds between passes when nothing wakes the loop: how late it sees a change made by
#: another server process (Preparing → Syncing, Processing, Cleaning each wait for a pass)
DEFAULT_INTERVAL = 0.5


def tick(svc: Services, *, judge_liveness: bool = True) -> int:
    """One pass; returns how many jobs and sources changed.

    `judge_liveness` is False during a server's first grace period: agents kept
    running while the server was down and must get the chance to heartbeat
    before their silence is held against them (and their jobs failed).
    """
    now = svc.clock()
    changed = sources.mark_lost_agents(svc, now) if judge_liveness else 0
    changed += orchestration.run_due(svc, now)
    changed += dataplane.tick(svc)
    accounts.purge_nonces(svc)
    return changed


class Orchestrator:
    def __init__(self, svc: Services, interval: float = DEFAULT_INTERVAL) -> None:
        self.svc = svc
        self.interval = interval
        self._stop = threading.Event()
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="opensmc-orchestrator", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop, and give the worker threads of its steps ``timeout`` seconds to end (a sealing takes
        milliseconds); a step still running then (an OS adaptation) is left as a crash leaves it: its lease
        is freed when this process exits and the next start does it again."""
        self._stop.set()
        wakeup.orchestrator.set()
        self._thread.join(timeout)
        if not leases.wait_idle(timeout):
            log.warning("orchestrator: a job's step is still running; it starts again with the next server")

    def _run(self) -> None:
        while not self._stop.is_set():
            # Cleared before the pass: a transition during it (its own steps included, so
            # Syncing → Processing → Cleaning → Finished run back to back) means one more pass.
            wakeup.orchestrator.clear()
            try:
                grace = self.svc.settings.heartbeat_grace.total_seconds()
                changed = tick(self.svc, judge_liveness=time.monotonic() - self._started >= grace)
                if changed:  # each job transition is logged on its own, naming the job (store.jobs)
                    log.debug("orchestrator: %d change(s)", changed)
            except Exception:  # a bad pass must not kill the loop; the next pass retries
                log.exception("orchestrator pass failed")
            wakeup.orchestrator.wait(self.interval)
