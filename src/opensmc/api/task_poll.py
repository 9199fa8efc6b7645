"""One database read per poll interval for all of a process's open task long-polls.

An open ``GET /agent/v1/tasks`` must see a change made by another server
process within ``agent_routes.POLL_EVERY`` (a change of this process wakes it at once,
``service/wakeup.py``). Each long-poll used to re-read its own source's task
view version four times a second: with hundreds of agents on one API process
that was most of its work while nothing changed. Here the long-polls of one
event loop register what they wait on (source, the version they hold), and one
task reads the versions of all their sources in one query per interval
(``agents.task_view_versions``), waking only those whose version moved. The
task runs only while some long-poll waits.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from starlette.concurrency import run_in_threadpool

from opensmc.service import agents
from opensmc.service.context import Services

log = logging.getLogger("opensmc.api.agent")

@dataclass(eq=False)
class Watch:
    """One long-poll's wait: set ``moved`` once the source's version is not ``since``."""

    source_id: str
    since: str
    moved: asyncio.Event = field(default_factory=asyncio.Event)
    version: str = ""  #: the version the shared read found (when ``moved`` is set)


@dataclass
class _Loop:
    watches: set[Watch] = field(default_factory=set)
    task: asyncio.Task[None] | None = None


class TaskPoll:
    """The shared re-read of one :class:`Services`' long-polls, per event loop."""

    def __init__(self, services: Services, every: Callable[[], float]) -> None:
        self.services = services
        self.every = every  #: the interval, asked before each read (``agent_routes.POLL_EVERY``)
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Loop] = weakref.WeakKeyDictionary()

    @contextmanager
    def watch(self, source_id: str, since: str) -> Iterator[Watch]:
        """Registered for the block: ``moved`` is set when a shared read finds another version."""
        loop = asyncio.get_running_loop()
        state = self._loops.get(loop)
        if state is None:
            state = self._loops[loop] = _Loop()
        w = Watch(source_id, since)
        state.watches.add(w)
        if state.task is None:
            state.task = loop.create_task(self._run(state))
        try:
            yield w
        finally:
            state.watches.discard(w)

    async def _run(self, state: _Loop) -> None:
        try:
            while state.watches:
                await asyncio.sleep(self.every())
                if not state.watches:
                    break
                ids = sorted({w.source_id for w in state.watches})
                try:
                    versions = await run_in_threadpool(agents.task_view_versions, self.services, ids)
                except Exception:  # the database is away: each long-poll still ends at its deadline
                    log.warning("re-reading the task views of %d open long-polls failed", len(ids), exc_info=True)
                    continue
                for w in list(state.watches):
                    found = versions.get(w.source_id)
                    if found is not None and found != w.since:
                        w.version = found
                        w.moved.set()
        finally:
            state.task = None
