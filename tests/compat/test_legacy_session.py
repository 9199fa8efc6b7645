"""A scripted session through the legacy SDK (aliyun-python-sdk-smc on aliyunsdkcore), all 24 actions.

The legacy SDK returns raw body bytes (parsed here with json.loads) and
raises ServerException for any non-2xx status. Six of its request classes
force HTTPS; an ``http://`` endpoint on the request overrides that
(WIRE.md §1), and ``set_protocol_type('http')`` is checked too.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from aliyunsdkcore.acs_exception.exceptions import ServerException
from aliyunsdkcore.request import CommonRequest
from aliyunsdksmc.request.v20190601 import (
    AssociateSourceServersRequest as AssociateSourceServers,
)
from aliyunsdksmc.request.v20190601 import (
    CreateAccessTokenRequest as CreateAccessToken,
)
from aliyunsdksmc.request.v20190601 import (
    CreateCrossZoneMigrationJobRequest as CreateCrossZoneMigrationJob,
)
from aliyunsdksmc.request.v20190601 import (
    CreateReplicationJobRequest as CreateReplicationJob,
)
from aliyunsdksmc.request.v20190601 import (
    CreateWorkgroupRequest as CreateWorkgroup,
)
from aliyunsdksmc.request.v20190601 import (
    CutOverReplicationJobRequest as CutOverReplicationJob,
)
from aliyunsdksmc.request.v20190601 import (
    DeleteAccessTokenRequest as DeleteAccessToken,
)
from aliyunsdksmc.request.v20190601 import (
    DeleteReplicationJobRequest as DeleteReplicationJob,
)
from aliyunsdksmc.request.v20190601 import (
    DeleteSourceServerRequest as DeleteSourceServer,
)
from aliyunsdksmc.request.v20190601 import (
    DeleteWorkgroupRequest as DeleteWorkgroup,
)
from aliyunsdksmc.request.v20190601 import (
    DescribeReplicationJobsRequest as DescribeReplicationJobs,
)
from aliyunsdksmc.request.v20190601 import (
    DescribeSourceServersRequest as DescribeSourceServers,
)
from aliyunsdksmc.request.v20190601 import (
    DescribeWorkgroupsRequest as DescribeWorkgroups,
)
from aliyunsdksmc.request.v20190601 import (
    DisableAccessTokenRequest as DisableAccessToken,
)
from aliyunsdksmc.request.v20190601 import (
    DisassociateSourceServersRequest as DisassociateSourceServers,
)
from aliyunsdksmc.request.v20190601 import (
    ListAccessTokensRequest as ListAccessTokens,
)
from aliyunsdksmc.request.v20190601 import (
    ListTagResourcesRequest as ListTagResources,
)
from aliyunsdksmc.request.v20190601 import (
    ModifyReplicationJobAttributeRequest as ModifyReplicationJobAttribute,
)
from aliyunsdksmc.request.v20190601 import (
    ModifySourceServerAttributeRequest as ModifySourceServerAttribute,
)
from aliyunsdksmc.request.v20190601 import (
    ModifyWorkgroupAttributeRequest as ModifyWorkgroupAttribute,
)
from aliyunsdksmc.request.v20190601 import (
    StartReplicationJobRequest as StartReplicationJob,
)
from aliyunsdksmc.request.v20190601 import (
    StopReplicationJobRequest as StopReplicationJob,
)
from aliyunsdksmc.request.v20190601 import (
    TagResourcesRequest as TagResources,
)
from aliyunsdksmc.request.v20190601 import (
    UntagResourcesRequest as UntagResources,
)

from opensmc.service import jobs as job_service
from tests.compat.conftest import Legacy, SmcServer, add_source, set_source_state


def R(module: Any) -> type:
    """The request class inside a legacy request module (`XxxRequest.XxxRequest`)."""
    return getattr(module, module.__name__.rsplit(".", 1)[1])  # type: ignore[no-any-return]


@pytest.fixture
def legacy(smc_server: SmcServer) -> Legacy:
    return Legacy(smc_server)


def error(call: Callable[..., Any], *args: Any, **kw: Any) -> ServerException:
    with pytest.raises(ServerException) as info:
        call(*args, **kw)
    return info.value


def ok(resp: dict[str, Any]) -> dict[str, Any]:
    assert isinstance(resp.get("RequestId"), str) and resp["RequestId"]
    return resp


def the_job(legacy: Legacy, job_id: str) -> dict[str, Any]:
    resp = ok(legacy(R(DescribeReplicationJobs), JobIds=[job_id]))
    assert resp["TotalCount"] == 1
    job: dict[str, Any] = resp["ReplicationJobs"]["ReplicationJob"][0]
    return job


def test_full_session(legacy: Legacy, smc_server: SmcServer) -> None:
    svc = smc_server.services
    # activation codes
    tok = ok(legacy(R(CreateAccessToken), Name="wave-a", Description="d", Count="3", TimeToLiveInDays="10"))
    assert tok["AccessTokenId"].startswith("at-") and tok["AccessTokenCode"]
    listed = ok(legacy(R(ListAccessTokens), AccessTokenIds=[tok["AccessTokenId"]]))
    (t,) = listed["AccessTokens"]["AccessToken"]
    assert (t["Count"], t["RegisteredCount"], t["TimeToLiveInDays"], t["Status"]) == (
        "3",
        "0",
        "10",
        "unactivated",
    )
    assert listed["TotalCount"] == 1 and isinstance(listed["PageNumber"], int)
    ok(legacy(R(DisableAccessToken), AccessTokenId=tok["AccessTokenId"]))
    assert ok(legacy(R(ListAccessTokens), Status="expired"))["TotalCount"] == 1
    ok(legacy(R(DeleteAccessToken), AccessTokenId=tok["AccessTokenId"]))
    assert ok(legacy(R(ListAccessTokens)))["TotalCount"] == 0

    # sources
    s1, s2 = add_source(smc_server, "web-1"), add_source(smc_server, "web-2")
    srcs = ok(legacy(R(DescribeSourceServers), PageSize=1, PageNumber=2))
    assert (srcs["TotalCount"], srcs["PageNumber"], srcs["PageSize"]) == (2, 2, 1)
    assert len(srcs["SourceServers"]["SourceServer"]) == 1
    ok(legacy(R(ModifySourceServerAttribute), SourceId=s1, Name="web-main", Description="front"))
    (s,) = ok(legacy(R(DescribeSourceServers), Name="web-main"))["SourceServers"]["SourceServer"]
    assert (s["SourceId"], s["Description"], s["State"]) == (s1, "front", "Available")
    assert isinstance(s["SystemDiskSize"], int) and isinstance(s["KernelLevel"], int)
    assert isinstance(s["SystemDiskParts"]["SystemDiskPart"], list)
    assert isinstance(s["DataDisks"]["DataDisk"][0]["Parts"]["Part"], list)
    assert isinstance(s["Disks"]["Data"]["Data"], list)
    assert isinstance(s["Tags"]["Tag"], list)

    # workgroups (three of these request classes force HTTPS; the http:// endpoint wins)
    wg_params: dict[str, Any] = {
        "Name": "wave-1",
        "Description": "first",
        "ClientToken": "c-1",
        "Tags": [{"Key": "k", "Value": "v"}],
    }
    wg = ok(legacy(R(CreateWorkgroup), **wg_params))["WorkgroupId"]
    again = ok(legacy(R(CreateWorkgroup), **wg_params))
    assert again["WorkgroupId"] == wg
    ok(legacy(R(ModifyWorkgroupAttribute), WorkgroupId=wg, Description="first wave"))
    ok(legacy(R(AssociateSourceServers), WorkgroupId=wg, SourceIds=[s1, s2]))
    (w,) = ok(legacy(R(DescribeWorkgroups), WorkgroupIds=[wg]))["Workgroups"]["Workgroup"]
    assert (w["Name"], w["Description"], w["Tags"]["Tag"]) == (
        "wave-1",
        "first wave",
        [{"Key": "k", "Value": "v"}],
    )
    assert isinstance(w["Warnings"]["Warning"], list)
    assert ok(legacy(R(DescribeSourceServers), WorkgroupId=wg))["TotalCount"] == 2
    ok(legacy(R(DisassociateSourceServers), WorkgroupId=wg, SourceIds=[s1, s2]))
    assert ok(legacy(R(DescribeSourceServers), WorkgroupId=wg))["TotalCount"] == 0

    # a job: create (idempotent), modify, start, stop, start, finish, delete
    create = {
        "SourceId": s1,
        "Name": "job-1",
        "Description": "legacy job",
        "SystemDiskSize": 40,
        "SystemDiskParts": [{"Device": "0_1", "SizeBytes": 20 << 30, "Block": True}],
        "DataDisks": [
            {"Index": 1, "Size": 30, "Part": [{"Device": "1_0", "SizeBytes": 10 << 30, "Block": False}]}
        ],
        "RunOnce": True,
        "ClientToken": "job-token-1",
        "Tags": [{"Key": "env", "Value": "prod"}, {"Key": "empty", "Value": ""}],
    }
    job = ok(legacy(R(CreateReplicationJob), **create))["JobId"]
    assert ok(legacy(R(CreateReplicationJob), **create))["JobId"] == job
    j = the_job(legacy, job)
    assert (j["Status"], j["RegionId"], j["RunOnce"], j["JobType"]) == ("Ready", "local", True, 0)
    assert j["SystemDiskParts"]["SystemDiskPart"] == [{"Device": "0_1", "SizeBytes": 20 << 30, "Block": True}]
    assert j["DataDisks"]["DataDisk"][0]["Parts"]["Part"][0]["Block"] is False
    assert sorted((t["Key"], t["Value"]) for t in j["Tags"]["Tag"]) == [("empty", ""), ("env", "prod")]
    ok(legacy(R(ModifyReplicationJobAttribute), JobId=job, Name="job-1b", ImageName="img-1", NetMode=0))
    assert the_job(legacy, job)["Name"] == "job-1b"

    ok(legacy(R(StartReplicationJob), JobId=job))
    j = the_job(legacy, job)
    assert (j["Status"], j["BusinessStatus"]) == ("Running", "Preparing")
    e = error(legacy, R(StartReplicationJob), JobId=job)
    assert (e.get_error_code(), e.get_http_status()) == ("ReplicationJob.InvalidStatus", 400)
    assert e.get_request_id()
    job_service.mark_prepared(svc, job, "ti-x")
    ok(legacy(R(StopReplicationJob), JobId=job))
    assert the_job(legacy, job)["Status"] == "Stopped"
    ok(legacy(R(StartReplicationJob), JobId=job))
    job_service.mark_prepared(svc, job, "ti-x")
    job_service.mark_synced(svc, job)
    job_service.mark_processed(svc, job, "m-legacy0000000000001")
    job_service.mark_cleaned(svc, job)
    j = the_job(legacy, job)
    assert j["Status"] == "Finished" and [
        r["Type"] for r in j["ReplicationJobRuns"]["ReplicationJobRun"]
    ] == [
        "Manual",
        "Manual",
    ]

    # tags through the Tag API
    ok(
        legacy(
            R(TagResources),
            ResourceType="replicationjob",
            ResourceIds=[job],
            Tags=[{"Key": "owner", "Value": "me"}],
        )
    )
    tags = ok(legacy(R(ListTagResources), ResourceType="replicationjob", ResourceIds=[job]))
    assert {(t["TagKey"], t["TagValue"]) for t in tags["TagResources"]["TagResource"]} == {
        ("env", "prod"),
        ("empty", ""),
        ("owner", "me"),
    }
    ok(
        legacy(
            R(UntagResources), ResourceType="replicationjob", ResourceIds=[job], TagKeys=["owner", "absent"]
        )
    )
    e = error(legacy, R(UntagResources), ResourceType="replicationjob", ResourceIds=[job], All=False)
    assert e.get_error_code() == "MissingParameter"  # neither keys nor All=true: nothing to do
    assert (
        len(ok(legacy(R(ListTagResources), ResourceType="replicationjob"))["TagResources"]["TagResource"])
        == 2
    )
    ok(legacy(R(UntagResources), ResourceType="replicationjob", ResourceIds=[job], All=True))
    assert ok(legacy(R(ListTagResources), ResourceType="replicationjob"))["TagResources"]["TagResource"] == []

    # an incremental job cut over
    inc = ok(
        legacy(R(CreateReplicationJob), SourceId=s2, RunOnce=False, Frequency=6, MaxNumberOfImageToKeep=3)
    )["JobId"]
    ok(legacy(R(StartReplicationJob), JobId=inc))
    job_service.mark_prepared(svc, inc, "ti-y")
    job_service.mark_synced(svc, inc)
    job_service.mark_processed(svc, inc, "m-legacy0000000000002")
    job_service.mark_cleaned(svc, inc)
    assert the_job(legacy, inc)["Status"] == "Waiting"
    ok(legacy(R(CutOverReplicationJob), JobId=inc, SyncData=True))
    assert (the_job(legacy, inc)["Status"], the_job(legacy, inc)["BusinessStatus"]) == (
        "Running",
        "Preparing",
    )
    job_service.mark_prepared(svc, inc, "ti-y")
    job_service.mark_synced(svc, inc)
    job_service.mark_processed(svc, inc, "m-legacy0000000000003")
    job_service.mark_cleaned(svc, inc)
    assert the_job(legacy, inc)["Status"] == "Finished"

    # cross-zone
    disks = [{"DiskId": "d-1", "Category": "cloud_essd", "PerformanceLevel": "PL0"}]
    xz = ok(
        legacy(
            R(CreateCrossZoneMigrationJob), InstanceId="i-1", TargetZoneId="z-b", AutoPay=True, Disks=disks
        )
    )
    xz = xz["JobId"]
    assert the_job(legacy, xz)["JobType"] == 2
    ok(legacy(R(DeleteReplicationJob), JobId=xz))

    # clean up: jobs, then sources, then the workgroup
    ok(legacy(R(DeleteReplicationJob), JobId=job))
    assert the_job(legacy, job)["Status"] == "Deleting"
    e = error(legacy, R(DeleteSourceServer), SourceId=s2)
    assert e.get_error_code() == "ReplicationJob.Related"
    ok(legacy(R(DeleteSourceServer), SourceId=s2, Force=True))
    assert ok(legacy(R(DescribeSourceServers), SourceIds=[s2]))["TotalCount"] == 0
    assert ok(legacy(R(DescribeReplicationJobs), SourceIds=[s2]))["TotalCount"] == 0
    ok(legacy(R(DeleteWorkgroup), WorkgroupId=wg))
    assert ok(legacy(R(DescribeWorkgroups)))["TotalCount"] == 0


def test_errors(legacy: Legacy, smc_server: SmcServer) -> None:
    e = error(legacy, R(StartReplicationJob), JobId="j-doesnotexist00000000")
    assert (e.get_error_code(), e.get_http_status()) == ("InvalidJobId.NotFound", 404)
    assert "j-doesnotexist00000000" in e.get_error_msg()
    e = error(legacy, R(StartReplicationJob))
    assert (e.get_error_code(), e.get_http_status()) == ("MissingParameter", 400)
    e = error(legacy, R(DescribeReplicationJobs), PageSize=51)
    assert (e.get_error_code(), e.get_http_status()) == ("InvalidParameter", 400)
    e = error(legacy, R(CreateAccessToken), Count="1001")
    assert e.get_error_code() == "InvalidParameter"
    e = error(legacy, R(ListTagResources))
    assert e.get_error_code() == "MissingParameter.ResourceType"

    src = add_source(smc_server, "web-1")
    set_source_state(smc_server, src, "Unavailable")
    e = error(legacy, R(CreateReplicationJob), SourceId=src)
    assert (e.get_error_code(), e.get_http_status()) == ("SourceServerState.Invalid", 400)

    # an unknown RegionId on CreateReplicationJob
    other_region = Legacy(smc_server, region="cn-hangzhou")
    set_source_state(smc_server, src, "Available")
    e = error(other_region, R(CreateReplicationJob), SourceId=src)
    assert (e.get_error_code(), e.get_http_status()) == ("InvalidParameter", 400)
    # ... while every other action ignores the RegionId the SDK always adds
    assert ok(other_region(R(DescribeSourceServers)))["TotalCount"] == 1


def test_account_isolation(legacy: Legacy, smc_server: SmcServer) -> None:
    src = add_source(smc_server, "web-1")
    job = ok(legacy(R(CreateReplicationJob), SourceId=src))["JobId"]
    ok(legacy(R(CreateWorkgroup), Name="wave-1"))
    pair = smc_server.new_account("intruder")
    other = Legacy(smc_server, key_id=pair.access_key_id, secret=pair.access_key_secret)
    for request_class in (R(DescribeSourceServers), R(DescribeReplicationJobs), R(DescribeWorkgroups)):
        assert ok(other(request_class))["TotalCount"] == 0
    e = error(other, R(StartReplicationJob), JobId=job)
    assert (e.get_error_code(), e.get_http_status()) == ("InvalidJobId.NotFound", 404)
    e = error(other, R(CreateReplicationJob), SourceId=src)
    assert (e.get_error_code(), e.get_http_status()) == ("InvalidSourceId.NotFound", 404)
    assert the_job(legacy, job)["Status"] == "Ready"


def test_signature_errors(smc_server: SmcServer) -> None:
    wrong = Legacy(smc_server, secret="wrong-secret")
    # The SDK compares the server's string-to-sign with its own and, as they
    # match, rewrites SignatureDoesNotMatch (it must not crash with IndexError).
    e = error(wrong, R(DescribeSourceServers))
    assert e.get_error_code() == "InvalidAccessKeySecret"
    assert e.get_http_status() == 400
    e = error(wrong, R(DescribeWorkgroups))  # an HTTPS-forced class
    assert e.get_error_code() == "InvalidAccessKeySecret"

    unknown = Legacy(smc_server, key_id="LTAIdoesnotexist", secret="x")
    e = error(unknown, R(DescribeSourceServers))
    assert (e.get_error_code(), e.get_http_status()) == ("InvalidAccessKeyId.NotFound", 404)


def test_unknown_action_and_common_request(legacy: Legacy, smc_server: SmcServer) -> None:
    req = CommonRequest(domain=smc_server.endpoint, version="2019-06-01", action_name="DescribeInstances")
    req.set_method("POST")
    req.set_protocol_type("http")
    with pytest.raises(ServerException) as info:
        legacy.client.do_action_with_exception(req)
    assert (info.value.get_error_code(), info.value.get_http_status()) == ("InvalidAction.NotFound", 404)

    req = CommonRequest(domain=smc_server.endpoint, version="2019-06-01", action_name="DescribeSourceServers")
    req.set_method("GET")
    req.set_protocol_type("http")
    req.add_query_param("PageSize", "5")
    resp = json.loads(legacy.client.do_action_with_exception(req))
    assert (resp["TotalCount"], resp["PageSize"]) == (0, 5)


@pytest.mark.parametrize(
    "module",
    [
        AssociateSourceServers,
        CreateWorkgroup,
        DeleteWorkgroup,
        DescribeWorkgroups,
        DisassociateSourceServers,
        ModifyWorkgroupAttribute,
    ],
)
def test_https_forced_classes_work_with_protocol_override(module: Any, smc_server: SmcServer) -> None:
    """Endpoint without a scheme + set_protocol_type('http'): the request reaches the server."""
    legacy = Legacy(smc_server)
    req = R(module)()
    req.set_endpoint(smc_server.endpoint)
    req.set_protocol_type("http")
    if hasattr(req, "set_Name") and module is CreateWorkgroup:
        req.set_Name("wave-z")
    try:
        body = json.loads(legacy.client.do_action_with_exception(req))
        assert body["RequestId"]
    except ServerException as e:  # a validation error still proves the request arrived
        assert e.get_request_id() and e.get_http_status() in (400, 404)
