"""The orchestrator acts on a job transition of its process at once, not at its next timed pass.

The loop runs with a 120 s interval: after its first pass, only a wake-up
(service/wakeup.py) can explain a Preparing job being prepared. The test
waits for that event (at most 30 s), it does not time it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from opensmc.orchestrator import loop as loop_module
from opensmc.orchestrator.loop import Orchestrator
from opensmc.service.context import Caller, Services
from tests.conftest import ActionCaller
from tests.integration.jobs_support import add_source


def wait_until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 30  # an upper bound for a failure report, not a measurement
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def business(call: ActionCaller, job_id: str) -> str:
    [job] = call("DescribeReplicationJobs", JobId__1=job_id)["ReplicationJobs"]["ReplicationJob"]
    return str(job["BusinessStatus"])


def test_start_wakes_the_orchestrator(
    call: ActionCaller, services: Services, caller: Caller, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = call("CreateReplicationJob", RegionId="local", SourceId=add_source(services, caller))["JobId"]
    passes: list[int] = []
    real_tick = loop_module.tick

    def counted_tick(svc: Services, *, judge_liveness: bool = True) -> int:
        changed = real_tick(svc, judge_liveness=judge_liveness)
        passes.append(changed)
        return changed

    monkeypatch.setattr(loop_module, "tick", counted_tick)
    loop = Orchestrator(services, interval=120.0)
    try:
        loop.start()
        wait_until(lambda: len(passes) >= 1, "the first pass to end")
        assert business(call, job_id) == ""  # Ready: nothing to do yet
        call("StartReplicationJob", JobId=job_id)
        # Only a wake-up can start a second pass within the 120 s interval.
        wait_until(lambda: business(call, job_id) == "Syncing", "the orchestrator to prepare the started job")
        wait_until(lambda: len(passes) >= 2, "the woken pass to end")
        assert passes[1] >= 1  # that pass moved the job
    finally:
        loop.stop()
