"""CreateReplicationJob, CreateCrossZoneMigrationJob, DescribeReplicationJobs, Modify…Attribute."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from opensmc.service.context import Caller, Services
from tests.conftest import ActionCaller
from tests.integration.jobs_support import GIB, T0, Clock, add_source, job_row, one_job, raises, source_row

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
    params: dict[str, Any] = {"RegionId": "local", "SourceId": src, **kw}
    job_id: str = call("CreateReplicationJob", **params)["JobId"]
    return job_id


def test_create_full_and_describe_every_field(call: Call, services: Services, src: str) -> None:
    job_id = create(
        call,
        src,
        Name="web-1",
        Description="the web server",
        TargetType="image",
        ImageName="web-image",
        SystemDiskSize=40,
        SystemDiskPart__1__Device="0_0",
        SystemDiskPart__1__SizeBytes=1000,
        SystemDiskPart__1__Block="false",
        DataDisk__1__Index=1,
        DataDisk__1__Size=60,
        DataDisk__1__Part__1__Block=True,
        Disks__System__Size=30,
        Disks__System__LVM=True,
        Disks__System__Part__1__Path="/boot",
        Disks__System__Part__1__SizeBytes=512,
        Disks__System__Part__1__Block=True,
        Disks__Data__1__DiskId="/dev/vdb",
        Disks__Data__1__Size=50,
        Disks__Data__1__Part__1__Path="/data",
        Disks__Data__1__Part__1__SizeBytes=7,
        NetMode=2,
        VSwitchId="vsw-1",
        VpcId="vpc-1",
        RunOnce=False,
        Frequency=12,
        MaxNumberOfImageToKeep=3,
        InstanceType="ecs.c6.large",
        InstanceRamRole="role",
        LaunchTemplateId="lt-1",
        LaunchTemplateVersion="2",
        LicenseType="BYOL",
        JobType=1,
        ContainerNamespace="ns",
        ContainerRepository="repo",
        ContainerTag="v1",
        ReplicationParameters='{"bandwidth_limit":0,"compress_level":1,"checksum":true}',
        ResourceGroupId="rg-1",
        Tag__1__Key="env",
        Tag__1__Value="prod",
    )
    assert job_id.startswith("j-") and len(job_id) == 22
    j = one_job(call, job_id)
    assert j["Status"] == "Ready" and j["BusinessStatus"] == ""
    assert j["Progress"] == 0.0 and isinstance(j["Progress"], float)
    assert j["RunOnce"] is False and j["Frequency"] == 12 and j["MaxNumberOfImageToKeep"] == 3
    assert j["TargetType"] == "Image" and j["JobType"] == 1 and j["NetMode"] == 2
    assert j["SystemDiskSize"] == 40 and j["RegionId"] == "local" and j["SourceId"] == src
    assert j["ReplicationParameters"] == '{"bandwidth_limit":0,"compress_level":1,"checksum":true}'
    assert j["CreationTime"] == "2030-01-01T12:00:00Z"
    assert j["ValidTime"] == "2030-01-31T12:00:00Z"
    assert j["StartTime"] == "" and j["ScheduledStartTime"] == ""
    assert j["SystemDiskParts"] == {"SystemDiskPart": [{"Device": "0_0", "SizeBytes": 1000, "Block": False}]}
    assert j["DataDisks"] == {"DataDisk": [{"Index": 1, "Size": 60, "Parts": {"Part": [{"Block": True}]}}]}
    assert j["Disks"] == {
        "System": {
            "Size": 30,
            "LVM": True,
            "Parts": {"Part": [{"Path": "/boot", "SizeBytes": 512, "Block": True}]},
        },
        "Data": {
            "Data": [
                {
                    "DiskId": "/dev/vdb",
                    "Size": 50,
                    "LVM": False,
                    "Parts": {"Part": [{"Path": "/data", "SizeBytes": 7, "Block": True}]},
                }
            ]
        },
    }
    assert j["Tags"] == {"Tag": [{"Key": "env", "Value": "prod"}]}
    assert j["ReplicationJobRuns"] == {"ReplicationJobRun": []}
    for key in ("VpcId", "VSwitchId", "InstanceType", "InstanceRamRole", "LaunchTemplateId", "LicenseType"):
        assert j[key]
    assert j["ErrorCode"] == "" and j["StatusInfo"] == "" and j["ImageId"] == ""
    assert j["TransitionInstanceId"] == "" and j["WorkgroupId"] == ""
    assert source_row(services, src).job_id == job_id


def test_minimal_create_defaults(call: Call, src: str) -> None:
    job_id = create(call, src)
    j = one_job(call, job_id)
    assert j["Name"] == job_id and j["RunOnce"] is True and j["TargetType"] == "Image"
    assert j["SystemDiskParts"] == {"SystemDiskPart": []} and j["DataDisks"] == {"DataDisk": []}
    assert "Disks" not in j


@pytest.mark.parametrize(
    ("params", "code", "needle"),
    [
        ({"RegionId": "cn-hangzhou"}, "InvalidParameter", "local"),
        ({"RegionId": ""}, "MissingParameter", "RegionId"),
        ({"SourceId": ""}, "MissingParameter", "SourceId"),
        ({"RunOnce": False, "MaxNumberOfImageToKeep": 2}, "MissingParameter", "Frequency"),
        ({"RunOnce": False, "Frequency": 2}, "MissingParameter", "MaxNumberOfImageToKeep"),
        ({"NetMode": 2}, "MissingParameter", "VSwitchId"),
        ({"NetMode": 1}, "InvalidParameter", "NetMode"),
        ({"TargetType": "TargetInstance"}, "MissingParameter", "InstanceId"),
        ({"TargetType": "Disk"}, "InvalidParameter", "TargetType"),
        ({"Frequency": 169}, "InvalidParameter", "Frequency"),
        ({"MaxNumberOfImageToKeep": 11}, "InvalidParameter", "MaxNumberOfImageToKeep"),
        ({"SystemDiskSize": 19}, "InvalidParameter", "SystemDiskSize"),
        ({"SystemDiskSize": 2049}, "InvalidParameter", "SystemDiskSize"),
        ({"JobType": 4}, "InvalidParameter", "JobType"),
        ({"LicenseType": "PAYG"}, "InvalidParameter", "LicenseType"),
        ({"Name": "1abc"}, "InvalidParameter", "Name"),
        ({"Name": "http://x"}, "InvalidParameter", "Name"),
        ({"Description": "x"}, "InvalidParameter", "Description"),
        ({"ReplicationParameters": "not json"}, "InvalidParameter", "JSON"),
        ({"ReplicationParameters": "[1]"}, "InvalidParameter", "JSON object"),
        ({"ReplicationParameters": '{"a":"' + "x" * 2048 + '"}'}, "InvalidParameter", "2048"),
        ({"ReplicationParameters": '{"bandwidth_limit":-1}'}, "InvalidParameter", "bandwidth_limit"),
        ({"ReplicationParameters": '{"bandwidth_limit":"5"}'}, "InvalidParameter", "bandwidth_limit"),
        ({"ReplicationParameters": '{"compress_level":11}'}, "InvalidParameter", "compress_level"),
        ({"ReplicationParameters": '{"compress_level":1.5}'}, "InvalidParameter", "compress_level"),
        ({"ReplicationParameters": '{"checksum":"yes"}'}, "InvalidParameter", "checksum"),
        ({"ReplicationParameters": '{"os_adaptation":"no"}'}, "InvalidParameter", "os_adaptation must be"),
        ({"SystemDiskPart__1__Device": "0_0"}, "MissingParameter", "SystemDiskPart.1.SizeBytes"),
        ({"SystemDiskPart__1__SizeBytes": 5}, "MissingParameter", "SystemDiskPart.1.Device"),
        ({"SystemDiskPart__1__Device": "0_9", "SystemDiskPart__1__SizeBytes": 5}, "InvalidParameter", "0_9"),
        ({"DataDisk__1__Part__1__Device": "1_0"}, "MissingParameter", "DataDisk.1.Index"),
        ({"DataDisk__1__Index": 17}, "InvalidParameter", "DataDisk.1.Index"),
        ({"DataDisk__1__Index": 1, "DataDisk__1__Size": 19}, "InvalidParameter", "DataDisk.1.Size"),
        ({"DataDisk__1__Index": 1, "DataDisk__2__Index": 1}, "DataDisk.DuplicateIndex", "same index"),
        ({"DataDisk__1__Index": 2}, "ReplicationJobDataDiskIndex.Invalid", "not found"),
        ({"Disks__Data__1__DiskId": "/dev/sdz"}, "InvalidParameter", "/dev/sdz"),
        ({"ScheduledStartTime": "2029-12-31T00:00:00Z"}, "InvalidParameter", "30 days"),
        ({"ScheduledStartTime": "2030-02-01T00:00:00Z"}, "InvalidParameter", "30 days"),
        ({"ScheduledStartTime": "tomorrow"}, "InvalidParameter", "ScheduledStartTime"),
        ({"ValidTime": "2030-01-07T12:00:00Z"}, "InvalidParameter", "7 to 90 days"),
        ({"ValidTime": "2030-04-02T12:00:00Z"}, "InvalidParameter", "7 to 90 days"),
        ({"ClientToken": "x" * 65}, "InvalidParameter", "ClientToken"),
        ({"Tag__1__Key": "aliyun-x"}, "InvalidParameter.TagKey", "aliyun"),
    ],
)
def test_create_rejects(call: Call, src: str, params: dict[str, Any], code: str, needle: str) -> None:
    err = raises(code, create, call, src, **params)
    assert needle in err.message
    assert err.http_status == 400


@pytest.mark.parametrize(
    ("params", "minimum"),
    [
        ({"SystemDiskSize": 20}, None),
        ({"DataDisk__1__Index": 1, "DataDisk__1__Size": 49}, 50),
        ({"DataDisk__1__Index": 1, "DataDisk__1__Size": 50}, None),
        ({"Disks__System__Size": 20}, None),
        ({"Disks__Data__1__DiskId": "/dev/vdb", "Disks__Data__1__Size": 40}, 50),
    ],
)
def test_target_disk_at_least_source_size(
    call: Call, services: Services, caller: Caller, params: dict[str, Any], minimum: int | None
) -> None:
    src = add_source(services, caller)
    if minimum is None:
        create(call, src, **params)
        return
    err = raises("InvalidParameter", create, call, src, **params)
    assert f"at least {minimum} GiB" in err.message


def test_system_disk_minimum_rounds_up(call: Call, services: Services, caller: Caller) -> None:
    src = add_source(services, caller, disks=[{"index": 0, "size_bytes": 40 * GIB + 1, "partitions": []}])
    err = raises("InvalidParameter", create, call, src, SystemDiskSize=40)
    assert "at least 41 GiB" in err.message and "SystemDiskSize" in err.message
    create(call, src, SystemDiskSize=41)


def test_unknown_and_foreign_source(call: Call, services: Services, other_caller: Caller) -> None:
    raises("InvalidSourceId.NotFound", create, call, "s-doesnotexist")
    theirs = add_source(services, other_caller)
    err = raises("InvalidSourceId.NotFound", create, call, theirs)
    assert err.http_status == 404


@pytest.mark.parametrize("state", ["Unavailable", "InUse", "Deleting"])
def test_source_must_be_available(call: Call, services: Services, caller: Caller, state: str) -> None:
    src = add_source(services, caller, state=state)
    err = raises("SourceServerState.Invalid", create, call, src)
    assert state in err.message and "Available" in err.message


def test_one_unfinished_job_per_source(call: Call, src: str) -> None:
    first = create(call, src)
    err = raises("SourceServer.WithReplicationJob", create, call, src)
    assert first in err.message


def test_duplicate_name(call: Call, services: Services, caller: Caller, src: str) -> None:
    create(call, src, Name="dup")
    other = add_source(services, caller)
    raises("ReplicationJobName.Duplicate", create, call, other, Name="dup")


def test_quota(call: Call, services: Services, caller: Caller) -> None:
    services.settings = dataclasses.replace(services.settings, max_jobs_per_account=2)
    for _ in range(2):
        create(call, add_source(services, caller))
    err = raises("QuotaExceeded.ReplicationJob", create, call, add_source(services, caller))
    assert "2" in err.message


def test_client_token_idempotent(call: Call, src: str) -> None:
    a = create(call, src, Name="j1", ClientToken="tok-1")
    b = create(call, src, Name="j1", ClientToken="tok-1")
    assert a == b
    raises("IdempotentParameterMismatch", create, call, src, Name="j2", ClientToken="tok-1")


def test_scheduled_start_makes_waiting(call: Call, src: str) -> None:
    job_id = create(call, src, ScheduledStartTime="2030-01-02T00:00:00Z")
    j = one_job(call, job_id)
    assert j["Status"] == "Waiting" and j["ScheduledStartTime"] == "2030-01-02T00:00:00Z"


def test_cross_zone(call: Call, services: Services) -> None:
    raises("MissingParameter", call, "CreateCrossZoneMigrationJob", RegionId="local")
    raises("InvalidParameter", call, "CreateCrossZoneMigrationJob", RegionId="x", InstanceId="i-1")
    raises(
        "InvalidParameter",
        call,
        "CreateCrossZoneMigrationJob",
        RegionId="local",
        InstanceId="i-1",
        Disk__1__PerformanceLevel="PL9",
    )
    job_id = call(
        "CreateCrossZoneMigrationJob",
        RegionId="local",
        InstanceId="i-1",
        TargetZoneId="local-b",
        Disk__1__DiskId="d-1",
        Disk__1__Category="cloud_essd",
        Disk__1__PerformanceLevel="PL1",
        ClientToken="cz",
    )["JobId"]
    again = call(
        "CreateCrossZoneMigrationJob",
        RegionId="local",
        InstanceId="i-1",
        TargetZoneId="local-b",
        Disk__1__DiskId="d-1",
        Disk__1__Category="cloud_essd",
        Disk__1__PerformanceLevel="PL1",
        ClientToken="cz",
    )["JobId"]
    assert again == job_id
    j = one_job(call, job_id)
    assert j["JobType"] == 2 and j["InstanceId"] == "i-1" and j["Status"] == "Ready"
    assert json.loads(job_row(services, job_id).extra)["TargetZoneId"] == "local-b"
    assert call("DescribeReplicationJobs", JobType=2)["TotalCount"] == 1
    raises("OperationDenied.NotSupported", call, "StartReplicationJob", JobId=job_id)


# DescribeReplicationJobs ---------------------------------------------------------


def test_describe_filters_and_pages(call: Call, services: Services, caller: Caller, clock: Clock) -> None:
    ids = []
    for i in range(12):
        clock.advance(seconds=1)
        ids.append(
            create(
                call,
                add_source(services, caller),
                Name=f"job{i}",
                InstanceId=f"i-{i % 3}",
                ResourceGroupId="rg-a" if i < 4 else "rg-b",
                Tag__1__Key="team",
                Tag__1__Value="red" if i % 2 else "blue",
            )
        )
    out = call("DescribeReplicationJobs")
    assert out["TotalCount"] == 12 and out["PageNumber"] == 1 and out["PageSize"] == 10
    assert [j["JobId"] for j in out["ReplicationJobs"]["ReplicationJob"]] == ids[::-1][:10]
    page2 = call("DescribeReplicationJobs", PageNumber=2, PageSize=5)
    assert [j["JobId"] for j in page2["ReplicationJobs"]["ReplicationJob"]] == ids[::-1][5:10]
    far = call("DescribeReplicationJobs", PageNumber=9)
    assert far["ReplicationJobs"] == {"ReplicationJob": []} and far["TotalCount"] == 12

    def total(**kw: Any) -> int:
        n: int = call("DescribeReplicationJobs", **kw)["TotalCount"]
        return n

    assert total(JobId__1=ids[0], JobId__2=ids[1]) == 2
    assert total(Name="job3") == 1
    assert total(InstanceId__1="i-0") == 4
    assert total(ResourceGroupId="rg-a") == 4
    assert total(Tag__1__Key="team", Tag__1__Value="red") == 6
    assert total(Tag__1__Key="team") == 12
    assert total(Tag__1__Key="nope") == 0
    assert total(Status="Ready") == 12 and total(Status="Running") == 0
    assert total(BusinessStatus="Syncing") == 0
    assert total(JobType=0) == 12
    assert total(RegionId="local") == 12
    assert total(Name="job3", ResourceGroupId="rg-b") == 0
    src = job_row(services, ids[5]).source_id
    assert total(SourceId__1=src) == 1
    raises("InvalidParameter", call, "DescribeReplicationJobs", PageSize=51)
    raises("InvalidParameter", call, "DescribeReplicationJobs", Status="Bogus")
    raises("InvalidParameter", call, "DescribeReplicationJobs", **{f"JobId__{i}": "j" for i in range(1, 52)})
    raises(
        "InvalidParameter", call, "DescribeReplicationJobs", **{f"SourceId__{i}": "s" for i in range(1, 52)}
    )


def test_accounts_are_isolated(call: Call, services: Services, other_caller: Caller, src: str) -> None:
    job_id = create(call, src)
    other = ActionCaller(services, other_caller)
    assert other("DescribeReplicationJobs")["TotalCount"] == 0
    assert other("DescribeReplicationJobs", JobId__1=job_id)["TotalCount"] == 0
    for action in (
        "StartReplicationJob",
        "StopReplicationJob",
        "DeleteReplicationJob",
        "CutOverReplicationJob",
    ):
        err = raises("InvalidJobId.NotFound", other, action, JobId=job_id)
        assert err.http_status == 404
    raises("InvalidJobId.NotFound", other, "ModifyReplicationJobAttribute", JobId=job_id, Name="x-y")


# ModifyReplicationJobAttribute -----------------------------------------------------


def test_modify_before_run(call: Call, services: Services, src: str) -> None:
    job_id = create(call, src, Name="before")
    call(
        "ModifyReplicationJobAttribute",
        JobId=job_id,
        Name="after",
        Description="new words",
        TargetType="targetinstance",
        InstanceId="i-9",
        ImageName="img",
        SystemDiskSize=30,
        SystemDiskPart__1__Device="0_0",
        SystemDiskPart__1__SizeBytes=99,
        DataDisk__1__Index=1,
        DataDisk__1__Size=64,
        NetMode=2,
        VSwitchId="vsw",
        Frequency=5,
        MaxNumberOfImageToKeep=2,
        ValidTime="2030-03-01T00:00:00Z",
        ReplicationParameters='{"checksum":false}',
        ContainerTag="t",
    )
    j = one_job(call, job_id)
    assert j["Name"] == "after" and j["Description"] == "new words" and j["TargetType"] == "TargetInstance"
    assert j["InstanceId"] == "i-9" and j["SystemDiskSize"] == 30 and j["NetMode"] == 2
    assert (
        j["Frequency"] == 5 and j["MaxNumberOfImageToKeep"] == 2 and j["ValidTime"] == "2030-03-01T00:00:00Z"
    )
    assert j["SystemDiskParts"]["SystemDiskPart"] == [{"Device": "0_0", "SizeBytes": 99, "Block": True}]
    assert j["DataDisks"]["DataDisk"] == [{"Index": 1, "Size": 64, "Parts": {"Part": []}}]
    assert j["ReplicationParameters"] == '{"checksum":false}' and j["ContainerTag"] == "t"


def test_modify_errors(call: Call, services: Services, caller: Caller, src: str) -> None:
    job_id = create(call, src, Name="m1")
    create(call, add_source(services, caller), Name="m2")
    raises("MissingParameter", call, "ModifyReplicationJobAttribute")
    raises("InvalidJobId.NotFound", call, "ModifyReplicationJobAttribute", JobId="j-nope")
    raises("ReplicationJobName.Duplicate", call, "ModifyReplicationJobAttribute", JobId=job_id, Name="m2")
    call("ModifyReplicationJobAttribute", JobId=job_id, Name="m1")  # its own name is fine
    raises(
        "DataDisk.DuplicateIndex",
        call,
        "ModifyReplicationJobAttribute",
        JobId=job_id,
        DataDisk__1__Index=1,
        DataDisk__2__Index=1,
    )
    raises(
        "ReplicationJobDataDiskIndex.Invalid",
        call,
        "ModifyReplicationJobAttribute",
        JobId=job_id,
        DataDisk__1__Index=3,
    )
    err = raises("InvalidParameter", call, "ModifyReplicationJobAttribute", JobId=job_id, SystemDiskSize=19)
    assert "SystemDiskSize" in err.message
    raises("InvalidParameter", call, "ModifyReplicationJobAttribute", JobId=job_id, Frequency=0)
    raises(
        "InvalidParameter",
        call,
        "ModifyReplicationJobAttribute",
        JobId=job_id,
        ValidTime="2030-01-02T00:00:00Z",
    )
    raises(
        "MissingParameter", call, "ModifyReplicationJobAttribute", JobId=job_id, TargetType="TargetInstance"
    )
    raises("MissingParameter", call, "ModifyReplicationJobAttribute", JobId=job_id, NetMode=2)


def test_modify_after_run_is_limited(call: Call, services: Services, src: str) -> None:
    job_id = create(call, src, RunOnce=False, Frequency=1, MaxNumberOfImageToKeep=1)
    call("StartReplicationJob", JobId=job_id)
    err = raises(
        "ReplicationJob.InvalidStatus", call, "ModifyReplicationJobAttribute", JobId=job_id, ImageName="x1"
    )
    assert "Running(Preparing)" in err.message and "ImageName" in err.message
    raises("ReplicationJob.InvalidStatus", call, "ModifyReplicationJobAttribute", JobId=job_id, Frequency=3)
    call("ModifyReplicationJobAttribute", JobId=job_id, ValidTime="2030-02-15T00:00:00Z", Name="renamed")
    assert one_job(call, job_id)["Name"] == "renamed"


def test_modify_scheduled_start_moves_ready_to_waiting(call: Call, src: str) -> None:
    job_id = create(call, src)
    call("ModifyReplicationJobAttribute", JobId=job_id, ScheduledStartTime="2030-01-05T00:00:00Z")
    j = one_job(call, job_id)
    assert j["Status"] == "Waiting" and j["ScheduledStartTime"] == "2030-01-05T00:00:00Z"
    # still never run: it may be rescheduled
    call("ModifyReplicationJobAttribute", JobId=job_id, ScheduledStartTime="2030-01-06T00:00:00Z")
    assert one_job(call, job_id)["ScheduledStartTime"] == "2030-01-06T00:00:00Z"


def test_concurrent_creates_with_one_client_token_replay(call: Call, src: str) -> None:
    """Retries racing each other with one ClientToken all get the same job (no duplicate, no error)."""
    import threading

    results: list[str] = []
    errors: list[BaseException] = []

    def create() -> None:
        try:
            results.append(call("CreateReplicationJob", RegionId="local", SourceId=src, ClientToken="race-1")["JobId"])
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == 4 and len(set(results)) == 1


def test_a_disk_with_partitions_copied_file_by_file_may_be_smaller(
    call: Call, services: Services, caller: Caller
) -> None:
    """Block=false: the partitions' SizeBytes decide, checked when the run is prepared (domain/file_layout.py)."""
    disk = {
        "index": 0,
        "size_bytes": 100 * GIB,
        "partitions": [{"device": "0_0", "offset": 1 << 20, "size_bytes": 100 * GIB - (2 << 20), "fs_type": "ext4"}],
    }
    src = add_source(services, caller, disks=[disk])
    file_level = {"SystemDiskPart__1__Device": "0_0", "SystemDiskPart__1__SizeBytes": 10 * GIB}
    raises("InvalidParameter", create, call, src, SystemDiskSize=20, **file_level)  # Block=true: the whole disk
    create(call, src, SystemDiskSize=20, **file_level, SystemDiskPart__1__Block=False)
