"""Documented errors as the Tea SDK surfaces them, and account isolation (both signing schemes)."""

from __future__ import annotations

from typing import Any

import pytest
from alibabacloud_smc20190601 import models as m
from alibabacloud_tea_openapi import models as open_api_models
from alibabacloud_tea_openapi.exceptions import ClientException
from alibabacloud_tea_util import models as util_models
from Tea.exceptions import TeaException

from tests.compat.conftest import SmcServer, add_source, tea_client
from tests.compat.tea_support import REGION, body, describe_job, status_of, tea_error


@pytest.fixture(params=["acs3", "v2"])
def scheme(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_not_found_missing_and_invalid(scheme: str, smc_server: SmcServer) -> None:
    tea = tea_client(smc_server, v2=scheme == "v2")
    e = tea_error(tea.start_replication_job, m.StartReplicationJobRequest(job_id="j-doesnotexist00000000"))
    assert isinstance(e, ClientException)
    assert (e.code, status_of(e), e.status_code) == ("InvalidJobId.NotFound", 404, 404)
    assert e.request_id and "j-doesnotexist00000000" in e.message
    assert e.data["HostId"] and e.data["Recommend"]

    e = tea_error(tea.start_replication_job, m.StartReplicationJobRequest())  # the SDK sends no JobId
    assert (e.code, e.status_code) == ("MissingParameter", 400)
    assert "JobId" in e.message

    for action, req in (
        (tea.describe_source_servers, m.DescribeSourceServersRequest(page_size=100)),
        (tea.describe_replication_jobs, m.DescribeReplicationJobsRequest(page_number=-1)),
        (tea.create_access_token, m.CreateAccessTokenRequest(time_to_live_in_days="0")),
        (tea.describe_replication_jobs, m.DescribeReplicationJobsRequest(job_type=7)),
    ):
        e = tea_error(action, req)
        assert (e.code, e.status_code) == ("InvalidParameter", 400), (req, e.code)

    src = add_source(smc_server, "web-1")
    for over in ({"system_disk_size": 19}, {"net_mode": 1}, {"frequency": 0}, {"job_type": 4}):
        e = tea_error(
            tea.create_replication_job, m.CreateReplicationJobRequest(region_id=REGION, source_id=src, **over)
        )
        assert (e.code, e.status_code) == ("InvalidParameter", 400), over
    e = tea_error(tea.create_replication_job, m.CreateReplicationJobRequest(region_id=REGION))
    assert e.code == "MissingParameter" and "SourceId" in e.message
    e = tea_error(
        tea.create_replication_job, m.CreateReplicationJobRequest(region_id=REGION, source_id=src, net_mode=2)
    )
    assert e.code == "MissingParameter" and "VSwitchId" in e.message
    e = tea_error(
        tea.create_replication_job,
        m.CreateReplicationJobRequest(region_id=REGION, source_id="s-doesnotexist00000000"),
    )
    assert (e.code, e.status_code) == ("InvalidSourceId.NotFound", 404)


def test_state_errors(scheme: str, smc_server: SmcServer) -> None:
    tea = tea_client(smc_server, v2=scheme == "v2")
    src = add_source(smc_server, "web-1")
    job = body(
        tea.create_replication_job(m.CreateReplicationJobRequest(region_id=REGION, source_id=src))
    ).job_id
    body(tea.start_replication_job(m.StartReplicationJobRequest(job_id=job)))
    e = tea_error(tea.start_replication_job, m.StartReplicationJobRequest(job_id=job))
    assert (e.code, e.status_code) == ("ReplicationJob.InvalidStatus", 400)
    assert "Running" in e.message
    e = tea_error(tea.delete_source_server, m.DeleteSourceServerRequest(source_id=src, force=True))
    assert (e.code, e.status_code) == ("SourceServer.WithRunningReplicationJob", 400)
    assert describe_job(tea, job).status == "Running"


def test_wrong_secret_and_unknown_key(scheme: str, smc_server: SmcServer) -> None:
    bad = tea_client(smc_server, v2=scheme == "v2", secret="not-the-secret")
    e = tea_error(bad.describe_source_servers, m.DescribeSourceServersRequest())
    assert (e.code, e.status_code) == ("SignatureDoesNotMatch", 400)
    assert ":" in e.data["Message"]
    unknown = tea_client(smc_server, v2=scheme == "v2", key_id="LTAIunknown", secret="x")
    e = tea_error(unknown.describe_source_servers, m.DescribeSourceServersRequest())
    assert (e.code, e.status_code) == ("InvalidAccessKeyId.NotFound", 404)


def _call(tea: Any, action: str, version: str = "2019-06-01") -> Any:
    params = open_api_models.Params(
        action=action,
        version=version,
        protocol="HTTP",
        pathname="/",
        method="POST",
        auth_type="AK",
        style="RPC",
        req_body_type="formData",
        body_type="json",
    )
    return tea.call_api(params, open_api_models.OpenApiRequest(query={}), util_models.RuntimeOptions())


def test_unknown_action_and_version(scheme: str, smc_server: SmcServer) -> None:
    tea = tea_client(smc_server, v2=scheme == "v2")
    e = tea_error(_call, tea, "DescribeInstances")
    assert (e.code, e.status_code) == ("InvalidAction.NotFound", 404)
    e = tea_error(_call, tea, "DescribeSourceServers", "2014-05-26")
    assert (e.code, e.status_code) == ("InvalidVersion", 400)
    ok = _call(tea, "DescribeSourceServers")
    assert ok["statusCode"] == 200 and ok["body"]["TotalCount"] == 0


def test_account_isolation(scheme: str, smc_server: SmcServer) -> None:
    tea = tea_client(smc_server, v2=scheme == "v2")
    src = add_source(smc_server, "web-1")
    job = body(
        tea.create_replication_job(m.CreateReplicationJobRequest(region_id=REGION, source_id=src))
    ).job_id
    wg = body(tea.create_workgroup(m.CreateWorkgroupRequest(name="wave-1"))).workgroup_id
    token = body(tea.create_access_token(m.CreateAccessTokenRequest())).access_token_id
    body(
        tea.tag_resources(
            m.TagResourcesRequest(
                resource_type="sourceserver", resource_id=[src], tag=[m.TagResourcesRequestTag(key="a")]
            )
        )
    )

    pair = smc_server.new_account("intruder")
    other = tea_client(
        smc_server, v2=scheme == "v2", key_id=pair.access_key_id, secret=pair.access_key_secret
    )
    assert body(other.describe_source_servers(m.DescribeSourceServersRequest())).total_count == 0
    assert body(other.describe_replication_jobs(m.DescribeReplicationJobsRequest())).total_count == 0
    assert (
        body(other.describe_replication_jobs(m.DescribeReplicationJobsRequest(job_id=[job]))).total_count == 0
    )
    assert body(other.describe_workgroups(m.DescribeWorkgroupsRequest())).total_count == 0
    assert body(other.list_access_tokens(m.ListAccessTokensRequest())).total_count == 0
    listed = body(other.list_tag_resources(m.ListTagResourcesRequest(resource_type="sourceserver")))
    assert listed.tag_resources is None or listed.tag_resources.tag_resource == []

    cases: list[tuple[Any, Any, int]] = [
        (other.start_replication_job, m.StartReplicationJobRequest(job_id=job), 404),
        (other.delete_replication_job, m.DeleteReplicationJobRequest(job_id=job), 404),
        (
            other.modify_replication_job_attribute,
            m.ModifyReplicationJobAttributeRequest(job_id=job, name="x-y"),
            404,
        ),
        (
            other.modify_source_server_attribute,
            m.ModifySourceServerAttributeRequest(source_id=src, name="x-y"),
            404,
        ),
        (other.delete_source_server, m.DeleteSourceServerRequest(source_id=src, force=True), 404),
        (other.delete_workgroup, m.DeleteWorkgroupRequest(workgroup_id=wg), 404),
        (other.delete_access_token, m.DeleteAccessTokenRequest(access_token_id=token), 404),
        (
            other.create_replication_job,
            m.CreateReplicationJobRequest(region_id=REGION, source_id=src, name="stolen"),
            404,
        ),
        (
            other.tag_resources,
            m.TagResourcesRequest(
                resource_type="sourceserver", resource_id=[src], tag=[m.TagResourcesRequestTag(key="b")]
            ),
            400,  # InvalidResourceId.NotFound is documented as 400
        ),
    ]
    for call, req, status in cases:
        with pytest.raises(TeaException) as info:
            call(req)
        assert status_of(info.value) == status, (type(req).__name__, info.value.code)
        assert "NotFound" in str(info.value.code), (type(req).__name__, info.value.code)
    # nothing changed for the owner
    assert describe_job(tea, job).status == "Ready"
    assert body(tea.describe_workgroups(m.DescribeWorkgroupsRequest())).total_count == 1
