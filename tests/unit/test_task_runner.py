"""The agent's TaskRunner: the channel's task view starts, stops and re-limits tasks; a heartbeat only starts."""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from opensmc.agent import tasks as agent_tasks
from opensmc.agent.tasks import TaskControl, TaskRunner, TaskStopped


class FakeClient:
    def __init__(self) -> None:
        self.results: list[dict[str, Any]] = []

    def task_progress(self, token: str, body: dict[str, Any]) -> dict[str, Any]:
        return {"continue": True, "bandwidth_limit": 99.0}

    def task_result(self, token: str, body: dict[str, Any]) -> dict[str, Any]:
        self.results.append(body)
        return {"accepted": True}


def task(limit: float, tid: str = "j-1:1") -> dict[str, Any]:
    job, run = tid.split(":")
    return {"task_id": tid, "job_id": job, "run_id": int(run), "disks": [],
            "replication_parameters": {"bandwidth_limit": limit}}  # fmt: skip


def wait(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 30  # a bound for the failure report, not a measurement
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


@pytest.fixture
def controls(monkeypatch: pytest.MonkeyPatch) -> list[TaskControl]:
    """run_task replaced by one that runs until stopped, like a long send."""
    seen: list[TaskControl] = []

    def fake_run_task(
        task: dict[str, Any],
        report: Callable[[int, int], tuple[bool, float]],
        tls: ssl.SSLContext | None = None,
        control: TaskControl | None = None,
        cache_dir: str | None = None,
        file_options: object = None,
    ) -> dict[str, Any]:
        assert control is not None
        seen.append(control)
        control.stopped.wait(30)
        raise TaskStopped("stopped")

    monkeypatch.setattr(agent_tasks, "run_task", fake_run_task)
    return seen


def test_the_channel_view_starts_relimits_and_stops(controls: list[TaskControl]) -> None:
    client = FakeClient()
    runner = TaskRunner(client, lambda: "token")  # type: ignore[arg-type]
    runner.apply([task(10)])
    wait(lambda: len(controls) == 1, "the task to start")
    [control] = controls
    assert control.limit == 10 and control.follows_channel
    runner.apply([task(10)])  # the same view again: the same attempt goes on
    runner.apply([task(0)])  # ModifyReplicationJobAttribute: the limit is lifted in place
    assert control.limit == 0 and not control.stopped.is_set() and len(controls) == 1
    runner.apply([])  # StopReplicationJob: the task is gone from the view
    assert control.stopped.is_set()
    runner.join(30)
    assert not runner.busy() and client.results == []  # stopped, not failed: no result report


def test_a_heartbeat_list_only_starts_tasks(controls: list[TaskControl]) -> None:
    runner = TaskRunner(FakeClient(), lambda: "token")  # type: ignore[arg-type]
    runner.handle([task(5)])
    wait(lambda: len(controls) == 1, "the task to start")
    runner.handle([])  # a heartbeat's list is no authority on what to stop
    assert not controls[0].stopped.is_set() and not controls[0].follows_channel
    runner.apply([task(5)])
    assert controls[0].follows_channel  # the channel took over
    runner.channel_lost()
    assert not controls[0].follows_channel  # progress replies speak for it again
    runner.apply([])
    runner.join(30)
    assert not runner.busy()


def test_control_applies_limits_to_the_attached_limiter() -> None:
    from opensmc.agent.pipeline import RateLimitedSender

    class Null:
        def send_batch(self, frames: Any) -> None:
            pass

    control = TaskControl(8)
    limiter = RateLimitedSender(Null(), 0)
    control.attach(limiter)
    assert limiter.limit == pytest.approx(8)
    threading.Thread(target=control.set_limit, args=(2.5,)).start()
    wait(lambda: abs(limiter.limit - 2.5) < 1e-9, "the new limit on the limiter")


class FlakyChannelClient(FakeClient):
    """The channel fails twice (a server restart), then answers views; the last answer stops the agent."""

    def __init__(self, stop: threading.Event) -> None:
        super().__init__()
        self.stop = stop
        self.calls: list[str] = []  # the `since` of each call

    def tasks(self, agent_token: str, since: str, wait: float) -> dict[str, Any]:
        import httpx

        from opensmc.agent.client import ServerUnavailable

        self.calls.append(since)
        if len(self.calls) == 1:
            raise httpx.ConnectError("connection refused")
        if len(self.calls) == 2:
            raise ServerUnavailable("GET /tasks: HTTP 503", 503)
        if len(self.calls) == 4:
            self.stop.set()
        return {"version": f"v{len(self.calls)}", "tasks": []}


def test_the_channel_reconnects_with_backoff_and_sends_back_its_version(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    from opensmc.agent import runner
    from opensmc.agent.state import AgentState

    waits: list[float] = []
    monkeypatch.setattr(runner, "BACKOFF_START", 0.01)
    stop = threading.Event()
    real_wait = stop.wait

    def recorded_wait(timeout: float | None = None) -> bool:
        waits.append(timeout or 0)
        return real_wait(timeout)

    stop.wait = recorded_wait  # type: ignore[method-assign]
    client = FlakyChannelClient(stop)
    r = runner._Runner(client, "http://server", {}, tmp_path, lambda: {})  # type: ignore[arg-type]
    r.state = AgentState("http://server", "s-1", "s-1.secret", "m-1")
    r.channel(stop)
    # Two failures, each followed by a backoff that doubles; then views, each call sending the last version.
    assert client.calls == ["", "", "", "v3"]
    assert waits[:2] == [0.01, 0.02]
    assert r.channel_ok


def _retries_done() -> None:
    for t in threading.enumerate():
        if t.name.startswith("retry-"):
            t.join(30)


@pytest.mark.parametrize("still_wanted", [True, False])
def test_an_attempt_that_lost_contact_starts_again_while_the_channel_wants_it(
    monkeypatch: pytest.MonkeyPatch, still_wanted: bool
) -> None:
    """A lost receiver changes no task view, so the channel says nothing: the runner retries on its own."""
    attempts: list[TaskControl] = []

    def fake_run_task(
        task: dict[str, Any],
        report: Callable[[int, int], tuple[bool, float]],
        tls: ssl.SSLContext | None = None,
        control: TaskControl | None = None,
        cache_dir: str | None = None,
        file_options: object = None,
    ) -> dict[str, Any]:
        assert control is not None
        attempts.append(control)
        if len(attempts) == 1:
            raise agent_tasks.LostContact(ConnectionError("receiver gone"), 0)
        control.stopped.wait(30)
        raise TaskStopped("stopped")

    monkeypatch.setattr(agent_tasks, "run_task", fake_run_task)
    runner = TaskRunner(FakeClient(), lambda: "token")  # type: ignore[arg-type]
    runner.apply([task(10)])
    wait(lambda: len(attempts) == 1 and not runner.busy(), "the first attempt to end")
    if not still_wanted:
        runner.apply([])  # stopped meanwhile: the retry must not bring it back
    _retries_done()
    if still_wanted:
        wait(lambda: len(attempts) == 2, "the retry")
        assert attempts[1].follows_channel and not attempts[1].stopped.is_set()
        runner.apply([])
        runner.join(30)
    else:
        assert len(attempts) == 1
    assert not runner.busy()
