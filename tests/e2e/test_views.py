"""`opensmc sources`, `opensmc jobs` and `opensmc watch` against a real server and agent."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import OPENSMC, ServerProcess, clean_env, stop
from tests.e2e.flows import create_job, register, start_migration_server

pytestmark = pytest.mark.e2e


def cli(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*OPENSMC, *args, "--credentials", str(server.data_dir / "admin-credentials.json")],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(COLUMNS="200"),
    )


def test_views_and_watch(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    with disk.open("wb") as f:
        f.truncate(32 << 20)
        f.seek(5 << 20)
        f.write(os.urandom(3 << 20))
    server = start_migration_server(tmp_path)
    agent = None
    try:
        agent, source_id = register(server, [disk], tmp_path / "agent")
        listed = cli(server, "sources")
        assert listed.returncode == 0, listed.stderr
        assert source_id in listed.stdout and "Available" in listed.stdout
        job_id = create_job(server, source_id, "watched")
        server.call_json("StartReplicationJob", "--JobId", job_id)
        watched = cli(server, "watch", job_id, "--interval", "0.3")
        assert watched.returncode == 0, watched.stdout + watched.stderr
        assert f"{job_id}: Finished" in watched.stdout
        # The final line has the run's bytes (all of the disk, once synced) and its average rate.
        assert "32.0 MiB of 32.0 MiB, " in watched.stdout and "/s)" in watched.stdout, watched.stdout
        jobs = cli(server, "jobs")
        assert job_id in jobs.stdout and "Finished" in jobs.stdout
        missing = cli(server, "watch", "j-doesnotexist")
        assert missing.returncode == 1 and "no replication job" in missing.stderr
    finally:
        if agent:
            agent.stop()
        stop(server.proc)
