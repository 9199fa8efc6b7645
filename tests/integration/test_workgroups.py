"""Workgroup actions on both databases: create, describe (derived status), modify, delete, membership."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import insert, select

from opensmc.clock import new_id
from opensmc.domain.errors import SmcError
from opensmc.service.context import Caller, Services
from opensmc.store.tables import sources, tags

T0 = datetime(2024, 1, 1, tzinfo=UTC)
_seq = iter(range(1, 1_000_000))


def add_source(
    services: Services, caller: Caller, *, state: str = "Available", workgroup_id: str = ""
) -> str:
    sid = new_id("s-")
    with services.db.begin() as conn:
        conn.execute(
            insert(sources).values(
                id=sid,
                account_id=caller.account_id,
                name=f"src{next(_seq)}",
                state=state,
                workgroup_id=workgroup_id,
                machine_id=sid,
                instance_id=f"machine:{sid}",  # identity is (account, instance): one per source
                agent_secret_hash="x",
                created_at=T0,
            )
        )
    return sid


def add_job(
    services: Services,
    caller: Caller,
    source_id: str,
    status: str,
    *,
    final_run: bool = False,
    has_run: bool = False,
    age: int = 0,
) -> str:
    from opensmc.store.tables import jobs

    jid = new_id("j-")
    with services.db.begin() as conn:
        conn.execute(
            insert(jobs).values(
                id=jid,
                account_id=caller.account_id,
                source_id=source_id,
                name=f"job{next(_seq)}",
                region_id="local",
                status=status,
                final_run=final_run,
                has_run=has_run,
                valid_time=T0 + timedelta(days=30),
                created_at=T0 + timedelta(minutes=age),
            )
        )
    return jid


def workgroup_of(services: Services, source_id: str) -> str:
    with services.db.connect() as conn:
        return str(conn.execute(select(sources.c.workgroup_id).where(sources.c.id == source_id)).scalar_one())


def error(fn: Any, *args: Any, **kw: Any) -> SmcError:
    with pytest.raises(SmcError) as info:
        fn(*args, **kw)
    return info.value


def one(call: Any, wg_id: str) -> dict[str, Any]:
    body = call("DescribeWorkgroups", WorkgroupId__1=wg_id)
    assert body["TotalCount"] == 1
    item: dict[str, Any] = body["Workgroups"]["Workgroup"][0]
    return item


# CreateWorkgroup ------------------------------------------------------------------


def test_create_and_describe_shape(call: Any) -> None:
    body = call(
        "CreateWorkgroup", Name="wave.1", Description="first wave", Tag__1__Key="env", Tag__1__Value="prod"
    )
    wg = body["WorkgroupId"]
    assert wg.startswith("w-") and len(wg) == 22
    assert call("DescribeWorkgroups") == {
        "TotalCount": 1,
        "PageNumber": 1,
        "PageSize": 10,
        "Workgroups": {
            "Workgroup": [
                {
                    "WorkgroupId": wg,
                    "Name": "wave.1",
                    "Description": "first wave",
                    "Status": "NotStarted",
                    "Tags": {"Tag": [{"Key": "env", "Value": "prod"}]},
                    "Warnings": {"Warning": []},
                }
            ]
        },
    }


def test_create_validation(call: Any) -> None:
    assert error(call, "CreateWorkgroup").code == "MissingParameter"
    for bad in ("a", "x" * 65, "1abc", "http://x", "a b"):
        assert error(call, "CreateWorkgroup", Name=bad).code == "InvalidParameter"
    assert error(call, "CreateWorkgroup", Name="ok", Description="x").code == "InvalidParameter"
    assert error(call, "CreateWorkgroup", Name="ok", Description="y" * 257).code == "InvalidParameter"
    e = error(call, "CreateWorkgroup", Name="ok", Tag__1__Key="k", Tag__1__Value="")
    assert e.code == "InvalidParameter.TagValue"
    e = error(call, "CreateWorkgroup", Name="ok", Tag__1__Key="k")
    assert e.code == "InvalidParameter.TagValue"
    tags21 = {f"Tag__{i}__Key": f"k{i}" for i in range(1, 22)} | {
        f"Tag__{i}__Value": "v" for i in range(1, 22)
    }
    assert error(call, "CreateWorkgroup", Name="ok", **tags21).code == "NumberExceed.Tags"
    assert call("DescribeWorkgroups")["TotalCount"] == 0


def test_create_duplicate_name(call: Any) -> None:
    call("CreateWorkgroup", Name="dup")
    e = error(call, "CreateWorkgroup", Name="dup")
    assert (e.code, e.http_status) == ("WorkgroupName.Duplicate", 400)
    assert "dup" in e.message and "exists" in e.message


def test_create_client_token(call: Any) -> None:
    a = call("CreateWorkgroup", Name="tok", ClientToken="t-1")["WorkgroupId"]
    b = call("CreateWorkgroup", Name="tok", ClientToken="t-1")["WorkgroupId"]
    assert a == b
    e = error(call, "CreateWorkgroup", Name="other", ClientToken="t-1")
    assert e.code == "IdempotentParameterMismatch"
    assert call("DescribeWorkgroups")["TotalCount"] == 1


def test_create_quota(call: Any) -> None:
    for i in range(50):
        call("CreateWorkgroup", Name=f"wg{i}")
    e = error(call, "CreateWorkgroup", Name="wg50")
    assert (e.code, e.http_status) == ("QuotaExceeded.Workgroup", 400)


# DescribeWorkgroups -------------------------------------------------------------------


def test_describe_filters_and_paging(call: Any) -> None:
    ids = [call("CreateWorkgroup", Name=f"g{i}")["WorkgroupId"] for i in range(5)]
    call("CreateWorkgroup", Name="tagged", Tag__1__Key="team", Tag__1__Value="a")
    call("CreateWorkgroup", Name="tagged2", Tag__1__Key="team", Tag__1__Value="b")
    assert call("DescribeWorkgroups")["TotalCount"] == 7
    body = call("DescribeWorkgroups", PageSize=3, PageNumber=3)
    assert (body["TotalCount"], body["PageNumber"], body["PageSize"]) == (7, 3, 3)
    assert len(body["Workgroups"]["Workgroup"]) == 1
    pages = [
        call("DescribeWorkgroups", PageSize=3, PageNumber=n)["Workgroups"]["Workgroup"] for n in (1, 2, 3)
    ]
    assert len({w["WorkgroupId"] for pg in pages for w in pg}) == 7
    assert call("DescribeWorkgroups", PageNumber=9)["Workgroups"] == {"Workgroup": []}
    body = call("DescribeWorkgroups", WorkgroupId__1=ids[0], WorkgroupId__2=ids[1])
    assert {w["WorkgroupId"] for w in body["Workgroups"]["Workgroup"]} == set(ids[:2])
    assert call("DescribeWorkgroups", Name="g3")["Workgroups"]["Workgroup"][0]["WorkgroupId"] == ids[3]
    assert call("DescribeWorkgroups", Tag__1__Key="team")["TotalCount"] == 2
    body = call("DescribeWorkgroups", Tag__1__Key="team", Tag__1__Value="b")
    assert [w["Name"] for w in body["Workgroups"]["Workgroup"]] == ["tagged2"]
    assert call("DescribeWorkgroups", Name="g1", Tag__1__Key="team")["TotalCount"] == 0
    assert call("DescribeWorkgroups", Status="NotStarted")["TotalCount"] == 7
    assert call("DescribeWorkgroups", Status="Completed")["TotalCount"] == 0


def test_describe_validation(call: Any) -> None:
    assert error(call, "DescribeWorkgroups", Status="Bogus").code == "InvalidParameter"
    assert error(call, "DescribeWorkgroups", PageSize=51).code == "InvalidParameter"
    assert error(call, "DescribeWorkgroups", PageNumber=0).code == "InvalidParameter"
    many = {f"WorkgroupId__{i}": f"w-{i}" for i in range(1, 52)}
    assert error(call, "DescribeWorkgroups", **many).code == "InvalidParameter"


def _status(call: Any, services: Services, caller: Caller, jobs_spec: list[list[Any]]) -> dict[str, Any]:
    """A workgroup whose members have the given jobs ([] = no job), described."""
    wg = call("CreateWorkgroup", Name=f"w{next(_seq)}")["WorkgroupId"]
    for spec in jobs_spec:
        sid = add_source(services, caller, workgroup_id=wg)
        for age, job in enumerate(spec):
            status, *flags = job if isinstance(job, tuple) else (job,)
            add_job(
                services, caller, sid, status, final_run="final" in flags, has_run="ran" in flags, age=age
            )
    return one(call, wg)


@pytest.mark.parametrize(
    ("jobs_spec", "expected"),
    [
        ([], "NotStarted"),
        ([[]], "NotStarted"),
        ([["Ready"], ["Ready"]], "NotStarted"),
        ([["Ready"], ["Running"]], "InProgress"),
        ([["Finished"], ["Waiting"]], "InProgress"),
        ([["Stopped"]], "InProgress"),
        ([["Finished"], [("Running", "final")]], "Cutover"),
        ([[("Running", "final")], ["Running"]], "Cutover"),
        ([["Finished"], ["Finished"]], "Completed"),
        ([["Finished"], ["Ready"]], "InProgress"),
        ([["InError"]], "InProgress"),
        # only the latest job of a source counts
        ([["Finished", "Running"]], "InProgress"),
        ([["Running", "Finished"]], "Completed"),
        # a job being deleted is not the source's job any more
        ([["Finished", "Deleting"]], "Completed"),
    ],
)
def test_derived_status(
    call: Any, services: Services, caller: Caller, jobs_spec: list[list[Any]], expected: str
) -> None:
    assert _status(call, services, caller, jobs_spec)["Status"] == expected


def test_warnings(call: Any, services: Services, caller: Caller) -> None:
    wg = call("CreateWorkgroup", Name="warn")["WorkgroupId"]
    ok = add_source(services, caller, workgroup_id=wg)
    add_job(services, caller, ok, "Finished")
    failed = sorted(add_source(services, caller, workgroup_id=wg) for _ in range(2))
    for sid in failed:
        add_job(services, caller, sid, "InError", has_run=True)
    lonely = add_source(services, caller, workgroup_id=wg)
    item = one(call, wg)
    assert item["Warnings"] == {
        "Warning": [
            {"WarningType": "InError", "SourceIds": {"SourceId": failed}},
            {"WarningType": "UnRelated", "SourceIds": {"SourceId": [lonely]}},
        ]
    }
    assert item["Status"] == "InProgress"
    assert call("DescribeWorkgroups", Status="InProgress")["TotalCount"] == 1


def test_status_filter_with_paging(call: Any, services: Services, caller: Caller) -> None:
    for i in range(4):
        wg = call("CreateWorkgroup", Name=f"done{i}")["WorkgroupId"]
        add_job(services, caller, add_source(services, caller, workgroup_id=wg), "Finished")
    call("CreateWorkgroup", Name="idle")
    body = call("DescribeWorkgroups", Status="Completed", PageSize=3, PageNumber=2)
    assert body["TotalCount"] == 4 and len(body["Workgroups"]["Workgroup"]) == 1


# ModifyWorkgroupAttribute ------------------------------------------------------------------


def test_modify(call: Any) -> None:
    wg = call("CreateWorkgroup", Name="before", Description="old text")["WorkgroupId"]
    call("CreateWorkgroup", Name="taken")
    assert call("ModifyWorkgroupAttribute", WorkgroupId=wg, Name="after.v2") == {}
    assert one(call, wg)["Name"] == "after.v2" and one(call, wg)["Description"] == "old text"
    call("ModifyWorkgroupAttribute", WorkgroupId=wg, Description="new text")
    assert (one(call, wg)["Name"], one(call, wg)["Description"]) == ("after.v2", "new text")
    call("ModifyWorkgroupAttribute", WorkgroupId=wg, Name="after.v2")  # its own name is fine
    assert (
        error(call, "ModifyWorkgroupAttribute", WorkgroupId=wg, Name="taken").code
        == "WorkgroupName.Duplicate"
    )
    assert error(call, "ModifyWorkgroupAttribute", WorkgroupId=wg, Name="x").code == "InvalidParameter"
    assert error(call, "ModifyWorkgroupAttribute", WorkgroupId=wg, Description="x").code == "InvalidParameter"
    assert error(call, "ModifyWorkgroupAttribute", Name="zz").code == "MissingParameter"
    e = error(call, "ModifyWorkgroupAttribute", WorkgroupId="w-nope", Name="zz")
    assert (e.code, e.http_status) == ("InvalidWorkgroupId.NotFound", 404)


# Associate / Disassociate / Delete ------------------------------------------------------


def test_associate_and_disassociate(call: Any, services: Services, caller: Caller) -> None:
    wg = call("CreateWorkgroup", Name="members")["WorkgroupId"]
    a, b = add_source(services, caller), add_source(services, caller)
    assert call("AssociateSourceServers", WorkgroupId=wg, SourceId__1=a, SourceId__2=b) == {}
    assert workgroup_of(services, a) == wg and workgroup_of(services, b) == wg
    call("AssociateSourceServers", WorkgroupId=wg, SourceId__1=a)  # already a member: fine
    assert one(call, wg)["Warnings"]["Warning"][0]["SourceIds"]["SourceId"] == sorted([a, b])
    assert call("DisassociateSourceServers", WorkgroupId=wg, SourceId__1=a) == {}
    assert workgroup_of(services, a) == "" and workgroup_of(services, b) == wg
    e = error(call, "DisassociateSourceServers", WorkgroupId=wg, SourceId__1=a)
    assert (e.code, e.http_status) == ("SourceServer.NotInWorkgroup", 400)


def test_associate_errors(call: Any, services: Services, caller: Caller) -> None:
    wg = call("CreateWorkgroup", Name="one")["WorkgroupId"]
    other = call("CreateWorkgroup", Name="two")["WorkgroupId"]
    s = add_source(services, caller, workgroup_id=other)
    e = error(call, "AssociateSourceServers", WorkgroupId=wg, SourceId__1=s)
    assert (e.code, e.http_status) == ("SourceServer.InOtherWorkgroup", 400)
    assert s in e.message and other in e.message
    e = error(call, "AssociateSourceServers", WorkgroupId=wg, SourceId__1="s-missing")
    assert (e.code, e.http_status) == ("InvalidSourceId.NotFound", 404)
    e = error(call, "AssociateSourceServers", WorkgroupId="w-missing", SourceId__1=s)
    assert (e.code, e.http_status) == ("InvalidWorkgroupId.NotFound", 404)
    assert error(call, "AssociateSourceServers", WorkgroupId=wg).code == "MissingParameter"
    assert error(call, "AssociateSourceServers", SourceId__1=s).code == "MissingParameter"
    many = {f"SourceId__{i}": f"s-{i}" for i in range(1, 52)}
    assert error(call, "AssociateSourceServers", WorkgroupId=wg, **many).code == "InvalidParameter"
    gone = add_source(services, caller, state="Deleting")
    assert (
        error(call, "AssociateSourceServers", WorkgroupId=wg, SourceId__1=gone).code
        == "SourceServerState.Invalid"
    )
    # an error leaves nothing half done
    fine = add_source(services, caller)
    error(call, "AssociateSourceServers", WorkgroupId=wg, SourceId__1=fine, SourceId__2="s-missing")
    assert workgroup_of(services, fine) == ""
    e = error(call, "DisassociateSourceServers", WorkgroupId=wg, SourceId__1="s-missing")
    assert e.code == "InvalidSourceId.NotFound"
    e = error(call, "DisassociateSourceServers", WorkgroupId="w-missing", SourceId__1=s)
    assert e.code == "InvalidWorkgroupId.NotFound"


def test_associate_quota(call: Any, services: Services, caller: Caller) -> None:
    wg = call("CreateWorkgroup", Name="full")["WorkgroupId"]
    first = [add_source(services, caller) for _ in range(48)]
    call("AssociateSourceServers", WorkgroupId=wg, **{f"SourceId__{i + 1}": s for i, s in enumerate(first)})
    extra = [add_source(services, caller) for _ in range(3)]
    e = error(
        call,
        "AssociateSourceServers",
        WorkgroupId=wg,
        **{f"SourceId__{i + 1}": s for i, s in enumerate(extra)},
    )
    assert (e.code, e.http_status) == ("QuotaExceeded.SourceServer", 400)
    assert all(workgroup_of(services, s) == "" for s in extra)
    call("AssociateSourceServers", WorkgroupId=wg, SourceId__1=extra[0], SourceId__2=extra[1])
    e = error(call, "AssociateSourceServers", WorkgroupId=wg, SourceId__1=extra[2])
    assert e.code == "QuotaExceeded.SourceServer"


def test_delete(call: Any, services: Services, caller: Caller) -> None:
    wg = call("CreateWorkgroup", Name="del", Tag__1__Key="k", Tag__1__Value="v")["WorkgroupId"]
    s = add_source(services, caller)
    call("AssociateSourceServers", WorkgroupId=wg, SourceId__1=s)
    e = error(call, "DeleteWorkgroup", WorkgroupId=wg)
    assert (e.code, e.http_status) == ("Workgroup.NotEmpty", 400)
    assert "isassociate" in e.message and s in e.message
    call("DisassociateSourceServers", WorkgroupId=wg, SourceId__1=s)
    assert call("DeleteWorkgroup", WorkgroupId=wg) == {}
    assert call("DescribeWorkgroups")["TotalCount"] == 0
    with services.db.connect() as conn:
        assert conn.execute(select(tags.c.key).where(tags.c.resource_id == wg)).all() == []
    e = error(call, "DeleteWorkgroup", WorkgroupId=wg)
    assert (e.code, e.http_status) == ("InvalidWorkgroupId.NotFound", 404)
    assert error(call, "DeleteWorkgroup").code == "MissingParameter"
    # the name is free again
    call("CreateWorkgroup", Name="del")


def test_deleting_source_does_not_block_delete(call: Any, services: Services, caller: Caller) -> None:
    wg = call("CreateWorkgroup", Name="leaving")["WorkgroupId"]
    s = add_source(services, caller, state="Deleting", workgroup_id=wg)
    assert one(call, wg)["Warnings"] == {"Warning": []}
    call("DeleteWorkgroup", WorkgroupId=wg)
    assert workgroup_of(services, s) == ""


# account isolation ---------------------------------------------------------------------------


def test_accounts_are_isolated(call: Any, services: Services, caller: Caller, other_caller: Caller) -> None:
    from tests.conftest import ActionCaller

    other = ActionCaller(services, other_caller)
    wg = call("CreateWorkgroup", Name="mine", ClientToken="same")["WorkgroupId"]
    s = add_source(services, caller)
    assert other("DescribeWorkgroups")["TotalCount"] == 0
    assert other("DescribeWorkgroups", WorkgroupId__1=wg)["TotalCount"] == 0
    # names and tokens are per account
    theirs = other("CreateWorkgroup", Name="mine", ClientToken="same")["WorkgroupId"]
    assert theirs != wg
    for action, params in [
        ("ModifyWorkgroupAttribute", {"WorkgroupId": wg, "Name": "stolen"}),
        ("DeleteWorkgroup", {"WorkgroupId": wg}),
        ("AssociateSourceServers", {"WorkgroupId": wg, "SourceId__1": s}),
        ("DisassociateSourceServers", {"WorkgroupId": wg, "SourceId__1": s}),
    ]:
        assert error(other, action, **params).code == "InvalidWorkgroupId.NotFound"
    e = error(other, "AssociateSourceServers", WorkgroupId=theirs, SourceId__1=s)
    assert e.code == "InvalidSourceId.NotFound"
    assert one(call, wg)["Name"] == "mine"


def test_concurrent_creates(call: Any) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def create(_i: int) -> str:
        return str(call("CreateWorkgroup", Name="racy", ClientToken="race")["WorkgroupId"])

    with ThreadPoolExecutor(8) as pool:
        ids = set(pool.map(create, range(8)))
    assert len(ids) == 1
    assert call("DescribeWorkgroups")["TotalCount"] == 1
