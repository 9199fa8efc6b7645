"""In-process wake-ups: "a job of this process changed state, look again now".

The agent channel (``GET /agent/v1/tasks``) and the orchestrator loop both
re-read the database on a short interval, which is what makes several server
processes on one database work: the process that takes a StartReplicationJob
is not necessarily the one an agent is connected to. Within one process,
though, a job transition can wake them at once instead of at the next poll:
:func:`notify` is called after each committed transition (``service/jobs.py``),
and wakes

* every asyncio waiter (:func:`waiter`, one per open long-poll), through its
  event loop's ``call_soon_threadsafe`` (transitions run on worker threads);
* the orchestrator's :class:`threading.Event` (:data:`orchestrator`).

A wake-up only means "re-read": waiters never learn *what* changed from it,
so a spurious one costs a query and a lost one costs one poll interval.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager

#: set by :func:`notify`; the orchestrator loop waits on it between passes
orchestrator = threading.Event()

_lock = threading.Lock()
_waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()


def notify() -> None:
    """A job changed state in this process: wake the orchestrator and every open long-poll."""
    orchestrator.set()
    with _lock:
        waiters = list(_waiters)
    for loop, event in waiters:
        try:
            loop.call_soon_threadsafe(event.set)
        except RuntimeError:  # that loop was closed meanwhile: its waiter is gone with it
            pass


@contextmanager
def waiter() -> Iterator[asyncio.Event]:
    """An asyncio event that :func:`notify` sets, registered for the duration of the block.

    Call from a coroutine (it binds to the running loop); clear the event
    before each re-read so that a notification during the read is not lost.
    """
    entry = (asyncio.get_running_loop(), asyncio.Event())
    with _lock:
        _waiters.add(entry)
    try:
        yield entry[1]
    finally:
        with _lock:
            _waiters.discard(entry)
