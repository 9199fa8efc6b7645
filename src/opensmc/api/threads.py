"""The worker threads of signed API requests: plain executors, not anyio's thread pool.

The store is synchronous, so every SMC call runs its database work on a
worker thread. ``starlette.concurrency.run_in_threadpool`` (anyio) takes a
capacity-limiter token, opens a cancel scope and checks for cancellation
around every call: about a tenth of a signed request's CPU on the event
loop's thread (py-spy, docs/performance.md). ``loop.run_in_executor`` on a
``ThreadPoolExecutor`` does the hand-over with one future.

Two kinds of worker:

- :func:`run_read`, one thread (the read lane), for the nonce transactions
  of :mod:`opensmc.api.nonces` and the read-only calls (``Describe*``,
  ``List*``) that run after them. Every thread that wants the GIL makes
  every other one pay for it (a hand-over is a futex wake-up and a context
  switch on each side, several per request): on PostgreSQL, one thread here
  took 0.49–0.55 ms of server CPU per signed request, two took 0.67–0.75 and
  forty 0.81–0.85 (docs/performance.md). Reads never wait for a lock
  (SQLite's WAL, PostgreSQL's MVCC) and a page of any list is bounded, so the
  lane is rarely busy for long; when its current call has run for longer than
  :data:`STUCK_SECONDS` (a slow query), work that arrives meanwhile goes to
  the write pool instead, so one slow read does not hold up the others.
- :func:`run_sync`, :data:`WORKERS` threads, for calls that write: a write
  may wait for a lock (SQLite's writer, a PostgreSQL row) for as long as
  another transaction holds it, and must not hold up the reads meanwhile.

A cancelled caller (the client went away) stops waiting; the call itself
runs to its end on its thread, as with anyio.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from opensmc.store.db import keep_driver_connection

T = TypeVar("T")

#: worker threads for writes: anyio's default capacity, which the API ran with before (its connection
#: pools are sized for it)
WORKERS = 40
#: seconds after which the read lane's current call counts as slow: later work goes to the write pool
STUCK_SECONDS = 0.05

_pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="opensmc-api")


class _Lane:
    """One worker thread, and when its current call started (None while it is idle)."""

    def __init__(self) -> None:
        # Its reads on PostgreSQL keep one connection (store/db.py: keep_driver_connection).
        self.executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="opensmc-api-read", initializer=keep_driver_connection
        )
        self.busy_since: float | None = None

    def stuck(self) -> bool:
        since = self.busy_since
        return since is not None and time.monotonic() - since > STUCK_SECONDS

    def timed(self, fn: Callable[[], T]) -> Callable[[], T]:
        def call() -> T:
            self.busy_since = time.monotonic()
            try:
                return fn()
            finally:
                self.busy_since = None

        return call


_lane = _Lane()


async def run_sync(fn: Callable[[], T]) -> T:
    """``fn()`` on a worker thread of the write pool; the event loop serves other requests meanwhile."""
    return await asyncio.get_running_loop().run_in_executor(_pool, fn)


async def run_read(fn: Callable[[], T]) -> T:
    """``fn()`` on the read lane (a nonce transaction, or work that only reads), or the write pool if it is stuck."""
    loop = asyncio.get_running_loop()
    if _lane.stuck():
        return await loop.run_in_executor(_pool, fn)
    return await loop.run_in_executor(_lane.executor, _lane.timed(fn))
