"""Tea SDK (alibabacloud-smc20190601) sessions over a real socket: codes, sources, tags, workgroups.

Every test runs with both of Tea's signing schemes (ACS3-HMAC-SHA256 and,
with ``signature_algorithm='v2'``, V1 HMAC-SHA1) and on both databases.
Responses are read through the SDK's models only: a wrong wrapper shape
makes ``resp.body`` None, so every body is asserted not None first.
"""

from __future__ import annotations

from typing import Any

from alibabacloud_smc20190601 import models as m

from tests.compat.conftest import SmcServer, add_source
from tests.compat.tea_support import body, status_of, tea_error

# access tokens ------------------------------------------------------------------------


def test_access_tokens(tea: Any) -> None:
    created = body(
        tea.create_access_token(
            m.CreateAccessTokenRequest(
                name="batch-1", description="first wave", count="5", time_to_live_in_days="7"
            )
        )
    )
    assert created.access_token_id.startswith("at-")
    assert created.access_token_code
    other = body(tea.create_access_token(m.CreateAccessTokenRequest()))

    listed = body(tea.list_access_tokens(m.ListAccessTokensRequest()))
    assert listed.total_count == 2
    assert listed.page_number == 1
    by_id = {t.access_token_id: t for t in listed.access_tokens.access_token}
    first = by_id[created.access_token_id]
    assert (first.name, first.description, first.count, first.time_to_live_in_days) == (
        "batch-1",
        "first wave",
        "5",
        "7",
    )
    assert first.registered_count == "0"
    assert first.status == "unactivated"
    assert first.creation_time.endswith("Z")
    # defaults, as strings
    assert (by_id[other.access_token_id].count, by_id[other.access_token_id].time_to_live_in_days) == (
        "100",
        "30",
    )

    only = body(tea.list_access_tokens(m.ListAccessTokensRequest(access_token_id=[created.access_token_id])))
    assert [t.access_token_id for t in only.access_tokens.access_token] == [created.access_token_id]
    named = body(tea.list_access_tokens(m.ListAccessTokensRequest(name="batch-1")))
    assert named.total_count == 1

    body(tea.disable_access_token(m.DisableAccessTokenRequest(access_token_id=created.access_token_id)))
    expired = body(tea.list_access_tokens(m.ListAccessTokensRequest(status="expired")))
    assert [t.access_token_id for t in expired.access_tokens.access_token] == [created.access_token_id]

    body(tea.delete_access_token(m.DeleteAccessTokenRequest(access_token_id=created.access_token_id)))
    body(tea.delete_access_token(m.DeleteAccessTokenRequest(access_token_id=other.access_token_id)))
    empty = body(tea.list_access_tokens(m.ListAccessTokensRequest()))
    assert empty.total_count == 0
    assert empty.access_tokens is None or empty.access_tokens.access_token == []

    e = tea_error(
        tea.delete_access_token, m.DeleteAccessTokenRequest(access_token_id=created.access_token_id)
    )
    assert (e.code, status_of(e)) == ("InvalidAccessTokenId.NotFound", 404)
    for bad in (m.CreateAccessTokenRequest(count="0"), m.CreateAccessTokenRequest(count="1001")):
        e = tea_error(tea.create_access_token, bad)
        assert (e.code, status_of(e)) == ("InvalidParameter", 400)
        assert "Count" in e.message
    e = tea_error(tea.create_access_token, m.CreateAccessTokenRequest(time_to_live_in_days="91"))
    assert e.code == "InvalidParameter" and "TimeToLiveInDays" in e.message
    e = tea_error(tea.list_access_tokens, m.ListAccessTokensRequest(status="bogus"))
    assert e.code == "InvalidParameter"


# sources and tags ---------------------------------------------------------------------


