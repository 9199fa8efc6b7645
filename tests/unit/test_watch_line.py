"""`opensmc watch`'s run line: bytes done of total, rate, files and ETA, from a DescribeReplicationJobs job."""

from __future__ import annotations

from typing import Any

from opensmc.cli.views import run_line

MiB = 1 << 20


def job(business: str, **run: Any) -> dict[str, Any]:
    base = {"EndTime": "", "BytesDone": 0, "BytesTotal": 0, "BytesPerSecond": 0.0, "EtaSeconds": -1}
    return {"BusinessStatus": business, "ReplicationJobRuns": {"ReplicationJobRun": [{**base, **run}]}}


def test_nothing_before_the_run_has_bytes() -> None:
    assert run_line({"BusinessStatus": "", "ReplicationJobRuns": {"ReplicationJobRun": []}}) == ""
    assert run_line(job("Preparing")) == ""


def test_syncing_shows_bytes_rate_and_eta() -> None:
    line = run_line(job("Syncing", BytesDone=512 * MiB, BytesTotal=2048 * MiB, BytesPerSecond=4 * MiB, EtaSeconds=384))
    assert line == "512.0 MiB of 2.0 GiB, 4.0 MiB/s, ETA 6:24"
    assert run_line(job("Syncing", BytesDone=MiB, BytesTotal=4 * MiB)) == "1.0 MiB of 4.0 MiB"  # no rate yet
    assert run_line(job("Syncing", BytesDone=1, BytesTotal=4 * MiB, BytesPerSecond=1, EtaSeconds=4000)).endswith(
        "ETA 1:06:40"
    )


def test_an_ended_run_has_no_eta() -> None:
    done = job(
        "", EndTime="2030-01-01T00:00:00Z", BytesDone=8 * MiB, BytesTotal=8 * MiB, BytesPerSecond=MiB, EtaSeconds=0
    )
    assert run_line(done) == "8.0 MiB of 8.0 MiB, 1.0 MiB/s"


def test_a_file_level_run_shows_its_files() -> None:
    line = run_line(job("Syncing", BytesDone=MiB, BytesTotal=4 * MiB, FilesDone=1200, FilesTotal=24001))
    assert line == "1.0 MiB of 4.0 MiB, 1,200 of 24,001 files"
