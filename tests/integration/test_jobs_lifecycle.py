"""Start, Stop, CutOver, Delete, the data-plane seam and the orchestrator, on both databases."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest

from opensmc.domain.errors import SmcError
from opensmc.service import jobs as J
from opensmc.service.context import Caller, Services
from opensmc.service.orchestration import run_due
from opensmc.store.tables import job_runs
from tests.conftest import ActionCaller
from tests.integration.jobs_support import (
    T0,
    Clock,
    add_source,
    events_of,
    job_row,
    one_job,
    raises,
    set_source_state,
    source_row,
)

Call = ActionCaller


@pytest.fixture
def clock(services: Services) -> Clock:
    c = Clock(T0)
    services.clock = c
    return c


@pytest.fixture
def src(services: Services, caller: Caller, clock: Clock) -> str:
    return add_source(services, caller)


def create(call: Call, src: str, **kw: Any) -> str:
    job_id: str = call("CreateReplicationJob", RegionId="local", SourceId=src, **kw)["JobId"]
    return job_id


def incremental(call: Call, src: str, **kw: Any) -> str:
    return create(call, src, RunOnce=False, Frequency=6, MaxNumberOfImageToKeep=2, **kw)


def current_run(services: Services, job_id: str) -> int:
    with services.db.connect() as conn:
        rid = conn.execute(
            job_runs.select().where(job_runs.c.job_id == job_id).order_by(job_runs.c.id.desc())
        ).first()
    assert rid is not None
    return int(rid.id)


def drive_run(services: Services, job_id: str, image: str) -> None:
    """What the data plane will do: prepare, sync with progress, process, clean."""
    J.mark_prepared(services, job_id, "ti-1")
    assert J.report_progress(services, job_id, current_run(services, job_id), 25, 100) == 25.0
    J.mark_synced(services, job_id)
    J.mark_processed(services, job_id, image)
    J.mark_cleaned(services, job_id)


def test_run_once_to_finished(call: Call, services: Services, src: str, clock: Clock) -> None:
    job_id = create(call, src)
    call("StartReplicationJob", JobId=job_id)
    j = one_job(call, job_id)
    assert (j["Status"], j["BusinessStatus"]) == ("Running", "Preparing")
    assert j["StartTime"] == "2030-01-01T12:00:00Z"
    assert j["ReplicationJobRuns"]["ReplicationJobRun"] == [
        {
            "StartTime": "2030-01-01T12:00:00Z",
            "EndTime": "",
            "ImageId": "",
            "Type": "Manual",
            "BytesDone": 0,
            "BytesTotal": 0,
            "BytesPerSecond": 0.0,
            "EtaSeconds": -1,
        }
    ]
    s = source_row(services, src)
    assert s.state == "InUse" and s.job_id == job_id
    assert job_row(services, job_id).has_run

    # Nothing moves by itself: the orchestrator leaves a Preparing job alone.
    clock.advance(hours=5)
    assert run_due(services, clock.now) == 0
    assert one_job(call, job_id)["BusinessStatus"] == "Preparing"

    J.mark_prepared(services, job_id, "ti-abc")
    j = one_job(call, job_id)
    assert j["BusinessStatus"] == "Syncing" and j["TransitionInstanceId"] == "ti-abc"
    assert J.report_progress(services, job_id, current_run(services, job_id), 3, 4) == 75.0
    assert one_job(call, job_id)["Progress"] == 75.0
    raises("ReplicationJob.InvalidStatus", J.report_progress, services, job_id, 999, 1, 2)
    J.mark_synced(services, job_id)
    raises(
        "ReplicationJob.InvalidStatus",
        J.report_progress,
        services,
        job_id,
        current_run(services, job_id),
        1,
        2,
    )
    J.mark_processed(services, job_id, "m-image1")
    assert one_job(call, job_id)["BusinessStatus"] == "Cleaning"
    clock.advance(minutes=1)
    J.mark_cleaned(services, job_id)
    j = one_job(call, job_id)
    assert (j["Status"], j["BusinessStatus"], j["Progress"]) == ("Finished", "", 100.0)
    assert j["ImageId"] == "m-image1" and j["EndTime"] == "2030-01-01T17:01:00Z"
    assert j["ReplicationJobRuns"]["ReplicationJobRun"][0]["ImageId"] == "m-image1"
    assert j["ReplicationJobRuns"]["ReplicationJobRun"][0]["EndTime"] == "2030-01-01T17:01:00Z"
    assert source_row(services, src).state == "Available"
    assert [e[0] for e in events_of(services, job_id)] == [
        "create",
        "start",
        "prepared",
        "synced",
        "processed",
        "finish",
    ]
    # finished: the source may take a new job
    create(call, src, Name="second")


def test_a_file_level_run_shows_files_checked_of_files_known(call: Call, services: Services, src: str) -> None:
    job_id = create(call, src)
    call("StartReplicationJob", JobId=job_id)
    J.mark_prepared(services, job_id, "ti-files")
    run = current_run(services, job_id)
    J.report_progress(services, job_id, run, 10, 100, (40, 1000))
    (shown,) = one_job(call, job_id)["ReplicationJobRuns"]["ReplicationJobRun"]
    assert (shown["FilesDone"], shown["FilesTotal"]) == (40, 1000)
    J.report_progress(services, job_id, run, 20, 100)  # the disk's block ranges: the counts stay
    (shown,) = one_job(call, job_id)["ReplicationJobRuns"]["ReplicationJobRun"]
    assert (shown["BytesDone"], shown["FilesDone"], shown["FilesTotal"]) == (20, 40, 1000)
    J.report_progress(services, job_id, run, 30, 100, (1200, 1500))  # rsync found more files as it listed
    (shown,) = one_job(call, job_id)["ReplicationJobRuns"]["ReplicationJobRun"]
    assert (shown["FilesDone"], shown["FilesTotal"]) == (1200, 1500)


def test_incremental_waits_then_runs_on_schedule(
    call: Call, services: Services, src: str, clock: Clock
) -> None:
    job_id = incremental(call, src)
    call("StartReplicationJob", JobId=job_id)
    drive_run(services, job_id, "m-1")
    j = one_job(call, job_id)
    assert j["Status"] == "Waiting"
    assert source_row(services, src).state == "Available"
    assert job_row(services, job_id).next_run_at is not None
    # Waiting jobs may change their frequency
    call("ModifyReplicationJobAttribute", JobId=job_id, Frequency=6, MaxNumberOfImageToKeep=3)

    clock.advance(hours=5, minutes=59)
    assert run_due(services, clock.now) == 0
    clock.advance(minutes=1)
    assert run_due(services, clock.now) == 1
    j = one_job(call, job_id)
    assert (j["Status"], j["BusinessStatus"], j["Progress"]) == ("Running", "Preparing", 0.0)
    runs = j["ReplicationJobRuns"]["ReplicationJobRun"]
    assert [r["Type"] for r in runs] == ["Manual", "Schedule"]
    assert source_row(services, src).state == "InUse"
    drive_run(services, job_id, "m-2")
    assert one_job(call, job_id)["Status"] == "Waiting"

    # cut over with a final sync: one more run, then Finished instead of Waiting
    call("CutOverReplicationJob", JobId=job_id, SyncData=True)
    j = one_job(call, job_id)
    assert (j["Status"], j["BusinessStatus"]) == ("Running", "Preparing")
    assert job_row(services, job_id).final_run
    drive_run(services, job_id, "m-3")
    j = one_job(call, job_id)
    assert j["Status"] == "Finished" and len(j["ReplicationJobRuns"]["ReplicationJobRun"]) == 3


def test_cut_over_without_sync(call: Call, services: Services, src: str) -> None:
    job_id = incremental(call, src)
    raises("ReplicationJob.InvalidStatus", call, "CutOverReplicationJob", JobId=job_id)
    call("StartReplicationJob", JobId=job_id)
    raises("ReplicationJob.InvalidStatus", call, "CutOverReplicationJob", JobId=job_id)
    drive_run(services, job_id, "m-1")
    call("CutOverReplicationJob", JobId=job_id, SyncData=False)
    assert one_job(call, job_id)["Status"] == "Finished"
    raises("MissingParameter", call, "CutOverReplicationJob")
    raises("InvalidJobId.NotFound", call, "CutOverReplicationJob", JobId="j-nope")


def test_cut_over_sync_needs_available_source(call: Call, services: Services, src: str) -> None:
    job_id = incremental(call, src)
    call("StartReplicationJob", JobId=job_id)
    drive_run(services, job_id, "m-1")
    set_source_state(services, src, "Unavailable")
    raises("SourceServerState.Invalid", call, "CutOverReplicationJob", JobId=job_id, SyncData=True)
    assert one_job(call, job_id)["Status"] == "Waiting"


def test_cut_over_refuses_run_once(call: Call, src: str) -> None:
    job_id = create(call, src, ScheduledStartTime="2030-01-02T00:00:00Z")
    err = raises("ReplicationJob.InvalidStatus", call, "CutOverReplicationJob", JobId=job_id)
    assert "RunOnce" in err.message


def test_start_errors(call: Call, services: Services, src: str) -> None:
    raises("MissingParameter", call, "StartReplicationJob")
    raises("InvalidJobId.NotFound", call, "StartReplicationJob", JobId="j-nope")
    job_id = create(call, src)
    set_source_state(services, src, "Unavailable")
    err = raises("SourceServerState.Invalid", call, "StartReplicationJob", JobId=job_id)
    assert "Unavailable" in err.message and "Available" in err.message
    assert one_job(call, job_id)["Status"] == "Ready"
    set_source_state(services, src, "Available")
    call("StartReplicationJob", JobId=job_id)
    err = raises("ReplicationJob.InvalidStatus", call, "StartReplicationJob", JobId=job_id)
    assert "Running(Preparing)" in err.message
    assert "Ready,Stopped,InError" in err.message


def test_stop_and_restart(call: Call, services: Services, src: str) -> None:
    job_id = create(call, src)
    err = raises("ReplicationJob.InvalidStatus", call, "StopReplicationJob", JobId=job_id)
    assert "Ready" in err.message and "Running" in err.message
    call("StartReplicationJob", JobId=job_id)
    raises("ReplicationJob.InvalidStatus", call, "StopReplicationJob", JobId=job_id)  # Preparing
    J.mark_prepared(services, job_id, "ti")
    call("StopReplicationJob", JobId=job_id)
    j = one_job(call, job_id)
    assert j["Status"] == "Stopped" and j["ReplicationJobRuns"]["ReplicationJobRun"][0]["EndTime"] != ""
    assert source_row(services, src).state == "Available"
    call("StartReplicationJob", JobId=job_id)
    assert one_job(call, job_id)["Status"] == "Running"
    assert len(one_job(call, job_id)["ReplicationJobRuns"]["ReplicationJobRun"]) == 2


def test_stop_waiting(call: Call, services: Services, src: str) -> None:
    job_id = create(call, src, ScheduledStartTime="2030-01-03T00:00:00Z")
    call("StopReplicationJob", JobId=job_id)
    assert one_job(call, job_id)["Status"] == "Stopped"


def test_failure_and_retry(call: Call, services: Services, src: str) -> None:
    job_id = create(call, src)
    call("StartReplicationJob", JobId=job_id)
    J.mark_prepared(services, job_id, "ti")
    info = J.status_info("S1", "disk read error")
    J.mark_failed(services, job_id, "S1", info)
    j = one_job(call, job_id)
    assert (j["Status"], j["ErrorCode"], j["StatusInfo"]) == ("InError", "S1", info)
    assert source_row(services, src).state == "Available"
    raises("ReplicationJob.InvalidStatus", J.mark_failed, services, job_id, "S1", info)
    call("StartReplicationJob", JobId=job_id)
    j = one_job(call, job_id)
    assert (j["Status"], j["ErrorCode"], j["StatusInfo"]) == ("Running", "", "")


def test_seam_functions_are_guarded(call: Call, services: Services, src: str) -> None:
    job_id = create(call, src)
    for fn, args in (
        (J.mark_prepared, ("ti",)),
        (J.mark_synced, ()),
        (J.mark_processed, ("m-1",)),
        (J.mark_cleaned, ()),
        (J.mark_failed, ("X", "{}")),
    ):
        raises("ReplicationJob.InvalidStatus", fn, services, job_id, *args)
    raises("InvalidJobId.NotFound", J.mark_synced, services, "j-nope")
    assert not J.finish_deletion(services, job_id)


def test_delete(call: Call, services: Services, caller: Caller, src: str, clock: Clock) -> None:
    job_id = create(call, src, Tag__1__Key="k", Tag__1__Value="v")
    call("StartReplicationJob", JobId=job_id)
    err = raises("ReplicationJob.InvalidStatus", call, "DeleteReplicationJob", JobId=job_id)
    assert "Running" in err.message
    J.mark_prepared(services, job_id, "ti")
    call("StopReplicationJob", JobId=job_id)
    call("DeleteReplicationJob", JobId=job_id)
    j = one_job(call, job_id)
    assert j["Status"] == "Deleting" and j["Tags"] == {"Tag": []}
    raises("ReplicationJob.InvalidStatus", call, "DeleteReplicationJob", JobId=job_id)
    raises("ReplicationJob.InvalidStatus", call, "StartReplicationJob", JobId=job_id)
    # a Deleting job does not block a new one on its source
    assert run_due(services, clock.now) == 1
    assert call("DescribeReplicationJobs", JobId__1=job_id)["TotalCount"] == 0
    assert source_row(services, src).job_id == ""
    raises("InvalidJobId.NotFound", call, "DeleteReplicationJob", JobId=job_id)
    create(call, src)


@pytest.mark.parametrize("status_path", ["ready", "finished", "inerror", "waiting"])
def test_delete_from_idle_statuses(call: Call, services: Services, src: str, status_path: str) -> None:
    job_id = incremental(call, src) if status_path == "waiting" else create(call, src)
    if status_path != "ready":
        call("StartReplicationJob", JobId=job_id)
        if status_path == "inerror":
            J.mark_failed(services, job_id, "E", "{}")
        else:
            drive_run(services, job_id, "m")
    call("DeleteReplicationJob", JobId=job_id)
    assert one_job(call, job_id)["Status"] == "Deleting"


def test_scheduled_start(call: Call, services: Services, src: str, clock: Clock) -> None:
    job_id = create(call, src, ScheduledStartTime="2030-01-02T00:00:00Z")
    assert run_due(services, clock.now) == 0
    clock.now = T0.replace(day=2, hour=0)
    set_source_state(services, src, "Unavailable")
    assert run_due(services, clock.now) == 0
    j = one_job(call, job_id)
    assert j["Status"] == "Waiting"
    assert "Unavailable" in json.loads(j["StatusInfo"])["error_msg"]
    set_source_state(services, src, "Available")
    assert run_due(services, clock.now) == 1
    j = one_job(call, job_id)
    assert (j["Status"], j["BusinessStatus"], j["StatusInfo"]) == ("Running", "Preparing", "")
    assert j["ReplicationJobRuns"]["ReplicationJobRun"][0]["Type"] == "Schedule"
    assert source_row(services, src).state == "InUse"
    assert run_due(services, clock.now) == 0


def test_expiry_and_cleanup(call: Call, services: Services, src: str, clock: Clock) -> None:
    job_id = create(call, src, ValidTime="2030-01-10T12:00:00Z")
    clock.now = T0.replace(day=10, hour=11, minute=59)
    assert run_due(services, clock.now) == 0
    clock.now = T0.replace(day=10, hour=12)
    assert run_due(services, clock.now) == 1
    j = one_job(call, job_id)
    assert j["Status"] == "Expired"
    # Expired still counts as unfinished: no second job on the source
    raises("SourceServer.WithReplicationJob", create, call, src)
    raises("ReplicationJob.InvalidStatus", call, "StartReplicationJob", JobId=job_id)
    clock.advance(days=6, hours=23)
    assert run_due(services, clock.now) == 0
    clock.advance(hours=1)
    assert run_due(services, clock.now) == 2  # Expired → Deleting → gone
    assert job_row(services, job_id) is None


def test_running_jobs_do_not_expire(call: Call, services: Services, src: str, clock: Clock) -> None:
    job_id = create(call, src, ValidTime="2030-01-10T12:00:00Z")
    call("StartReplicationJob", JobId=job_id)
    clock.now = T0.replace(day=20)
    run_due(services, clock.now)
    assert one_job(call, job_id)["Status"] == "Running"


def test_agent_lost_fails_running_job(call: Call, services: Services, src: str, clock: Clock) -> None:
    job_id = create(call, src)
    call("StartReplicationJob", JobId=job_id)
    J.mark_prepared(services, job_id, "ti")
    set_source_state(services, src, "Unavailable")
    assert run_due(services, clock.now) == 1
    j = one_job(call, job_id)
    assert (j["Status"], j["ErrorCode"]) == ("InError", "SourceServer.Offline")
    info = json.loads(j["StatusInfo"])
    assert info["error_code"] == "SourceServer.Offline" and "heartbeat" in info["error_msg"]
    assert source_row(services, src).state == "Unavailable"  # its owner decides when it is back


def test_agent_lost_after_syncing_does_not_fail_the_image_being_made(
    call: Call, services: Services, src: str, clock: Clock
) -> None:
    job_id = create(call, src)
    call("StartReplicationJob", JobId=job_id)
    J.mark_prepared(services, job_id, "ti")
    J.mark_synced(services, job_id)  # Processing: the data is all here (an adaptation can take minutes)
    set_source_state(services, src, "Unavailable")  # the source was shut down after its last sync
    assert run_due(services, clock.now) == 0
    assert (one_job(call, job_id)["Status"], one_job(call, job_id)["BusinessStatus"]) == ("Running", "Processing")


def _race(n: int, fn: Any) -> tuple[list[Any], list[BaseException]]:
    barrier = threading.Barrier(n)
    results: list[Any] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker() -> None:
        barrier.wait()
        try:
            out = fn()
            with lock:
                results.append(out)
        except BaseException as exc:
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results, errors


def test_concurrent_start_exactly_one_wins(call: Call, services: Services, src: str) -> None:
    job_id = create(call, src)
    results, errors = _race(8, lambda: call("StartReplicationJob", JobId=job_id))
    assert len(results) == 1, errors
    assert len(errors) == 7
    assert all(isinstance(e, SmcError) and e.code == "ReplicationJob.InvalidStatus" for e in errors), errors
    j = one_job(call, job_id)
    assert len(j["ReplicationJobRuns"]["ReplicationJobRun"]) == 1
    assert [e[0] for e in events_of(services, job_id)].count("start") == 1


def test_concurrent_orchestrators_start_once(call: Call, services: Services, src: str, clock: Clock) -> None:
    job_id = create(call, src, ScheduledStartTime="2030-01-02T00:00:00Z")
    clock.now = T0.replace(day=2, hour=1)
    results, errors = _race(4, lambda: run_due(services, clock.now))
    assert not errors, errors
    assert sum(results) == 1
    assert len(one_job(call, job_id)["ReplicationJobRuns"]["ReplicationJobRun"]) == 1


def test_replication_parameters_change_while_syncing(call: Call, services: Services, src: str) -> None:
    """Issue 3: bandwidth_limit is changeable while Syncing (the other settings are not)."""
    job_id = call("CreateReplicationJob", RegionId="local", SourceId=src)["JobId"]
    call("StartReplicationJob", JobId=job_id)
    J.mark_prepared(services, job_id, "ti-x")
    call("ModifyReplicationJobAttribute", JobId=job_id, ReplicationParameters='{"bandwidth_limit":5}')
    assert one_job(call, job_id)["ReplicationParameters"] == '{"bandwidth_limit":5}'
    raises(
        "ReplicationJob.InvalidStatus",
        lambda: call("ModifyReplicationJobAttribute", JobId=job_id, ImageName="later"),
    )
    call("StopReplicationJob", JobId=job_id)
    call("ModifyReplicationJobAttribute", JobId=job_id, ReplicationParameters='{"bandwidth_limit":0}')


def test_progress_is_monotonic_below_100_until_synced_with_rate_and_eta(
    call: Call, services: Services, src: str, clock: Clock
) -> None:
    mib = 1 << 20
    job_id = create(call, src)
    call("StartReplicationJob", JobId=job_id)
    J.mark_prepared(services, job_id, "ti-p")
    run = current_run(services, job_id)
    assert J.report_progress(services, job_id, run, 0, 100 * mib) == 0.0
    clock.advance(seconds=2)
    assert J.report_progress(services, job_id, run, 20 * mib, 100 * mib) == 20.0
    [r] = one_job(call, job_id)["ReplicationJobRuns"]["ReplicationJobRun"]
    assert (r["BytesDone"], r["BytesTotal"], r["BytesPerSecond"], r["EtaSeconds"]) == (
        20 * mib,
        100 * mib,
        10 * mib,  # 20 MiB in 2 s
        8.0,  # 80 MiB left at 10 MiB/s
    )
    # A resumed attempt counts again from 0 while it skips what the receiver holds: no step back.
    clock.advance(seconds=1)
    assert J.report_progress(services, job_id, run, 5 * mib, 100 * mib) == 20.0
    [r] = one_job(call, job_id)["ReplicationJobRuns"]["ReplicationJobRun"]
    assert r["BytesDone"] == 20 * mib and r["BytesPerSecond"] < 10 * mib  # the rate drops meanwhile
    # Every byte read is not every byte safe: 100 waits for the result (Syncing → Processing).
    clock.advance(seconds=1)
    assert J.report_progress(services, job_id, run, 100 * mib, 100 * mib) == 99.99
    assert one_job(call, job_id)["Progress"] == 99.99
    J.mark_synced(services, job_id)
    assert one_job(call, job_id)["Progress"] == 100.0