def test_sources_pagination_filters_and_tags(tea: Any, smc_server: SmcServer) -> None:
    ids = [add_source(smc_server, f"web-{i}") for i in range(3)]

    page1 = body(tea.describe_source_servers(m.DescribeSourceServersRequest(page_size=2, page_number=1)))
    page2 = body(tea.describe_source_servers(m.DescribeSourceServersRequest(page_size=2, page_number=2)))
    assert (page1.total_count, page1.page_number, page1.page_size) == (3, 1, 2)
    assert len(page1.source_servers.source_server) == 2
    assert len(page2.source_servers.source_server) == 1
    seen = {s.source_id for s in page1.source_servers.source_server + page2.source_servers.source_server}
    assert seen == set(ids)
    # each source registered with an activation code of Count=1, which is now used up
    codes = body(tea.list_access_tokens(m.ListAccessTokensRequest())).access_tokens.access_token
    assert len(codes) == 3
    assert {(c.count, c.registered_count, c.status) for c in codes} == {("1", "1", "activated")}
    default = body(tea.describe_source_servers(m.DescribeSourceServersRequest()))
    assert (default.page_number, default.page_size) == (1, 10)

    s = body(
        tea.describe_source_servers(m.DescribeSourceServersRequest(source_id=[ids[0]]))
    ).source_servers.source_server[0]
    assert s.state == "Available"
    assert s.architecture == "x86_64" and s.platform == "Ubuntu"
    assert isinstance(s.kernel_level, int) and isinstance(s.heartbeat_rate, int)
    assert s.replication_driver == "SMT"
    assert s.system_disk_size == 20
    assert s.creation_time.endswith("Z")
    assert s.system_info.startswith("{")
    assert {p.device for p in s.system_disk_parts.system_disk_part} == {"0_0", "0_1"}
    part = s.system_disk_parts.system_disk_part[0]
    assert (
        isinstance(part.size_bytes, int) and isinstance(part.can_block, bool) and isinstance(part.need, bool)
    )
    assert [d.index for d in s.data_disks.data_disk] == [1]
    assert s.data_disks.data_disk[0].parts.part[0].device == "1_0"
    assert s.disks.system.size is not None and s.disks.system.parts.part
    assert {p.type for p in s.disks.system.parts.part} <= {"Normal", "System", "Boot"}
    assert len(s.disks.data.data) == 1

    body(
        tea.modify_source_server_attribute(
            m.ModifySourceServerAttributeRequest(source_id=ids[0], name="db-main", description="the database")
        )
    )
    named = body(tea.describe_source_servers(m.DescribeSourceServersRequest(name="db-main")))
    assert [x.source_id for x in named.source_servers.source_server] == [ids[0]]
    assert named.source_servers.source_server[0].description == "the database"
    available = body(tea.describe_source_servers(m.DescribeSourceServersRequest(state="Available")))
    assert available.total_count == 3

    # tags on sources
    body(
        tea.tag_resources(
            m.TagResourcesRequest(
                resource_type="sourceserver",
                resource_id=ids[:2],
                tag=[
                    m.TagResourcesRequestTag(key="env", value="prod"),
                    m.TagResourcesRequestTag(key="team", value=""),
                ],
            )
        )
    )
    tagged = body(
        tea.describe_source_servers(
            m.DescribeSourceServersRequest(tag=[m.DescribeSourceServersRequestTag(key="env", value="prod")])
        )
    )
    assert {x.source_id for x in tagged.source_servers.source_server} == set(ids[:2])
    assert {(t.key, t.value) for t in tagged.source_servers.source_server[0].tags.tag} == {
        ("env", "prod"),
        ("team", ""),
    }

    listed = body(
        tea.list_tag_resources(m.ListTagResourcesRequest(resource_type="sourceserver", resource_id=ids))
    )
    pairs = {(r.resource_id, r.tag_key, r.tag_value) for r in listed.tag_resources.tag_resource}
    assert pairs == {(i, k, v) for i in ids[:2] for k, v in (("env", "prod"), ("team", ""))}
    assert {r.resource_type for r in listed.tag_resources.tag_resource} == {"ALIYUN::SMC::SOURCESERVER"}
    by_tag = body(
        tea.list_tag_resources(
            m.ListTagResourcesRequest(
                resource_type="sourceserver", tag=[m.ListTagResourcesRequestTag(key="env", value="prod")]
            )
        )
    )
    assert {r.resource_id for r in by_tag.tag_resources.tag_resource} == set(ids[:2])
    assert not by_tag.next_token

    body(
        tea.untag_resources(
            m.UntagResourcesRequest(resource_type="sourceserver", resource_id=[ids[0]], tag_key=["team"])
        )
    )
    body(
        tea.untag_resources(
            m.UntagResourcesRequest(resource_type="sourceserver", resource_id=[ids[1]], all=True)
        )
    )
    left = body(
        tea.list_tag_resources(m.ListTagResourcesRequest(resource_type="sourceserver", resource_id=ids))
    )
    assert {(r.resource_id, r.tag_key) for r in left.tag_resources.tag_resource} == {(ids[0], "env")}

    e = tea_error(tea.list_tag_resources, m.ListTagResourcesRequest())
    assert (e.code, status_of(e)) == ("MissingParameter.ResourceType", 400)
    e = tea_error(tea.list_tag_resources, m.ListTagResourcesRequest(resource_type="disk"))
    assert e.code == "InvalidResourceType.NotFound"
    e = tea_error(
        tea.tag_resources,
        m.TagResourcesRequest(
            resource_type="sourceserver",
            resource_id=["s-doesnotexist0000000"],
            tag=[m.TagResourcesRequestTag(key="a")],
        ),
    )
    assert e.code == "InvalidResourceId.NotFound"
    too_many = [m.TagResourcesRequestTag(key=f"k{i}", value="v") for i in range(21)]
    e = tea_error(
        tea.tag_resources,
        m.TagResourcesRequest(resource_type="sourceserver", resource_id=[ids[0]], tag=too_many),
    )
    assert e.code == "NumberExceed.Tags"
    e = tea_error(
        tea.tag_resources,
        m.TagResourcesRequest(
            resource_type="sourceserver",
            resource_id=[ids[0], ids[0]],
            tag=[m.TagResourcesRequestTag(key="a")],
        ),
    )
    assert e.code == "Duplicate.ResourceId"

    # deleting a source without jobs needs no Force
    body(tea.delete_source_server(m.DeleteSourceServerRequest(source_id=ids[2])))
    gone = body(tea.describe_source_servers(m.DescribeSourceServersRequest(source_id=[ids[2]])))
    assert gone.total_count == 0
    e = tea_error(tea.delete_source_server, m.DeleteSourceServerRequest(source_id=ids[2]))
    assert (e.code, status_of(e)) == ("InvalidSourceId.NotFound", 404)
    e = tea_error(
        tea.modify_source_server_attribute, m.ModifySourceServerAttributeRequest(source_id="s-nope")
    )
    assert (e.code, status_of(e)) == ("InvalidSourceId.NotFound", 404)


