"""An agent lost mid-Syncing past its grace period fails the job; when it is back, Start resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.conftest import start_server, stop
from tests.e2e.disks import MiB, build_disk, require_tools, sha256_file
from tests.e2e.flows import create_job, describe, export, register, staging_bytes, wait_for, wait_status

pytestmark = pytest.mark.e2e


def test_agent_lost_past_grace_fails_then_resumes(tmp_path: Path) -> None:
    require_tools()
    disk = build_disk(tmp_path / "sys.img", 96 * MiB, label="gpt", parts=2, seed=41)
    server = start_server(tmp_path / "data", "--heartbeat-grace", "3", "--heartbeat-rate", "1")
    agent = None
    try:
        agent, source_id = register(server, [disk.path], tmp_path / "agent")
        job_id = create_job(server, source_id, "lost", "--ReplicationParameters", json.dumps({"bandwidth_limit": 8}))
        server.call_json("StartReplicationJob", "--JobId", job_id)
        job = wait_status(server, job_id, "Running", "Syncing", timeout=30)
        ti = str(job["TransitionInstanceId"])
        wait_for(lambda: staging_bytes(server, ti) > 2 * MiB, timeout=30, what="data on the receiver")
        agent.stop(sig_kill=True)

        failed = wait_status(server, job_id, "InError", timeout=60)
        assert failed["ErrorCode"] == "SourceServer.Offline"
        assert json.loads(failed["StatusInfo"])["error_code"] == "SourceServer.Offline"

        agent.start()  # same state dir: the same source comes back Available
        wait_for(
            lambda: (
                server.call_json("DescribeSourceServers")["SourceServers"]["SourceServer"][0]["State"]  # type: ignore[index]
                == "Available"
            ),
            timeout=30,
            what="source Available again",
        )
        server.call_json("StartReplicationJob", "--JobId", job_id)
        done = wait_status(server, job_id, "Finished", timeout=120)
        assert describe(server, job_id)["ErrorCode"] == ""
        out = export(server, str(done["ImageId"]), 0, tmp_path / "out.img")
        assert sha256_file(out) == disk.sha256()
    finally:
        if agent:
            agent.stop()
        stop(server.proc)
