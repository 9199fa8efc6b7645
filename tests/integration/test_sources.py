"""Migration sources on both databases: DescribeSourceServers shapes and filters, Modify, Delete, liveness."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import insert, select, update

from opensmc.api.actions import ACTIONS
from opensmc.clock import new_id
from opensmc.domain.errors import SmcError
from opensmc.params import Params
from opensmc.service import agents
from opensmc.service.context import Caller, Services
from opensmc.service.sources import mark_lost_agents
from opensmc.store.tables import job_events, job_runs, jobs, sources, tags

T0 = datetime(2024, 5, 1, 8, 0, 0, tzinfo=UTC)
GIB = 1 << 30
MIB = 1 << 20


def make_report(hostname: str = "web-1", *, data_disks: int = 1) -> dict[str, Any]:
    """The discovery report layout (opensmc.agent.discovery.to_report)."""
    disks: list[dict[str, Any]] = [
        {
            "index": 0,
            "path": "/dev/vda",
            "size_bytes": 20 * GIB + 1,
            "parts": [
                {
                    "device": "0_0",
                    "path": "/boot",
                    "offset": MIB,
                    "size_bytes": 512 * MIB,
                    "fs_type": "ext4",
                    "can_block": True,
                    "need": True,
                    "type": "Boot",
                },
                {
                    "device": "0_1",
                    "path": "/",
                    "offset": 513 * MIB,
                    "size_bytes": 19 * GIB,
                    "fs_type": "ext4",
                    "can_block": True,
                    "need": True,
                    "type": "System",
                },
            ],
        }
    ]
    for i in range(1, data_disks + 1):
        disks.append(
            {
                "index": i,
                "path": f"/dev/vd{chr(97 + i)}",
                "size_bytes": 100 * GIB,
                "parts": [
                    {
                        "device": f"{i}_0",
                        "path": f"/data{i}",
                        "offset": 2 * MIB,
                        "size_bytes": 99 * GIB,
                        "fs_type": "xfs",
                        "can_block": False,
                        "need": False,
                        "type": "Normal",
                    }
                ],
            }
        )
    return {
        "machine_id": new_id("m"),
        "hostname": hostname,
        "platform": "Ubuntu",
        "architecture": "x86_64",
        "kernel_level": 515,
        "system_info": json.dumps(
            {"hostname": hostname, "cores": "4", "memory": "8.00", "agent_mode": "daemon"}
        ),
        "disks": disks,
    }


def add(services: Services, caller: Caller, hostname: str = "web-1", **kw: Any) -> str:
    r = make_report(hostname, **kw)
    return agents.register_source(services, caller.account_id, r, machine_id=r["machine_id"]).source_id


def add_job(
    services: Services, caller: Caller, source_id: str, status: str, business: str = "", job_type: int = 0
) -> str:
    jid = new_id("j-")
    with services.db.begin() as conn:
        conn.execute(
            insert(jobs).values(
                id=jid,
                account_id=caller.account_id,
                source_id=source_id,
                name=jid,
                region_id="local",
                status=status,
                business_status=business,
                job_type=job_type,
                valid_time=T0 + timedelta(days=30),
                created_at=T0,
            )
        )
        conn.execute(insert(job_runs).values(job_id=jid, type="Manual", start_time=T0))
        conn.execute(
            insert(tags).values(
                account_id=caller.account_id,
                resource_type="replicationjob",
                resource_id=jid,
                key="k",
                value="v",
                created_at=T0,
            )
        )
    return jid


def describe(call: Any, **filters: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = call("DescribeSourceServers", **filters)["SourceServers"]["SourceServer"]
    return out


def as_other(services: Services, other: Caller, action: str, **params: str) -> dict[str, Any]:
    return ACTIONS[action].handler(
        services, other, Params({k.replace("__", "."): v for k, v in params.items()})
    )


def set_state(services: Services, sid: str, state: str) -> None:
    with services.db.begin() as conn:
        conn.execute(update(sources).where(sources.c.id == sid).values(state=state))


@pytest.fixture(autouse=True)
def fixed_clock(services: Services) -> None:
    services.clock = lambda: T0


# -- DescribeSourceServers ---------------------------------------------------------------------------------


def test_describe_shape(call: Any, services: Services, caller: Caller) -> None:
    sid = add(services, caller, data_disks=2)
    call(
        "TagResources",
        ResourceType="sourceserver",
        ResourceId__1=sid,
        Tag__1__Key="env",
        Tag__1__Value="prod",
    )
    body = call("DescribeSourceServers")
    assert (body["TotalCount"], body["PageNumber"], body["PageSize"]) == (1, 1, 10)
    [s] = body["SourceServers"]["SourceServer"]
    assert set(s) == {
        "SourceId",
        "Name",
        "Description",
        "State",
        "ErrorCode",
        "StatusInfo",
        "JobId",
        "WorkgroupId",
        "ResourceGroupId",
        "AgentVersion",
        "Architecture",
        "Platform",
        "KernelLevel",
        "HeartbeatRate",
        "ReplicationDriver",
        "SystemInfo",
        "SystemDiskSize",
        "CreationTime",
        "SystemDiskParts",
        "DataDisks",
        "Disks",
        "Tags",
    }
    assert s["SourceId"] == sid and s["Name"] == "web-1" and s["State"] == "Available"
    assert (s["ErrorCode"], s["StatusInfo"], s["JobId"], s["WorkgroupId"]) == ("", "", "", "")
    assert (s["Architecture"], s["Platform"], s["KernelLevel"], s["ReplicationDriver"]) == (
        "x86_64",
        "Ubuntu",
        515,
        "SMT",
    )
    assert s["HeartbeatRate"] == 10 and s["CreationTime"] == "2024-05-01T08:00:00Z"
    assert isinstance(s["SystemInfo"], str) and json.loads(s["SystemInfo"])["cores"] == "4"
    assert s["SystemDiskSize"] == 21  # 20 GiB + 1 byte, rounded up
    assert s["SystemDiskParts"] == {
        "SystemDiskPart": [
            {"Device": "0_0", "Path": "/boot", "SizeBytes": 512 * MIB, "CanBlock": True, "Need": True},
            {"Device": "0_1", "Path": "/", "SizeBytes": 19 * GIB, "CanBlock": True, "Need": True},
        ]
    }
    data = s["DataDisks"]["DataDisk"]
    assert [d["Index"] for d in data] == [1, 2]
    assert data[0] == {
        "Index": 1,
        "Path": "/dev/vdb",
        "Size": 100,
        "Parts": {
            "Part": [
                {"Device": "1_0", "Path": "/data1", "SizeBytes": 99 * GIB, "CanBlock": False, "Need": False}
            ]
        },
    }
    assert s["Disks"]["System"] == {
        "Size": 21,
        "Offset": MIB,
        "Parts": {
            "Part": [
                {"Path": "/boot", "SizeBytes": 512 * MIB, "CanBlock": True, "Type": "Boot"},
                {"Path": "/", "SizeBytes": 19 * GIB, "CanBlock": True, "Type": "System"},
            ]
        },
    }
    assert s["Disks"]["Data"]["Data"][1] == {
        "Size": 100,
        "Offset": 2 * MIB,
        "Parts": {"Part": [{"Path": "/data2", "SizeBytes": 99 * GIB, "CanBlock": False, "Type": "Normal"}]},
    }
    assert s["Tags"] == {"Tag": [{"Key": "env", "Value": "prod"}]}


def test_describe_empty_and_no_disks(call: Any, services: Services, caller: Caller) -> None:
    assert call("DescribeSourceServers")["SourceServers"] == {"SourceServer": []}
    agents.register_source(services, caller.account_id, {"hostname": "bare", "disks": []}, machine_id="bare")
    [s] = describe(call)
    assert s["SystemDiskParts"] == {"SystemDiskPart": []} and s["DataDisks"] == {"DataDisk": []}
    assert s["Disks"] == {"Data": {"Data": []}} and s["Tags"] == {"Tag": []} and s["SystemDiskSize"] == 0


def test_describe_filters(call: Any, services: Services, caller: Caller) -> None:
    a = add(services, caller, "alpha")
    b = add(services, caller, "beta")
    c = add(services, caller, "gamma")
    set_state(services, c, "Unavailable")
    wg = call("CreateWorkgroup", Name="wave-1")["WorkgroupId"]
    call("AssociateSourceServers", WorkgroupId=wg, SourceId__1=b)
    job = add_job(services, caller, a, "Ready", job_type=2)
    call(
        "TagResources",
        ResourceType="sourceserver",
        ResourceId__1=a,
        ResourceId__2=b,
        Tag__1__Key="team",
        Tag__1__Value="x",
    )
    call("TagResources", ResourceType="sourceserver", ResourceId__1=b, Tag__1__Key="tier", Tag__1__Value="db")

    def ids(**f: Any) -> set[str]:
        return {s["SourceId"] for s in describe(call, **f)}

    assert ids() == {a, b, c}
    assert ids(SourceId__1=a, SourceId__2=c) == {a, c}
    assert ids(Name="beta") == {b}
    assert ids(State="Unavailable") == {c}
    assert ids(WorkgroupId=wg) == {b}
    assert ids(JobId=job) == {a}
    assert describe(call, JobId=job)[0]["JobId"] == job
    assert ids(RelatedJobType__1="2") == {a}
    assert ids(RelatedJobType__1="0") == set()
    assert ids(Tag__1__Key="team") == {a, b}
    assert ids(Tag__1__Key="team", Tag__2__Key="tier", Tag__2__Value="db") == {b}
    assert ids(Tag__1__Key="team", Tag__1__Value="y") == set()
    assert ids(Name="beta", State="Unavailable") == set()
    assert ids(ResourceGroupId="rg-1") == set()
    for bad in ({"State": "Gone"}, {"RelatedJobType__1": "7"}, {"PageSize": "51"}, {"PageNumber": "0"}):
        with pytest.raises(SmcError) as err:
            call("DescribeSourceServers", **bad)
        assert err.value.code == "InvalidParameter"


def test_describe_pagination(call: Any, services: Services, caller: Caller) -> None:
    made = [add(services, caller, f"h{i}") for i in range(5)]
    pages = [call("DescribeSourceServers", PageSize="2", PageNumber=str(n)) for n in (1, 2, 3, 4)]
    assert [p["TotalCount"] for p in pages] == [5] * 4
    seen = [s["SourceId"] for p in pages for s in p["SourceServers"]["SourceServer"]]
    assert sorted(seen) == sorted(made) and len(pages[2]["SourceServers"]["SourceServer"]) == 1
    assert pages[3]["SourceServers"] == {"SourceServer": []}
    assert (pages[1]["PageNumber"], pages[1]["PageSize"]) == (2, 2)


def test_names_default_to_hostname_made_valid_and_unique(
    call: Any, services: Services, caller: Caller
) -> None:
    add(services, caller, "web-1.example.com")
    add(services, caller, "web-1.example.com")
    add(services, caller, "10.0.0.5")
    add(services, caller, "")
    names = {s["Name"] for s in describe(call)}
    assert names == {"web-1-example-com", "web-1-example-com-2", "host-10-0-0-5", "source"}


# -- ModifySourceServerAttribute ---------------------------------------------------------------------------


def test_modify(call: Any, services: Services, caller: Caller, other_caller: Caller) -> None:
    a = add(services, caller, "alpha")
    add(services, caller, "beta")
    assert call("ModifySourceServerAttribute", SourceId=a, Name="db-primary", Description="the main DB") == {}
    [s] = describe(call, SourceId__1=a)
    assert (s["Name"], s["Description"]) == ("db-primary", "the main DB")
    call("ModifySourceServerAttribute", SourceId=a, Name="db-primary")  # its own name again is fine
    with pytest.raises(SmcError) as err:
        call("ModifySourceServerAttribute", SourceId=a, Name="beta")
    assert err.value.code == "SourceServerName.Duplicate"
    for bad in (
        {"Name": "9lives"},
        {"Name": "a.b"},
        {"Description": "x" * 257},
        {"Description": "https://x"},
    ):
        with pytest.raises(SmcError) as err:
            call("ModifySourceServerAttribute", SourceId=a, **bad)
        assert err.value.code == "InvalidParameter"
    with pytest.raises(SmcError) as err:
        call("ModifySourceServerAttribute", SourceId="s-nope", Name="x1")
    assert (err.value.code, err.value.http_status) == ("InvalidSourceId.NotFound", 404)
    with pytest.raises(SmcError) as err:
        as_other(services, other_caller, "ModifySourceServerAttribute", SourceId=a, Name="stolen")
    assert err.value.code == "InvalidSourceId.NotFound"
    # Another account may use the same name.
    other = agents.register_source(
        services, other_caller.account_id, make_report("x"), machine_id="o1"
    ).source_id
    as_other(services, other_caller, "ModifySourceServerAttribute", SourceId=other, Name="db-primary")
    set_state(services, a, "Deleting")
    with pytest.raises(SmcError) as err:
        call("ModifySourceServerAttribute", SourceId=a, Description="late")
    assert err.value.code == "SourceServerState.Invalid" and "Deleting" in err.value.message
    set_state(services, a, "InUse")
    call("ModifySourceServerAttribute", SourceId=a, Description="fine while InUse")


# -- DeleteSourceServer ------------------------------------------------------------------------------------


def test_delete_without_jobs(call: Any, services: Services, caller: Caller) -> None:
    sid = add(services, caller)
    call("TagResources", ResourceType="sourceserver", ResourceId__1=sid, Tag__1__Key="a", Tag__1__Value="b")
    assert call("DeleteSourceServer", SourceId=sid) == {}
    assert describe(call) == []
    with services.db.connect() as conn:
        assert conn.execute(select(tags.c.key).where(tags.c.resource_id == sid)).first() is None
    with pytest.raises(SmcError) as err:
        call("DeleteSourceServer", SourceId=sid)
    assert err.value.code == "InvalidSourceId.NotFound"


def test_delete_with_jobs_needs_force(call: Any, services: Services, caller: Caller) -> None:
    sid = add(services, caller)
    j1 = add_job(services, caller, sid, "Finished")
    j2 = add_job(services, caller, sid, "Waiting")
    with pytest.raises(SmcError) as err:
        call("DeleteSourceServer", SourceId=sid)
    assert err.value.code == "ReplicationJob.Related" and j1 in err.value.message and j2 in err.value.message
    assert describe(call)[0]["State"] == "Available"  # the refusal changed nothing
    assert call("DeleteSourceServer", SourceId=sid, Force=True) == {}
    assert describe(call) == []
    with services.db.connect() as conn:
        assert conn.execute(select(jobs.c.id).where(jobs.c.id.in_([j1, j2]))).first() is None
        assert conn.execute(select(job_runs.c.id).where(job_runs.c.job_id.in_([j1, j2]))).first() is None
        assert conn.execute(select(tags.c.key).where(tags.c.resource_id.in_([j1, j2]))).first() is None
        events = conn.execute(
            select(job_events.c.job_id, job_events.c.from_status, job_events.c.to_status).where(
                job_events.c.event == "delete"
            )
        ).all()
    assert sorted(events) == sorted([(j1, "Finished", "Deleting"), (j2, "Waiting", "Deleting")])


def test_running_job_blocks_even_with_force(call: Any, services: Services, caller: Caller) -> None:
    sid = add(services, caller)
    job = add_job(services, caller, sid, "Running", "Syncing")
    for force in (False, True):
        with pytest.raises(SmcError) as err:
            call("DeleteSourceServer", SourceId=sid, Force=force)
        assert err.value.code == "SourceServer.WithRunningReplicationJob" and job in err.value.message
    assert describe(call)[0]["State"] == "Available"


def test_delete_refused_while_deleting_and_across_accounts(
    call: Any, services: Services, caller: Caller, other_caller: Caller
) -> None:
    sid = add(services, caller)
    with pytest.raises(SmcError) as err:
        as_other(services, other_caller, "DeleteSourceServer", SourceId=sid, Force="true")
    assert err.value.code == "InvalidSourceId.NotFound"
    assert as_other(services, other_caller, "DescribeSourceServers")["TotalCount"] == 0
    set_state(services, sid, "Deleting")
    with pytest.raises(SmcError) as err:
        call("DeleteSourceServer", SourceId=sid)
    assert err.value.code == "SourceServerState.Invalid"
    with pytest.raises(SmcError) as err:
        call("DeleteSourceServer")
    assert err.value.code == "MissingParameter"


# -- liveness ----------------------------------------------------------------------------------------------


def test_mark_lost_agents(call: Any, services: Services, caller: Caller) -> None:
    quiet = add(services, caller, "quiet")
    busy = add(services, caller, "busy")
    set_state(services, busy, "InUse")
    assert mark_lost_agents(services, T0 + timedelta(seconds=90)) == 0  # exactly the grace: still fine
    later = T0 + timedelta(seconds=91)
    assert mark_lost_agents(services, later) == 2  # an InUse source's agent must heartbeat too
    assert mark_lost_agents(services, later) == 0  # already Unavailable
    by_id = {s["SourceId"]: s for s in describe(call)}
    lost = by_id[quiet]
    assert (lost["State"], lost["ErrorCode"]) == ("Unavailable", "SourceServer.Offline")
    assert json.loads(lost["StatusInfo"]) == {
        "error_code": "SourceServer.Offline",
        "error_msg": "No heartbeat from the SMC agent since 2024-05-01T08:00:00Z; "
        "start the agent on the source server.",
    }
    assert by_id[busy]["State"] == "Unavailable"  # the orchestrator then fails its running job


def test_the_unfiltered_page_on_the_driver_path_is_the_general_path(services: Services, caller: Caller) -> None:
    """The precompiled DescribeSourceServers page (store.sources.describe_account) gives what the
    SQLAlchemy path gives: rows with converted values, total, tags, the latest job of sources without one."""
    from opensmc.store import sources as q
    from opensmc.store import tags as tag_store

    made = [add(services, caller, f"h{i}") for i in range(4)]
    add_job(services, caller, made[1], "Ready")
    with services.db.begin() as conn:
        conn.execute(update(sources).where(sources.c.id == made[2]).values(last_heartbeat_at=T0))
        conn.execute(
            insert(tags).values(
                account_id=caller.account_id, resource_type=q.SOURCE_TAG, resource_id=made[3], key="env",
                value="prod", created_at=T0,
            )
        )  # fmt: skip
    for offset, limit in ((0, 10), (1, 2), (3, 5), (10, 5)):
        total, rows, tag_map, latest = q.describe_account(services.db, caller.account_id, offset=offset, limit=limit)
        with services.db.connect() as conn:
            want_total, want_rows = q.describe(
                conn, caller.account_id, ids=[], name=None, state=None, job_id=None, workgroup_id=None,
                related_job_types=(), resource_group_id=None, tag_filters=(), offset=offset, limit=limit,
            )  # fmt: skip
            want_tags = tag_store.tags_of(conn, q.SOURCE_TAG, [r.id for r in want_rows])
            want_latest = q.latest_jobs(conn, [r.id for r in want_rows if not r.job_id])
        assert total == want_total
        assert [tuple(r) for r in rows] == [tuple(r) for r in want_rows]
        assert [r._fields for r in rows[:1]] == [tuple(want_rows[0]._fields)] if want_rows else rows == []
        assert (tag_map, latest) == (want_tags if want_rows else {}, want_latest)
    _, rows, tag_map, latest = q.describe_account(services.db, caller.account_id, offset=0, limit=10)
    by_id = {r.id: r for r in rows}
    assert isinstance(by_id[made[2]].last_heartbeat_at, datetime) and isinstance(by_id[made[0]].created_at, datetime)
    assert tag_map[made[3]] == [("env", "prod")] and made[1] in latest
