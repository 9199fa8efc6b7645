"""The agent's task channel between real processes: work starts, stops and re-limits without heartbeats.

The server runs with ``--heartbeat-rate 60``: the agent heartbeats once when
it starts, then not for a minute. Whatever reaches it in between came on the
channel; the tests check that by events (the agent's log, the source's
``last_heartbeat_at`` in the database), never by timing.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import ServerProcess
from tests.e2e.flows import (
    Agent,
    create_job,
    db,
    describe,
    register,
    start_server,
    stop,
    wait_for,
    wait_status,
)

pytestmark = pytest.mark.e2e

MiB = 1 << 20


def raw_disk(path: Path, size_mib: int, data_mib: list[tuple[int, int]]) -> Path:
    """A sparse file with random bytes at (offset MiB, length MiB) places, zeros elsewhere."""
    with path.open("wb") as f:
        f.truncate(size_mib * MiB)
        for offset, length in data_mib:
            f.seek(offset * MiB)
            f.write(os.urandom(length * MiB))
    return path


def last_heartbeat(server: ServerProcess, source_id: str) -> Any:
    with db(server) as conn:
        return conn.execute("SELECT last_heartbeat_at FROM sources WHERE id=?", (source_id,)).fetchone()[0]


def run_detail(server: ServerProcess, job_id: str) -> dict[str, Any]:
    with db(server) as conn:
        row = conn.execute("SELECT detail FROM job_runs WHERE job_id=? ORDER BY id DESC", (job_id,)).fetchone()
    return dict(json.loads(row[0] or "{}")) if row else {}


def slow_server(tmp_path: Path) -> ServerProcess:
    return start_server(tmp_path / "data", "--heartbeat-grace", "300", "--heartbeat-rate", "60")


def test_started_job_reaches_the_agent_on_its_channel(tmp_path: Path) -> None:
    disk = raw_disk(tmp_path / "disk.img", 32, [(3, 4), (20, 2)])
    server = slow_server(tmp_path)
    agent: Agent | None = None
    try:
        agent, source_id = register(server, [disk], tmp_path / "agent")
        a = agent
        wait_for(lambda: "task channel open" in a.log_text(), timeout=30, what="the agent's task channel")
        beat = last_heartbeat(server, source_id)
        job_id = create_job(server, source_id, "channel-start")
        server.call_json("StartReplicationJob", "--JobId", job_id)
        wait_status(server, job_id, "Finished", timeout=120)
        log = agent.log_text()
        assert f"task {job_id}:1: starting (from the task channel)" in log, log
        assert "(from the heartbeat)" not in log
        # No heartbeat got through in between if its time did not move, so the channel brought the task
        # (and the job ended before the next heartbeat, due a minute after the first).
        assert last_heartbeat(server, source_id) == beat
    finally:
        if agent:
            agent.stop()
        stop(server.proc)


def test_progress_moves_with_the_acknowledged_bytes(tmp_path: Path) -> None:
    """With a low bandwidth_limit, Progress climbs in steps, never back, and is 100 only when synced."""
    disk = raw_disk(tmp_path / "disk.img", 48, [(2, 6), (30, 6)])  # 12 MiB to move at 1.5 MB/s
    server = slow_server(tmp_path)
    agent: Agent | None = None
    try:
        agent, source_id = register(server, [disk], tmp_path / "agent")
        job_id = create_job(
            server, source_id, "progress", "--ReplicationParameters", json.dumps({"bandwidth_limit": 12})
        )
        server.call_json("StartReplicationJob", "--JobId", job_id)
        seen: list[tuple[str, float]] = []
        details: list[dict[str, Any]] = []
        while True:
            job = describe(server, job_id)
            state = f"{job['Status']}/{job['BusinessStatus']}"
            assert job["Status"] != "InError", job
            seen.append((state, float(job["Progress"])))
            if state == "Running/Syncing":
                details.append(run_detail(server, job_id).get("progress") or {})
            if job["Status"] == "Finished":
                break
            time.sleep(0.25)
        progress = [p for _s, p in seen]
        assert progress == sorted(progress), seen  # monotonic
        syncing = [p for s, p in seen if s == "Running/Syncing"]
        assert syncing and max(syncing) < 100, seen  # never 100 before the result
        assert len({p for p in syncing if 0 < p < 100}) >= 3, seen  # steps, not a jump from 0 to 100
        assert seen[-1] == ("Finished/", 100.0)
        moving = [d for d in details if d.get("rate")]
        assert moving, details  # the run record keeps a rate and an ETA while syncing
        assert all(d["bytes_total"] == 48 * MiB and 0 <= d["bytes_done"] <= d["bytes_total"] for d in moving)
        assert any(d.get("eta") is not None for d in moving)
    finally:
        if agent:
            agent.stop()
        stop(server.proc)
