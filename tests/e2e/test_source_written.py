"""A source disk written during the sync: detected, synced again, or reported (agent/writewatch.py).

Real server and agent processes; the source is an image file given with
``--disk``, sent at 24 Mbit/s (about ten seconds for its 32 MiB) so that a
test can write to it mid-pass:

* written during the first pass only: the agent reads the disk again and
  sends what changed; the job finishes with a StatusInfo saying so, and the
  image is the disk as it is at the end;
* written all the time: after the extra passes the run finishes with a
  warning the user sees (DescribeReplicationJobs, ``opensmc watch``); once
  the writes stop, the next run gives the final disk byte for byte.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from opensmc.service.accounts import CREDENTIALS_FILE
from tests.e2e.conftest import OPENSMC, ServerProcess, clean_env
from tests.e2e.disks import MiB, sha256_file
from tests.e2e.flows import (
    create_job,
    describe,
    export,
    make_due,
    register,
    runs,
    start_migration_server,
    stop,
    wait_for,
    wait_status,
)

pytestmark = pytest.mark.e2e

SIZE = 32 * MiB
LIMIT = json.dumps({"bandwidth_limit": 24})


def write_at(disk: Path, offset: int, data: bytes) -> None:
    with disk.open("r+b") as f:
        f.seek(offset)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def watch(server: ServerProcess, job_id: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*OPENSMC, "watch", job_id, "--interval", "0.3", "--credentials", str(server.data_dir / CREDENTIALS_FILE)],
        capture_output=True,
        text=True,
        timeout=180,
        env=clean_env(COLUMNS="300"),
    )


def info(job: dict[str, Any]) -> dict[str, str]:
    return dict(json.loads(job["StatusInfo"] or "{}"))


def held(server: ServerProcess, job: dict[str, Any]) -> float:
    done = job.get("ReplicationJobRuns", {}).get("ReplicationJobRun") or [{}]
    return float(done[-1].get("BytesDone") or 0)


def test_written_during_the_first_pass_is_synced_again(tmp_path: Path) -> None:
    disk = tmp_path / "sys.img"
    disk.write_bytes(os.urandom(SIZE))
    server = start_migration_server(tmp_path)
    agent = None
    try:
        agent, source_id = register(server, [disk], tmp_path / "agent")
        job_id = create_job(server, source_id, "written", "--ReplicationParameters", LIMIT)
        server.call_json("StartReplicationJob", "--JobId", job_id)
        wait_status(server, job_id, "Running", "Syncing", timeout=30)
        wait_for(lambda: held(server, describe(server, job_id)) > 4 * MiB, 60, "a part of the disk sent")
        rng = random.Random(3)
        for offset in (0, 1 * MiB, 17 * MiB + 4096, SIZE - 65536):  # behind the reader and ahead of it
            write_at(disk, offset, rng.randbytes(65536))
        job = wait_status(server, job_id, "Finished", timeout=120)
        assert info(job)["warning_code"] == "Source.WrittenDuringSync.Resynced", job["StatusInfo"]
        assert sha256_file(export(server, str(job["ImageId"]), 0, tmp_path / "out.img")) == sha256_file(disk)
        [run] = runs(server, job_id)
        seen = json.loads(run["detail"])["agent"]["source_writes"]
        assert seen["disks_written"] == [str(disk)] and seen["still_changing"] == [], seen
        assert "Source.WrittenDuringSync.Resynced" in watch(server, job_id).stdout
    finally:
        if agent:
            agent.stop()
        stop(server.proc)


def test_written_all_the_time_warns_and_the_next_run_is_consistent(tmp_path: Path) -> None:
    disk = tmp_path / "sys.img"
    disk.write_bytes(os.urandom(SIZE))
    server = start_migration_server(tmp_path)
    agent = None
    done = threading.Event()

    def writer() -> None:
        rng = random.Random(5)
        while not done.wait(0.1):
            write_at(disk, rng.randrange(0, SIZE // 65536) * 65536, rng.randbytes(65536))

    thread = threading.Thread(target=writer, daemon=True)
    try:
        agent, source_id = register(server, [disk], tmp_path / "agent")
        job_id = create_job(
            server, source_id, "busy", "--ReplicationParameters", LIMIT, "--RunOnce", "false", "--Frequency", "1",
            "--MaxNumberOfImageToKeep", "2",
        )  # fmt: skip
        thread.start()
        server.call_json("StartReplicationJob", "--JobId", job_id)
        watched = watch(server, job_id)
        job = wait_status(server, job_id, "Waiting", timeout=120)
        assert info(job)["warning_code"] == "Source.WrittenDuringSync", job["StatusInfo"]
        assert "may be inconsistent" in info(job)["warning_msg"]
        assert "warning Source.WrittenDuringSync:" in watched.stdout, watched.stdout

        done.set()
        thread.join()
        make_due(server, job_id)
        wait_for(lambda: len(runs(server, job_id)) == 2 and runs(server, job_id)[1]["end_time"], 120, "run 2")
        job = wait_status(server, job_id, "Waiting", timeout=60)
        assert job["StatusInfo"] == "", job["StatusInfo"]  # nothing written during this run
        assert sha256_file(export(server, str(job["ImageId"]), 0, tmp_path / "out.img")) == sha256_file(disk)
    finally:
        done.set()
        if agent:
            agent.stop()
        stop(server.proc)
