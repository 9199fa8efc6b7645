"""The worker threads of signed API requests: one plain executor, not anyio's thread pool.

The store is synchronous, so every SMC call runs its database work on a
worker thread. ``starlette.concurrency.run_in_threadpool`` (anyio) takes a
capacity-limiter token, opens a cancel scope and checks for cancellation
around every call: about a tenth of a signed request's CPU on the event
loop's thread (py-spy, docs/performance.md). ``loop.run_in_executor`` on a
``ThreadPoolExecutor`` of the same size does the hand-over with one future.

A cancelled caller (the client went away) stops waiting; the call itself
runs to its end on its thread, as with anyio.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

#: worker threads: anyio's default capacity, which the API ran with before (its connection pools are sized for it)
WORKERS = 40

_pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="opensmc-api")


async def run_sync(fn: Callable[[], T]) -> T:
    """``fn()`` on a worker thread; the event loop serves other requests meanwhile."""
    return await asyncio.get_running_loop().run_in_executor(_pool, fn)
