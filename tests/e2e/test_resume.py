"""Interrupted migrations resume: agent killed, server killed, job stopped; bandwidth changed.

A ``bandwidth_limit`` of 40 Mbit/s (5 MB/s) makes the ~50 MB of a 96 MiB
disk take about ten seconds, long enough to interrupt it mid-Syncing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from opensmc.cli.call import invoke
from opensmc.cli.credentials import ClientCredentials
from tests.e2e.conftest import ServerProcess
from tests.e2e.disks import Disk, MiB, build_disk, nonzero_bytes, require_tools, sha256_file
from tests.e2e.flows import (
    Agent,
    agent_stats,
    create_job,
    describe,
    export,
    register,
    runs,
    staging_bytes,
    start_migration_server,
    stop,
    wait_for,
    wait_status,
)

pytestmark = pytest.mark.e2e

LIMIT = {"bandwidth_limit": 40}


@dataclass
class Setup:
    tmp: Path
    disk: Disk
    sha: str
    nonzero: int
    server: ServerProcess
    agent: Agent
    source_id: str


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    require_tools()
    disk = build_disk(tmp_path / "sys.img", 96 * MiB, parts=2, seed=7, files=10, random_mib=40)
    server = start_migration_server(tmp_path)
    agent, source_id = register(server, [disk.path], tmp_path / "agent")
    s = Setup(tmp_path, disk, disk.sha256(), nonzero_bytes(disk.path), server, agent, source_id)
    try:
        yield s
    finally:
        s.agent.stop()
        stop(s.server.proc)


def start_limited_job(s: Setup, name: str, params: dict[str, Any] = LIMIT) -> tuple[str, str]:
    job_id = create_job(s.server, s.source_id, name, "--ReplicationParameters", json.dumps(params))
    s.server.call_json("StartReplicationJob", "--JobId", job_id)
    job = wait_status(s.server, job_id, "Running", "Syncing", timeout=30)
    return job_id, str(job["TransitionInstanceId"])


def wait_held(s: Setup, ti: str, fraction: float) -> int:
    """Wait until the receiver holds ``fraction`` of what a full send moves; the bytes held."""
    return wait_for(
        lambda: (n := staging_bytes(s.server, ti)) >= fraction * s.nonzero and n,
        timeout=30,
        what=f"{fraction:.0%} of the disk on the receiver",
    )


def settled_bytes(s: Setup, ti: str) -> int:
    """Staging bytes once they stopped growing (the batch in flight landed or was dropped)."""
    last = -1
    while True:
        now = staging_bytes(s.server, ti)
        if now == last:
            return now
        last = now
        time.sleep(0.7)


def check_export(s: Setup, job: dict[str, Any]) -> None:
    out = export(s.server, str(job["ImageId"]), 0, s.tmp / "exported.img")
    assert sha256_file(out) == s.sha
    assert job["Progress"] == 100


def test_agent_killed_mid_sync_resumes(setup: Setup) -> None:
    s = setup
    job_id, ti = start_limited_job(s, "kill-agent")
    wait_held(s, ti, 0.3)
    s.agent.stop(sig_kill=True)
    held = settled_bytes(s, ti)
    assert held < s.nonzero, "the send finished before the agent was killed"
    assert describe(s.server, job_id)["BusinessStatus"] == "Syncing"

    s.agent.start()  # same state dir: the same source, the same task
    job = wait_status(s.server, job_id, "Finished", timeout=60)
    check_export(s, job)
    [run] = runs(s.server, job_id)  # one run: the restarted agent continued it
    sent = agent_stats(run)["bytes_plain"]
    # The second attempt sends what the receiver did not hold, plus at most what was in flight.
    assert sent <= s.nonzero - held + 16 * MiB, (sent, s.nonzero, held)
    assert sent < 0.8 * s.nonzero, (sent, s.nonzero)


def test_server_killed_mid_sync_resumes(setup: Setup) -> None:
    s = setup
    job_id, ti = start_limited_job(s, "kill-server")
    wait_held(s, ti, 0.3)
    port = int(s.server.endpoint.rsplit(":", 1)[1])
    stop(s.server.proc, sig_kill=True)
    held = staging_bytes(s.server, ti)
    # Down long enough that the agent notices (its next batch or progress report fails);
    # the attempt ends without failing the job.
    wait_for(lambda: "lost contact" in s.agent.log_text(), timeout=15, what="the agent to notice")
    s.server = start_migration_server(s.tmp, port=port)
    job = wait_status(s.server, job_id, "Finished", timeout=60)
    check_export(s, job)
    [run] = runs(s.server, job_id)  # the same run went on
    sent = agent_stats(run)["bytes_plain"]
    # The receiver rebuilt its map from the bytes it held (it was killed before a flush),
    # so the resumed attempt sent only the rest.
    assert sent <= s.nonzero - held + 16 * MiB, (sent, s.nonzero, held)
    assert "failed" not in s.agent.log_text()


def test_stop_during_sync_then_start_resumes(setup: Setup) -> None:
    s = setup
    job_id, ti = start_limited_job(s, "stop-start")
    wait_held(s, ti, 0.2)
    s.server.call_json("StopReplicationJob", "--JobId", job_id)
    wait_status(s.server, job_id, "Stopped", timeout=5)
    # The agent's task channel answers the Stop at once (the job's task is gone from its view),
    # or else its next progress reply does: the task stops before its next batch goes out.
    # Wait for that event, then check that nothing more lands.
    wait_for(lambda: "stopped by the server" in s.agent.log_text(), timeout=30, what="the agent to stop the task")
    held = settled_bytes(s, ti)
    time.sleep(2)
    assert staging_bytes(s.server, ti) == held, "the agent kept sending after StopReplicationJob"
    assert held < s.nonzero

    s.server.call_json("StartReplicationJob", "--JobId", job_id)
    job = wait_status(s.server, job_id, "Finished", timeout=60)
    check_export(s, job)
    first, second = runs(s.server, job_id)
    assert first["end_time"] is not None
    sent = agent_stats(second)["bytes_plain"]
    assert sent <= s.nonzero - held + 16 * MiB, (sent, s.nonzero, held)


def test_bandwidth_limit_changed_while_syncing(setup: Setup) -> None:
    s = setup
    job_id, ti = start_limited_job(s, "bandwidth", {"bandwidth_limit": 8})  # 1 MB/s: ~50 s in all
    wait_held(s, ti, 0.05)
    creds = ClientCredentials(**s.server.credentials)
    status, body = invoke(
        creds,
        "ModifyReplicationJobAttribute",
        {"JobId": job_id, "ReplicationParameters": json.dumps({"bandwidth_limit": 0})},
    )
    # ReplicationParameters may change while Syncing (issue 3); the agent's task channel
    # answers with the new view and the running task applies the new limit at once.
    assert status == 200, body
    wait_for(
        lambda: "bandwidth limit now off (task channel)" in s.agent.log_text(),
        timeout=30,
        what="the agent to lift the limit",
    )
    job = wait_status(s.server, job_id, "Finished", timeout=180)
    check_export(s, job)
