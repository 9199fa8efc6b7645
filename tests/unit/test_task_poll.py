"""The shared re-read of open task long-polls: one read for all sources per interval, only movers woken."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from opensmc.api.task_poll import TaskPoll
from opensmc.service import agents


def test_one_read_per_interval_for_every_open_long_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[list[str]] = []
    versions = {"s-a": "v1", "s-b": "v1", "s-c": "v1"}

    def task_view_versions(_svc: Any, ids: list[str]) -> dict[str, str]:
        reads.append(list(ids))
        return {i: versions[i] for i in ids}

    monkeypatch.setattr(agents, "task_view_versions", task_view_versions)
    poll = TaskPoll(None, lambda: 0.01)  # type: ignore[arg-type]

    async def scenario() -> None:
        with poll.watch("s-a", "v1") as a, poll.watch("s-b", "v1") as b, poll.watch("s-c", "v1") as c:
            while len(reads) < 3:
                await asyncio.sleep(0.01)
            assert not (a.moved.is_set() or b.moved.is_set() or c.moved.is_set())
            versions["s-b"] = "v2"  # changed by "another process"
            await asyncio.wait_for(b.moved.wait(), timeout=30)
            assert b.version == "v2" and not a.moved.is_set() and not c.moved.is_set()
        await asyncio.sleep(0.05)  # nobody waits any more: the reads stop
        done = len(reads)
        await asyncio.sleep(0.05)
        assert len(reads) == done

    asyncio.run(scenario())
    assert all(r == ["s-a", "s-b", "s-c"] for r in reads)  # one read each time, for all three
