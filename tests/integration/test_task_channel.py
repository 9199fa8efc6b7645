"""The agent's task channel, ``GET /agent/v1/tasks``: a long-poll answered by the change it waits for.

No assertion here is about elapsed time. A long-poll runs on a thread with
``wait=60``; the test changes the job and then waits (at most 30 s) for the
answer: only the change can explain an answer before the wait is over. With
:data:`agent_routes.POLL_EVERY` raised beyond the wait, only the in-process
wake-up can (service/wakeup.py); with it as shipped, a change that wakes
nothing (made "by another process") is seen by the re-read.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import httpx
import pytest

from opensmc.api import agent_routes
from opensmc.service import jobs as job_service
from opensmc.service.context import Services
from tests.integration.test_agent_api import TestClient, client, now, reg, token

__all__ = ["client", "now", "token"]  # fixtures used by name


class LongPoll:
    """One ``GET /agent/v1/tasks`` on a thread of its own."""

    def __init__(self, client: TestClient, agent_token: str, since: str, wait: float = 60) -> None:
        self.response: httpx.Response | None = None
        headers = {"Authorization": f"Bearer {agent_token}"}

        def run() -> None:
            self.response = client.get("/agent/v1/tasks", params={"since": since, "wait": str(wait)}, headers=headers)

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def answer(self) -> dict[str, Any]:
        self.thread.join(30)  # far less than the wait: an answer means the server saw the change
        assert self.response is not None, "the long-poll did not answer the change"
        assert self.response.status_code == 200, self.response.text
        body: dict[str, Any] = self.response.json()
        return body


def view(client: TestClient, agent_token: str, **params: str) -> httpx.Response:
    return client.get("/agent/v1/tasks", params=params, headers={"Authorization": f"Bearer {agent_token}"})


def syncing_job(call: Any, services: Services, source_id: str, params: dict[str, Any]) -> str:
    job_id = str(
        call(
            "CreateReplicationJob",
            RegionId="local",
            SourceId=source_id,
            Name="channel",
            ReplicationParameters=json.dumps(params),
        )["JobId"]
    )
    call("StartReplicationJob", JobId=job_id)
    return job_id


@pytest.fixture
def agent(client: TestClient, token: dict[str, str]) -> tuple[str, str]:
    body = reg(client, token, "m-channel").json()
    return str(body["source_id"]), str(body["agent_token"])


def test_answers_at_once_without_since_and_after_the_wait_with_it(client: TestClient, agent: tuple[str, str]) -> None:
    _sid, agent_token = agent
    first = view(client, agent_token)
    assert first.status_code == 200
    body = first.json()
    assert body["tasks"] == [] and isinstance(body["version"], str) and body["version"]
    same = view(client, agent_token, since=body["version"], wait="0")
    assert same.json() == body


def test_refusals_say_what_to_fix(client: TestClient, agent: tuple[str, str]) -> None:
    _sid, agent_token = agent
    missing = client.get("/agent/v1/tasks")
    assert (missing.status_code, missing.json()["code"]) == (401, "MissingAgentToken")
    for wait in ("-1", "61", "soon", "nan"):
        bad = view(client, agent_token, wait=wait)
        assert (bad.status_code, bad.json()["code"]) == (400, "InvalidParameter"), wait
        assert "wait must be a number of seconds from 0 to 60" in bad.json()["message"]
    long_since = view(client, agent_token, since="v" * 65)
    assert long_since.status_code == 400 and "since" in long_since.json()["message"]


def test_a_transition_of_this_process_wakes_the_long_poll(
    client: TestClient, call: Any, services: Services, agent: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sid, agent_token = agent
    # No re-read before the wait is over: only the in-process wake-up can answer early.
    monkeypatch.setattr(agent_routes, "POLL_EVERY", 120.0)
    idle = view(client, agent_token).json()
    job_id = syncing_job(call, services, sid, {"bandwidth_limit": 10})

    poll = LongPoll(client, agent_token, idle["version"])
    job_service.mark_prepared(services, job_id, "ti-channel")  # what the orchestrator does: → Syncing
    started = poll.answer()
    [task] = started["tasks"]
    assert task["job_id"] == job_id and task["replication_parameters"]["bandwidth_limit"] == 10
    assert started["version"] != idle["version"]

    poll = LongPoll(client, agent_token, started["version"])
    call("StopReplicationJob", JobId=job_id)
    stopped = poll.answer()
    assert stopped["tasks"] == [] and stopped["version"] == idle["version"]


def test_a_change_that_wakes_nothing_is_seen_by_the_re_read(
    client: TestClient, call: Any, services: Services, agent: tuple[str, str]
) -> None:
    """What another server process's change looks like here: only the database says it."""
    sid, agent_token = agent
    job_id = syncing_job(call, services, sid, {"bandwidth_limit": 10})
    job_service.mark_prepared(services, job_id, "ti-channel")
    before = view(client, agent_token).json()
    poll = LongPoll(client, agent_token, before["version"])
    # ModifyReplicationJobAttribute wakes no waiter: the long-poll's own re-read must find it.
    call("ModifyReplicationJobAttribute", JobId=job_id, ReplicationParameters=json.dumps({"bandwidth_limit": 0}))
    after = poll.answer()
    [task] = after["tasks"]
    assert task["replication_parameters"]["bandwidth_limit"] == 0
    assert after["version"] != before["version"]


def test_an_agent_on_a_server_without_the_channel_keeps_heartbeating(
    services: Services, token: dict[str, str], tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """An older server (no GET /tasks): the agent says so once and takes its tasks from heartbeats."""
    from dataclasses import replace

    from starlette.applications import Starlette

    from opensmc.agent.runner import run_agent
    from tests.integration.test_agent_api import make_report

    old_routes = [r for r in agent_routes.routes if getattr(r, "path", "") != "/agent/v1/tasks"]
    app = Starlette(routes=old_routes)
    app.state.services = services
    services.settings = replace(services.settings, heartbeat_rate=1)
    beats: list[int] = []

    def report() -> dict[str, Any]:
        beats.append(1)
        return make_report("m-old-server")

    stop = threading.Event()
    with TestClient(app) as old_server, caplog.at_level("INFO", logger="opensmc.agent"):
        t = threading.Thread(
            target=run_agent,
            args=("http://testserver",),
            kwargs={
                "token_id": token["AccessTokenId"],
                "token_code": token["AccessTokenCode"],
                "state_dir": tmp_path,
                "stop_event": stop,
                "http": old_server,
                "report_fn": report,
            },
        )
        t.start()
        try:
            deadline = threading.Event()
            for _ in range(600):  # up to 30 s, polled every 0.05 s
                if len(beats) >= 3 and "has no task channel" in caplog.text:
                    break
                deadline.wait(0.05)
        finally:
            stop.set()
            t.join(30)
    assert not t.is_alive()
    assert len(beats) >= 3 and "has no task channel" in caplog.text, caplog.text
    assert caplog.text.count("has no task channel") == 1  # said once, then asked again only a minute later
    assert "task channel open" not in caplog.text