# workgroups ---------------------------------------------------------------------------


def test_workgroups(tea: Any, smc_server: SmcServer) -> None:
    s1, s2 = add_source(smc_server, "app-1"), add_source(smc_server, "app-2")
    req = m.CreateWorkgroupRequest(
        name="wave-1",
        description="first wave",
        client_token="tok-wg-1",
        tag=[m.CreateWorkgroupRequestTag(key="k", value="v")],
    )
    wg = body(tea.create_workgroup(req)).workgroup_id
    assert wg.startswith("w-")
    assert body(tea.create_workgroup(req)).workgroup_id == wg  # same ClientToken, same parameters
    e = tea_error(tea.create_workgroup, m.CreateWorkgroupRequest(name="wave-x", client_token="tok-wg-1"))
    assert (e.code, status_of(e)) == ("IdempotentParameterMismatch", 400)
    wg2 = body(tea.create_workgroup(m.CreateWorkgroupRequest(name="wave-2"))).workgroup_id

    listed = body(tea.describe_workgroups(m.DescribeWorkgroupsRequest()))
    assert listed.total_count == 2
    by_id = {w.workgroup_id: w for w in listed.workgroups.workgroup}
    w = by_id[wg]
    assert (w.name, w.description, w.status) == ("wave-1", "first wave", "NotStarted")
    assert [(t.key, t.value) for t in w.tags.tag] == [("k", "v")]
    page = body(tea.describe_workgroups(m.DescribeWorkgroupsRequest(page_size=1, page_number=2)))
    assert (page.total_count, page.page_size, len(page.workgroups.workgroup)) == (2, 1, 1)
    assert (
        body(tea.describe_workgroups(m.DescribeWorkgroupsRequest(name="wave-2")))
        .workgroups.workgroup[0]
        .workgroup_id
        == wg2
    )
    by_tag = body(
        tea.describe_workgroups(
            m.DescribeWorkgroupsRequest(tag=[m.DescribeWorkgroupsRequestTag(key="k", value="v")])
        )
    )
    assert [x.workgroup_id for x in by_tag.workgroups.workgroup] == [wg]

    body(tea.modify_workgroup_attribute(m.ModifyWorkgroupAttributeRequest(workgroup_id=wg2, name="wave-2b")))
    assert (
        body(tea.describe_workgroups(m.DescribeWorkgroupsRequest(workgroup_id=[wg2])))
        .workgroups.workgroup[0]
        .name
        == "wave-2b"
    )
    e = tea_error(
        tea.modify_workgroup_attribute, m.ModifyWorkgroupAttributeRequest(workgroup_id=wg2, name="wave-1")
    )
    assert status_of(e) == 400

    body(tea.associate_source_servers(m.AssociateSourceServersRequest(workgroup_id=wg, source_id=[s1, s2])))
    members = body(tea.describe_source_servers(m.DescribeSourceServersRequest(workgroup_id=wg)))
    assert {s.source_id for s in members.source_servers.source_server} == {s1, s2}
    assert {s.workgroup_id for s in members.source_servers.source_server} == {wg}
    w = body(tea.describe_workgroups(m.DescribeWorkgroupsRequest(workgroup_id=[wg]))).workgroups.workgroup[0]
    unrelated = [x for x in w.warnings.warning if x.warning_type == "UnRelated"]
    assert unrelated and set(unrelated[0].source_ids.source_id) == {s1, s2}

    body(tea.disassociate_source_servers(m.DisassociateSourceServersRequest(workgroup_id=wg, source_id=[s2])))
    members = body(tea.describe_source_servers(m.DescribeSourceServersRequest(workgroup_id=wg)))
    assert [s.source_id for s in members.source_servers.source_server] == [s1]
    body(tea.disassociate_source_servers(m.DisassociateSourceServersRequest(workgroup_id=wg, source_id=[s1])))
    body(tea.delete_workgroup(m.DeleteWorkgroupRequest(workgroup_id=wg)))
    body(tea.delete_workgroup(m.DeleteWorkgroupRequest(workgroup_id=wg2)))
    assert body(tea.describe_workgroups(m.DescribeWorkgroupsRequest())).total_count == 0

    e = tea_error(tea.delete_workgroup, m.DeleteWorkgroupRequest(workgroup_id=wg))
    assert (e.code, status_of(e)) == ("InvalidWorkgroupId.NotFound", 404)
    e = tea_error(tea.create_workgroup, m.CreateWorkgroupRequest(name="x"))  # 2-64 chars
    assert e.code == "InvalidParameter"
    e = tea_error(tea.describe_workgroups, m.DescribeWorkgroupsRequest(page_size=51))
    assert e.code == "InvalidParameter" and "PageSize" in e.message
