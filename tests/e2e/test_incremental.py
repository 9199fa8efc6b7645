"""Incremental jobs (RunOnce=false): only changed chunks move, images rotate, cut-over ends them.

The next run is made due by setting ``jobs.next_run_at`` in the past in the
server's SQLite database (the test-time hook) instead of waiting Frequency hours.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from opensmc.chunkstore.staging import StagingIndex
from tests.e2e.conftest import ServerProcess
from tests.e2e.disks import CHUNK, Disk, MiB, build_disk, change_fraction, require_tools, sha256_file
from tests.e2e.flows import (
    agent_stats,
    create_job,
    db,
    describe,
    disk_shas,
    export,
    images_of,
    make_due,
    register,
    runs,
    staging_dirs,
    start_migration_server,
    stop,
    store,
    wait_for,
    wait_status,
)

pytestmark = pytest.mark.e2e

INCREMENTAL = ("--RunOnce", "false", "--Frequency", "1", "--MaxNumberOfImageToKeep", "2")


def next_run(server: ServerProcess, job_id: str, runs_before: int) -> dict[str, Any]:
    """Make the next run due now and wait until it is done (Waiting again, one more run)."""
    make_due(server, job_id)
    wait_for(lambda: len(runs(server, job_id)) > runs_before, 30, "the next run to start")
    job = wait_status(server, job_id, "Waiting", timeout=60)
    assert len(job["ReplicationJobRuns"]["ReplicationJobRun"]) == runs_before + 1
    return job


def check_image(server: ServerProcess, image_id: str, disk: Disk, tmp: Path) -> None:
    out = export(server, image_id, 0, tmp / f"{image_id}.img")
    assert sha256_file(out) == disk.sha256()
    out.unlink()


def test_incremental_runs_rotation_and_cut_over(tmp_path: Path) -> None:
    require_tools()
    disk = build_disk(tmp_path / "sys.img", 128 * MiB, parts=2, seed=11, random_mib=8)
    server = start_migration_server(tmp_path)
    agent = None
    try:
        agent, source_id = register(server, [disk.path], tmp_path / "agent")
        job_id = create_job(server, source_id, "incremental", *INCREMENTAL)
        server.call_json("StartReplicationJob", "--JobId", job_id)
        job = wait_status(server, job_id, "Waiting", timeout=60)
        first_image = job["ImageId"]
        ti = job["TransitionInstanceId"]
        check_image(server, first_image, disk, tmp_path)
        assert staging_dirs(server, ti), "an incremental job keeps its staging between runs"
        space_one = store(server).space_used()

        # Run 2: 1% of the disk changed; only those chunks move.
        changed = change_fraction(disk, 0.01, seed=1)
        job = next_run(server, job_id, 1)
        second_image = job["ImageId"]
        assert second_image != first_image
        check_image(server, second_image, disk, tmp_path)
        sha_two = disk.sha256()
        second_run = runs(server, job_id)[1]
        stats = agent_stats(second_run)
        assert stats["bytes_plain"] <= changed + 2 * CHUNK, (stats, changed)
        assert stats["bytes_plain"] >= changed // 2, stats
        assert stats["bytes_total"] == disk.size
        space_two = store(server).space_used()
        # Two images of the disk cost about one plus the changed chunks, far from twice.
        assert space_two - space_one <= changed + 4 * CHUNK, (space_one, space_two, changed)
        assert space_two < 1.2 * space_one
        assert [r["Type"] for r in job["ReplicationJobRuns"]["ReplicationJobRun"]][1]

        # Run 3: the first image rotates away (MaxNumberOfImageToKeep=2).
        change_fraction(disk, 0.01, seed=2)
        job = next_run(server, job_id, 2)
        third_image = job["ImageId"]
        kept = [row["id"] for row in images_of(server, job_id)]
        assert sorted(kept) == sorted([second_image, third_image]), kept
        assert sorted(store(server).list_images()) == sorted(kept)
        check_image(server, third_image, disk, tmp_path)
        # The kept older image still reads back whole: the rotation freed only its own chunks.
        assert disk_shas(server, second_image) == [sha_two]

        # CutOver with SyncData=true: a last run, then Finished and the staging released.
        change_fraction(disk, 0.005, seed=3)
        server.call_json("CutOverReplicationJob", "--JobId", job_id, "--SyncData", "true")
        job = wait_status(server, job_id, "Finished", timeout=60)
        assert len(job["ReplicationJobRuns"]["ReplicationJobRun"]) == 4
        check_image(server, job["ImageId"], disk, tmp_path)
        assert staging_dirs(server, ti) == []
        assert len(images_of(server, job_id)) == 2

        # CutOver with SyncData=false from Waiting: Finished at once, no run, staging released.
        other = create_job(server, source_id, "incremental-2", *INCREMENTAL)
        server.call_json("StartReplicationJob", "--JobId", other)
        job2 = wait_status(server, other, "Waiting", timeout=60)
        server.call_json("CutOverReplicationJob", "--JobId", other, "--SyncData", "false")
        job2 = describe(server, other)
        assert job2["Status"] == "Finished", job2
        assert len(job2["ReplicationJobRuns"]["ReplicationJobRun"]) == 1
        wait_for(lambda: staging_dirs(server, job2["TransitionInstanceId"]) == [], 10, "staging released")
    finally:
        if agent:
            agent.stop()
        stop(server.proc)


def test_corrupted_staging_chunk_is_caught(tmp_path: Path) -> None:
    require_tools()
    disk = build_disk(tmp_path / "sys.img", 64 * MiB, parts=1, seed=12)
    server = start_migration_server(tmp_path)
    agent = None
    try:
        agent, source_id = register(server, [disk.path], tmp_path / "agent")
        job_id = create_job(
            server, source_id, "checksum", *INCREMENTAL, "--ReplicationParameters", '{"checksum": true}'
        )
        server.call_json("StartReplicationJob", "--JobId", job_id)
        job = wait_status(server, job_id, "Waiting", timeout=60)
        [first] = runs(server, job_id)
        assert first["checksum_verified"] == 1

        # Flip one byte of a blob the store holds, behind its back (bit rot on the server's disk).
        [index] = staging_dirs(server, job["TransitionInstanceId"])
        offset = disk.random_region[0] + 12345
        blob = bytes(StagingIndex.read_disk(index).digests[offset // CHUNK])
        where = store(server).repo.locate(blob)
        pack = server.data_dir / "store" / "data" / where.pack[:2] / where.pack
        with pack.open("r+b") as f:
            f.seek(where.entry.offset + where.entry.stored_length // 2)
            byte = f.read(1)
            f.seek(where.entry.offset + where.entry.stored_length // 2)
            f.write(bytes([byte[0] ^ 0xFF]))

        make_due(server, job_id)
        job = wait_status(server, job_id, "InError", timeout=60)
        assert job["ErrorCode"] == "Image.ChecksumFailed", job
        assert f"chunk {offset // CHUNK}" in job["StatusInfo"], job["StatusInfo"]
        second = runs(server, job_id)[1]
        assert second["checksum_verified"] is None and second["image_id"] == ""
        assert len(images_of(server, job_id)) == 1  # no image of the corrupt data
        # The damaged chunk was dropped from the staging map: starting again re-sends it.
        assert "sent again" in job["StatusInfo"], job["StatusInfo"]
        server.call_json("StartReplicationJob", "--JobId", job_id)
        wait_status(server, job_id, "Waiting", timeout=60)
        assert runs(server, job_id)[-1]["checksum_verified"] == 1
        assert len(images_of(server, job_id)) == 2
    finally:
        if agent:
            agent.stop()
        stop(server.proc)


def test_disk_grown_between_runs(tmp_path: Path) -> None:
    require_tools()
    disk = build_disk(tmp_path / "sys.img", 64 * MiB, parts=1, seed=13)
    server = start_migration_server(tmp_path)
    agent = None
    try:
        agent, source_id = register(server, [disk.path], tmp_path / "agent")
        job_id = create_job(server, source_id, "grows", *INCREMENTAL)
        server.call_json("StartReplicationJob", "--JobId", job_id)
        wait_status(server, job_id, "Waiting", timeout=60)
        with disk.path.open("r+b") as f:
            f.truncate(80 * MiB)  # the disk grew; its old bytes are unchanged
        wait_for(
            lambda: describe(server, job_id) and _system_size(server, source_id) == 80 * MiB,
            10,
            "the new size reported",
        )
        job = next_run(server, job_id, 1)
        manifest = store(server).get(job["ImageId"])
        assert manifest.disks[0].size == 80 * MiB
        assert disk_shas(server, job["ImageId"]) == [disk.sha256()]
    finally:
        if agent:
            agent.stop()
        stop(server.proc)


def _system_size(server: ServerProcess, source_id: str) -> int:
    with db(server) as conn:
        row = conn.execute("SELECT disks FROM sources WHERE id=?", (source_id,)).fetchone()
    disks = json.loads(row["disks"])
    return int(next(d["size_bytes"] for d in disks if d["index"] == 0))
