"""Whole migrations through the real server and agent: the exported disks equal the sources."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import ServerProcess
from tests.e2e.disks import Disk, MiB, build_disk, fsck_partitions, partition_table, require_tools, sha256_file
from tests.e2e.flows import (
    Agent,
    agent_stats,
    create_job,
    describe,
    disk_shas,
    export,
    images_of,
    register,
    runs,
    staging_dirs,
    start_migration_server,
    stop,
    store,
    wait_status,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(autouse=True)
def _tools() -> None:
    require_tools()


def test_full_migration_system_disk(tmp_path: Path) -> None:
    disk = build_disk(tmp_path / "sys.img", 128 * MiB, label="gpt", parts=2, seed=1)
    source_sha = disk.sha256()
    server = start_migration_server(tmp_path)
    agent = None
    try:
        agent, source_id = register(server, [disk.path], tmp_path / "agent")
        job_id = create_job(server, source_id, "full-sys")
        server.call_json("StartReplicationJob", "--JobId", job_id)
        # A 128 MiB disk may be migrated before this describe even runs (the CLI takes a second).
        assert describe(server, job_id)["Status"] in ("Running", "Finished")
        job = wait_status(server, job_id, "Finished", timeout=60)

        assert job["Progress"] == 100
        assert job["ImageId"].startswith("m-")
        assert job["TransitionInstanceId"]
        assert job["ErrorCode"] == ""
        [run] = job["ReplicationJobRuns"]["ReplicationJobRun"]
        assert run["StartTime"] and run["EndTime"] and run["StartTime"] <= run["EndTime"]
        assert run["ImageId"] == job["ImageId"]
        assert run["Type"]

        out = export(server, job["ImageId"], 0, tmp_path / "exported.img")
        assert sha256_file(out) == source_sha
        assert partition_table(out) == partition_table(disk.path)
        assert fsck_partitions(out, disk) == []
        manifest = store(server).get(job["ImageId"])
        assert disk_shas(server, job["ImageId"]) == [source_sha]
        assert [d.size for d in manifest.disks] == [disk.size]
        # A RunOnce job releases its staging when it finishes.
        assert staging_dirs(server, job["TransitionInstanceId"]) == []
        [row] = runs(server, job_id)
        assert row["checksum_verified"] is None  # checksum was not asked for
    finally:
        if agent:
            agent.stop()
        stop(server.proc)


def test_system_and_two_data_disks_with_checksum(tmp_path: Path) -> None:
    a = build_disk(tmp_path / "a.img", 96 * MiB, label="gpt", parts=2, seed=2)
    b = build_disk(tmp_path / "b.img", 64 * MiB, label="dos", parts=1, seed=3)
    c = build_disk(tmp_path / "c.img", 80 * MiB, label="gpt", parts=1, seed=4)
    disks = [a, b, c]
    shas = [d.sha256() for d in disks]
    server = start_migration_server(tmp_path)
    agent = None
    try:
        agent, source_id = register(server, [d.path for d in disks], tmp_path / "agent")
        job_id = create_job(
            server,
            source_id,
            "three-disks",
            "--DataDisk.1.Index",
            "1",
            "--DataDisk.2.Index",
            "2",
            "--ReplicationParameters",
            json.dumps({"checksum": True, "compress_level": 3}),
        )
        server.call_json("StartReplicationJob", "--JobId", job_id)
        job = wait_status(server, job_id, "Finished", timeout=60)

        manifest = store(server).get(job["ImageId"])
        assert [d.sha256 for d in manifest.disks] == shas  # checksum=true put them in the image
        for i, disk in enumerate(disks):
            out = export(server, job["ImageId"], i, tmp_path / f"exported{i}.img")
            assert sha256_file(out) == shas[i], f"disk {i} differs"
            assert fsck_partitions(out, disk) == []
            out.unlink()
        [row] = runs(server, job_id)
        assert row["checksum_verified"] == 1
        [image] = images_of(server, job_id)
        assert json.loads(image["manifest"])["checksum_verified"] is True
    finally:
        if agent:
            agent.stop()
        stop(server.proc)


def _disk_error_job(tmp_path: Path) -> tuple[Disk, Disk, ServerProcess, Agent, str]:
    """A system disk that takes ~5 s to send (40 Mbit/s) and a data disk, job in Syncing."""
    system = build_disk(tmp_path / "sys.img", 64 * MiB, parts=1, seed=5, random_mib=24)
    data = build_disk(tmp_path / "data.img", 64 * MiB, label="dos", parts=1, seed=6)
    server = start_migration_server(tmp_path)
    agent, source_id = register(server, [system.path, data.path], tmp_path / "agent")
    job_id = create_job(
        server,
        source_id,
        "disk-error",
        "--DataDisk.1.Index",
        "1",
        "--ReplicationParameters",
        json.dumps({"bandwidth_limit": 40}),
    )
    server.call_json("StartReplicationJob", "--JobId", job_id)
    wait_status(server, job_id, "Running", "Syncing", timeout=30)
    return system, data, server, agent, job_id


def _restart_and_finish(server: ServerProcess, job_id: str, system: Disk, shas: list[str]) -> None:
    server.call_json("StartReplicationJob", "--JobId", job_id)
    job = wait_status(server, job_id, "Finished", timeout=60)
    assert disk_shas(server, job["ImageId"]) == shas
    first, second = runs(server, job_id)
    assert first["end_time"] is not None
    # The system disk was on the receiver already: the second run sent (about) the data disk only.
    assert agent_stats(second)["bytes_plain"] < 0.5 * system.size


def test_disk_disappearing_mid_job_fails_then_resumes(tmp_path: Path) -> None:
    system, data, server, agent, job_id = _disk_error_job(tmp_path)
    shas = [system.sha256(), data.sha256()]
    try:
        hidden = data.path.with_name("data.img.away")
        data.path.rename(hidden)  # gone before the agent gets to it
        time.sleep(3)  # a few heartbeats
        assert agent.proc is not None and agent.proc.poll() is None, "the agent died:\n" + agent.log_text()
        job = wait_status(server, job_id, "InError", timeout=30)
        assert job["ErrorCode"] == "Agent.DiskNotFound", job
        info = json.loads(job["StatusInfo"])
        assert info["error_code"] == "Agent.DiskNotFound"
        assert str(data.path) in info["error_msg"], info
        hidden.rename(data.path)
        _restart_and_finish(server, job_id, system, shas)
    finally:
        agent.stop()
        stop(server.proc)


def test_disk_replaced_mid_job_fails_then_resumes(tmp_path: Path) -> None:
    system, data, server, agent, job_id = _disk_error_job(tmp_path)
    shas = [system.sha256(), data.sha256()]
    try:
        hidden = data.path.with_name("data.img.away")
        data.path.rename(hidden)
        with data.path.open("wb") as f:  # a smaller disk where the data disk was
            f.truncate(8 * MiB)
        job = wait_status(server, job_id, "InError", timeout=30)
        assert job["ErrorCode"].startswith("Agent."), job
        info = json.loads(job["StatusInfo"])
        assert info["error_code"] == job["ErrorCode"]
        assert str(data.path) in info["error_msg"], info  # it says which disk
        assert agent.proc is not None and agent.proc.poll() is None

        hidden.replace(data.path)
        time.sleep(1.5)  # a heartbeat reports the disk's real size again
        _restart_and_finish(server, job_id, system, shas)
    finally:
        agent.stop()
        stop(server.proc)
