"""Group commit of signature nonces: the requests of one event loop share nonce transactions, and their worker.

Every signed request must have its nonce recorded in the database before it
runs (replay protection across every process that shares the database). One
transaction per request was a large share of a signed request's cost, and on
SQLite every one of them queued for the single writer. Here a request puts
its claim (and the handler to run once it is recorded) in the loop's pending
list and awaits it; when no flush is under way one starts at once, on the
read lane (:func:`opensmc.api.threads.run_read`), with every claim pending
at that moment (:func:`opensmc.service.accounts.record_nonces`, one
transaction); the claims that arrive meanwhile go together in the next flush.

Once the transaction has committed, the flush lets the next one start and
runs the read-only handlers of its recorded claims itself, one after the
other, on the same thread, for up to :data:`BATCH_HANDLER_SECONDS`. A
handler that writes runs on a worker of the write pool; one not reached by
then is queued on the lane again, behind the next flush. A thread hop
(waking a worker, handing the GIL over, waking the loop) costs more CPU
than a small handler (docs/performance.md), so a batch of reads makes two
hops instead of two per request. A lone request waits
for nothing but its own transaction, recorded on the worker thread that then
runs its handler (:meth:`NonceBatcher.claim_then`). No request runs, or is
answered, before the transaction that recorded its nonce has committed, so
the replay guarantee is the one of ``accounts.check_nonce``.

All the bookkeeping runs on the event loop's thread: no lock.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from opensmc.api.threads import run_read, run_sync
from opensmc.service import accounts
from opensmc.service.context import Services

T = TypeVar("T")

#: seconds a flush spends running its batch's read handlers before it queues the rest on the lane again,
#: behind the next flush: what a request may wait for the handlers before it in its batch (~30 small calls)
BATCH_HANDLER_SECONDS = 0.005

#: what a flush did with a claim's handler: not run (None), ``(True, result)`` or ``(False, exception)``
_Ran = tuple[bool, Any] | None


@dataclass(slots=True)
class _Entry:
    claim: accounts.NonceClaim
    then: Callable[[], Any] | None
    #: ``then`` only reads: the flush may run it (writes go to a worker of their own)
    read_only: bool
    future: asyncio.Future[tuple[str, _Ran]]


@dataclass
class _Loop:
    pending: list[_Entry] = field(default_factory=list)
    in_flight: int = 0
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


class NonceBatcher:
    """The nonce claims of one :class:`Services`, batched per event loop."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Loop] = weakref.WeakKeyDictionary()

    async def claim(self, claim: accounts.NonceClaim) -> str:
        """The claim's outcome (``accounts.RECORDED``, ``REPLAYED``, ``STALE`` or ``IN_MEMORY``)."""
        outcome, _ran = await self._enqueue(claim, None, read_only=True)
        return outcome

    async def claim_then(
        self, claim: accounts.NonceClaim, then: Callable[[], T], *, read_only: bool
    ) -> tuple[str, tuple[T] | None]:
        """The claim's outcome and, when it is ``RECORDED``, ``(then(),)`` run on a worker thread.

        When no nonce transaction is under way or waiting, the claim is
        recorded alone on the worker thread that then runs ``then``: a lone
        request makes one thread hop, not two. Claims arriving meanwhile wait
        for that transaction to commit and go together in the next, whose
        worker runs their handlers too when they only read (``read_only``;
        the module docstring). Work that writes runs on a worker of the
        write pool (:mod:`opensmc.api.threads`). An exception of ``then`` is
        raised here, wherever it ran.
        """
        loop = asyncio.get_running_loop()
        state = self._state(loop)
        run = run_read if read_only else run_sync
        if state.in_flight or state.pending:
            outcome, ran = await self._enqueue(claim, then, read_only=read_only)
            if outcome != accounts.RECORDED:
                return outcome, None
            if ran is None:  # a write (the write pool), or the flush's handler time was up (the lane again)
                return outcome, (await run(then),)
            ok, value = ran
            if not ok:
                raise value
            return outcome, (value,)
        state.in_flight += 1

        def recorded() -> None:  # on the loop, once the lone transaction is over
            state.in_flight -= 1
            if state.pending:
                self._start(loop, state)

        def alone() -> tuple[str, tuple[T] | None]:
            try:
                [outcome] = accounts.record_nonces(self.services, [claim])
            finally:
                loop.call_soon_threadsafe(recorded)
            return (outcome, (then(),)) if outcome == accounts.RECORDED else (outcome, None)

        return await run(alone)

    async def _enqueue(
        self, claim: accounts.NonceClaim, then: Callable[[], Any] | None, *, read_only: bool
    ) -> tuple[str, _Ran]:
        loop = asyncio.get_running_loop()
        state = self._state(loop)
        future: asyncio.Future[tuple[str, _Ran]] = loop.create_future()
        state.pending.append(_Entry(claim, then, read_only, future))
        if not state.in_flight:
            self._start(loop, state)
        return await future

    def _state(self, loop: asyncio.AbstractEventLoop) -> _Loop:
        state = self._loops.get(loop)
        if state is None:
            state = self._loops[loop] = _Loop()
        return state

    def _start(self, loop: asyncio.AbstractEventLoop, state: _Loop) -> None:
        batch = state.pending[: accounts.NONCE_BATCH_MAX]
        del state.pending[: accounts.NONCE_BATCH_MAX]
        state.in_flight += 1
        task = loop.create_task(self._flush(loop, state, batch))
        state.tasks.add(task)  # the loop keeps only a weak reference to a task
        task.add_done_callback(state.tasks.discard)

    async def _flush(self, loop: asyncio.AbstractEventLoop, state: _Loop, batch: list[_Entry]) -> None:
        released = False

        def release() -> None:  # on the loop: the batch's transaction is over, the next may start
            nonlocal released
            if released:
                return
            released = True
            state.in_flight -= 1
            if state.pending and not loop.is_closed():
                self._start(loop, state)  # what arrived meanwhile, in one transaction

        def work() -> tuple[list[str], list[_Ran]]:
            try:
                outcomes = accounts.record_nonces(self.services, [e.claim for e in batch])
            finally:
                loop.call_soon_threadsafe(release)
            return outcomes, run_handlers(batch, outcomes)

        try:
            outcomes, ran = await run_read(work)
        except Exception as exc:  # the database failed: each request answers with it
            for entry in batch:
                if not entry.future.done():
                    entry.future.set_exception(exc)
        except BaseException:  # cancelled (the loop is shutting down): nobody waits for an answer
            for entry in batch:
                entry.future.cancel()
            raise
        else:
            for entry, outcome, done in zip(batch, outcomes, ran, strict=True):
                if not entry.future.done():  # a request cancelled meanwhile has nobody to tell
                    entry.future.set_result((outcome, done))
        finally:
            release()  # if the worker never got to it


def run_handlers(batch: Sequence[_Entry], outcomes: Sequence[str]) -> list[_Ran]:
    """Run the read-only handlers of a batch's recorded claims in order, until :data:`BATCH_HANDLER_SECONDS` are up.

    On the flush's worker thread, after the commit. A handler's exception is
    its request's answer, not the batch's.
    """
    deadline = time.monotonic() + BATCH_HANDLER_SECONDS
    ran: list[_Ran] = []
    for entry, outcome in zip(batch, outcomes, strict=True):
        if entry.then is None or not entry.read_only or outcome != accounts.RECORDED or time.monotonic() > deadline:
            ran.append(None)
            continue
        try:
            ran.append((True, entry.then()))
        except Exception as exc:
            ran.append((False, exc))
    return ran
