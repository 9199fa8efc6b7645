"""Group commit of signature nonces: the requests of one event loop share nonce transactions.

Every signed request must have its nonce recorded in the database before it
runs (replay protection across every process that shares the database). One
transaction per request was a large share of a signed request's cost, and on
SQLite every one of them queued for the single writer. Here a request puts
its claim in the loop's pending list and awaits it; when no flush is under
way one starts at once, on a worker thread, with every claim pending at that
moment (:func:`opensmc.service.accounts.record_nonces`, one transaction); the
claims that arrive meanwhile go together in the next flush (on PostgreSQL a
few flushes may be under way at once: :data:`FLIGHTS_POSTGRES`). A lone request
waits for nothing but its own transaction, recorded on the worker thread that
then runs its handler (:meth:`NonceBatcher.claim_then`); under load, one commit
answers many requests. No request is answered before the transaction that recorded
its nonce has committed, so the replay guarantee is the one of
``accounts.check_nonce``.

All the bookkeeping runs on the event loop's thread: no lock.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from opensmc.api.threads import run_sync
from opensmc.service import accounts
from opensmc.service.context import Services

T = TypeVar("T")

#: nonce transactions in flight at once per event loop: one on SQLite (it has one writer anyway);
#: a few on PostgreSQL, where a commit waits for its WAL flush and concurrent commits share one
FLIGHTS_SQLITE = 1
FLIGHTS_POSTGRES = 4


@dataclass
class _Loop:
    pending: list[tuple[accounts.NonceClaim, asyncio.Future[str]]] = field(default_factory=list)
    in_flight: int = 0
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


class NonceBatcher:
    """The nonce claims of one :class:`Services`, batched per event loop."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.flights = FLIGHTS_SQLITE if services.db.is_sqlite else FLIGHTS_POSTGRES
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Loop] = weakref.WeakKeyDictionary()

    async def claim(self, claim: accounts.NonceClaim) -> str:
        """The claim's outcome (``accounts.RECORDED``, ``REPLAYED``, ``STALE`` or ``IN_MEMORY``)."""
        loop = asyncio.get_running_loop()
        state = self._state(loop)
        future: asyncio.Future[str] = loop.create_future()
        state.pending.append((claim, future))
        if state.in_flight < self.flights:
            self._start(loop, state)
        return await future

    async def claim_then(self, claim: accounts.NonceClaim, then: Callable[[], T]) -> tuple[str, tuple[T] | None]:
        """The claim's outcome and, when it is ``RECORDED``, ``(then(),)`` run on a worker thread.

        When no nonce transaction is under way or waiting, the claim is
        recorded alone on the worker thread that then runs ``then``: a lone
        request makes one thread hop, not two. Claims arriving meanwhile wait
        for that transaction to commit and go together in the next.
        """
        loop = asyncio.get_running_loop()
        state = self._state(loop)
        if state.in_flight or state.pending:
            outcome = await self.claim(claim)
            if outcome != accounts.RECORDED:
                return outcome, None
            return outcome, (await run_sync(then),)
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

        return await run_sync(alone)

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

    async def _flush(
        self,
        loop: asyncio.AbstractEventLoop,
        state: _Loop,
        batch: list[tuple[accounts.NonceClaim, asyncio.Future[str]]],
    ) -> None:
        try:
            outcomes = await run_sync(lambda: accounts.record_nonces(self.services, [c for c, _ in batch]))
        except Exception as exc:  # the database failed: each request answers with it
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
        except BaseException:  # cancelled (the loop is shutting down): nobody waits for an answer
            for _, future in batch:
                future.cancel()
            raise
        else:
            for (_, future), outcome in zip(batch, outcomes, strict=True):
                if not future.done():  # a request cancelled meanwhile has nobody to tell
                    future.set_result(outcome)
        finally:
            state.in_flight -= 1
            if state.pending and not loop.is_closed():
                self._start(loop, state)  # what arrived meanwhile, in one transaction
