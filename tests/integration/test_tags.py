"""TagResources, UntagResources and ListTagResources on both databases."""

from __future__ import annotations

from typing import Any

import pytest

from opensmc.domain.errors import SmcError
from opensmc.service.context import Caller, Services
from tests.conftest import ActionCaller
from tests.integration.test_workgroups import add_job, add_source

SRC = "ALIYUN::SMC::SOURCESERVER"
JOB = "ALIYUN::SMC::REPLICATIONJOB"


def error(fn: Any, *args: Any, **kw: Any) -> SmcError:
    with pytest.raises(SmcError) as info:
        fn(*args, **kw)
    return info.value


def tag_params(pairs: dict[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for i, (k, v) in enumerate(pairs.items(), start=1):
        out[f"Tag__{i}__Key"] = k
        out[f"Tag__{i}__Value"] = v
    return out


def listed(call: Any, **params: Any) -> list[tuple[str, str, str, str]]:
    body = call("ListTagResources", **params)
    assert body["NextToken"] == ""
    return [
        (t["ResourceId"], t["ResourceType"], t["TagKey"], t["TagValue"])
        for t in body["TagResources"]["TagResource"]
    ]


def test_tag_list_untag_sources(call: Any, services: Services, caller: Caller) -> None:
    a, b = sorted(add_source(services, caller) for _ in range(2))
    assert (
        call(
            "TagResources",
            ResourceType="sourceserver",
            ResourceId__1=a,
            ResourceId__2=b,
            **tag_params({"env": "prod", "team": ""}),
        )
        == {}
    )
    assert listed(call, ResourceType="sourceserver") == [
        (a, SRC, "env", "prod"),
        (a, SRC, "team", ""),
        (b, SRC, "env", "prod"),
        (b, SRC, "team", ""),
    ]
    # overwrite an existing key
    call("TagResources", ResourceType="sourceserver", ResourceId__1=a, Tag__1__Key="env", Tag__1__Value="dev")
    assert listed(call, ResourceType="sourceserver", ResourceId__1=a) == [
        (a, SRC, "env", "dev"),
        (a, SRC, "team", ""),
    ]
    # a missing Value is an empty value
    call("TagResources", ResourceType="sourceserver", ResourceId__1=b, Tag__1__Key="novalue")
    assert (b, SRC, "novalue", "") in listed(call, ResourceType="sourceserver")
    assert (
        call(
            "UntagResources",
            ResourceType="sourceserver",
            ResourceId__1=a,
            TagKey__1="env",
            TagKey__2="absent",
        )
        == {}
    )
    assert listed(call, ResourceType="sourceserver", ResourceId__1=a) == [(a, SRC, "team", "")]
    call("UntagResources", ResourceType="sourceserver", ResourceId__1=a, ResourceId__2=b, All=True)
    assert listed(call, ResourceType="sourceserver") == []
    call("UntagResources", ResourceType="sourceserver", ResourceId__1=a, All=True)  # nothing left: no-op


def test_jobs_and_type_separation(call: Any, services: Services, caller: Caller) -> None:
    s = add_source(services, caller)
    j = add_job(services, caller, s, "Ready")
    call("TagResources", ResourceType="replicationjob", ResourceId__1=j, Tag__1__Key="k", Tag__1__Value="v")
    assert listed(call, ResourceType="replicationjob") == [(j, JOB, "k", "v")]
    assert listed(call, ResourceType="sourceserver") == []
    # a source ID is not a job
    e = error(call, "TagResources", ResourceType="replicationjob", ResourceId__1=s, Tag__1__Key="k")
    assert (e.code, e.http_status) == ("InvalidResourceId.NotFound", 400)
    # a job being deleted is gone
    d = add_job(services, caller, s, "Deleting", age=1)
    e = error(call, "TagResources", ResourceType="replicationjob", ResourceId__1=d, Tag__1__Key="k")
    assert e.code == "InvalidResourceId.NotFound" and d in e.message


def test_list_filters(call: Any, services: Services, caller: Caller) -> None:
    a, b, c = sorted(add_source(services, caller) for _ in range(3))
    call(
        "TagResources",
        ResourceType="sourceserver",
        ResourceId__1=a,
        **tag_params({"env": "prod", "team": "x"}),
    )
    call(
        "TagResources",
        ResourceType="sourceserver",
        ResourceId__1=b,
        **tag_params({"env": "dev", "team": "x"}),
    )
    call("TagResources", ResourceType="sourceserver", ResourceId__1=c, **tag_params({"Env": "prod"}))

    def ids(**params: Any) -> list[str]:
        return sorted({r[0] for r in listed(call, ResourceType="sourceserver", **params)})

    assert ids(Tag__1__Key="env", Tag__1__Value="prod") == [a]
    assert ids(Tag__1__Key="env") == [a, b]  # key only: any value
    assert ids(Tag__1__Key="Env") == [c]  # case-sensitive
    assert ids(Tag__1__Key="env", Tag__1__Value="PROD") == []
    assert ids(Tag__1__Key="env", Tag__2__Key="team", Tag__2__Value="x") == [a, b]
    assert ids(Tag__1__Key="env", Tag__1__Value="dev", Tag__2__Key="team") == [b]
    assert ids(Tag__1__Key="env", Tag__2__Key="nope") == []
    assert ids(ResourceId__1=b, Tag__1__Key="team") == [b]
    # all tags of a matching resource are listed
    assert len(listed(call, ResourceType="sourceserver", Tag__1__Key="env", Tag__1__Value="prod")) == 2


def test_list_pagination(call: Any, services: Services, caller: Caller) -> None:
    sources = [add_source(services, caller) for _ in range(6)]
    keys = {f"k{i:02d}": f"v{i}" for i in range(20)}
    for s in sources:
        call("TagResources", ResourceType="sourceserver", ResourceId__1=s, **tag_params(keys))
    seen: list[tuple[str, str]] = []
    token = ""
    pages = 0
    while True:
        params: dict[str, Any] = {"ResourceType": "sourceserver"}
        if token:
            params["NextToken"] = token
        body = call("ListTagResources", **params)
        page = body["TagResources"]["TagResource"]
        assert len(page) <= 50
        seen += [(t["ResourceId"], t["TagKey"]) for t in page]
        token = body["NextToken"]
        pages += 1
        if not token:
            break
        assert isinstance(token, str) and token.isascii()
    assert pages == 3  # 120 pairs, 50 a page
    assert len(seen) == 120 == len(set(seen))
    assert seen == sorted(seen)


def test_list_bad_next_token(call: Any, services: Services, caller: Caller, other_caller: Caller) -> None:
    s = add_source(services, caller)
    keys = {f"k{i:02d}": "v" for i in range(20)}
    for _ in range(3):
        t = add_source(services, caller)
        call("TagResources", ResourceType="sourceserver", ResourceId__1=t, **tag_params(keys))
    token = call("ListTagResources", ResourceType="sourceserver")["NextToken"]
    assert token
    for bad in ("garbage!", "caeba0bbb2be03f84eb48b699f0a4883", token[:-2], token + "xx"):
        e = error(call, "ListTagResources", ResourceType="sourceserver", NextToken=bad)
        assert (e.code, e.http_status) == ("InvalidParameter", 400) and "NextToken" in e.message
    # a token belongs to its query
    e = error(call, "ListTagResources", ResourceType="sourceserver", Tag__1__Key="k00", NextToken=token)
    assert e.code == "InvalidParameter"
    e = error(call, "ListTagResources", ResourceType="replicationjob", NextToken=token)
    assert e.code == "InvalidParameter"
    # and to its account
    other = ActionCaller(services, other_caller)
    assert (
        error(other, "ListTagResources", ResourceType="sourceserver", NextToken=token).code
        == "InvalidParameter"
    )
    del s


def test_documented_errors(call: Any, services: Services, caller: Caller) -> None:
    s = add_source(services, caller)
    cases: list[tuple[str, dict[str, Any]]] = [
        ("TagResources", {"Tag__1__Key": "k"}),
        ("UntagResources", {"All": True}),
        ("ListTagResources", {}),
    ]
    for action, extra in cases:
        e = error(call, action, ResourceId__1=s, **extra)
        assert (e.code, e.http_status, e.message) == (
            "MissingParameter.ResourceType",
            400,
            "You must specify ResourceType.",
        )
        e = error(call, action, ResourceType="instance", ResourceId__1=s, **extra)
        assert (e.code, e.http_status) == ("InvalidResourceType.NotFound", 400)
        assert e.message.startswith("The specified ResourceType does not exist.")
        many = {f"ResourceId__{i}": f"s-{i}" for i in range(1, 52)}
        e = error(call, action, ResourceType="sourceserver", **many, **extra)
        assert (e.code, e.http_status) == ("NumberExceed.ResourceIds", 400)
        e = error(call, action, ResourceType="sourceserver", ResourceId__1=s, ResourceId__2=s, **extra)
        assert (e.code, e.http_status) == ("Duplicate.ResourceId", 400)
        e = error(call, action, ResourceType="sourceserver", ResourceId__1=s, ResourceId__2="s-nope", **extra)
        assert (e.code, e.http_status) == ("InvalidResourceId.NotFound", 400)
        assert e.message.startswith("The specified ResourceIds do not exist") and "s-nope" in e.message
    tags21 = {f"Tag__{i}__Key": f"k{i}" for i in range(1, 22)}
    for action in ("TagResources", "ListTagResources"):
        e = error(call, action, ResourceType="sourceserver", ResourceId__1=s, **tags21)
        assert (e.code, e.http_status) == ("NumberExceed.Tags", 400)
        e = error(call, action, ResourceType="sourceserver", ResourceId__1=s, Tag__1__Value="v")
        assert (e.code, e.http_status) == ("InvalidParameter.TagValue", 400)
    keys21 = {f"TagKey__{i}": f"k{i}" for i in range(1, 22)}
    e = error(call, "UntagResources", ResourceType="sourceserver", ResourceId__1=s, **keys21)
    assert e.code == "NumberExceed.Tags"
    # required lists
    assert (
        error(call, "TagResources", ResourceType="sourceserver", Tag__1__Key="k").code == "MissingParameter"
    )
    assert (
        error(call, "TagResources", ResourceType="sourceserver", ResourceId__1=s).code == "MissingParameter"
    )
    assert error(call, "UntagResources", ResourceType="sourceserver", All=True).code == "MissingParameter"
    e = error(call, "UntagResources", ResourceType="sourceserver", ResourceId__1=s)
    assert e.code == "MissingParameter" and "All" in e.message
    # tag key rules
    e = error(call, "TagResources", ResourceType="sourceserver", ResourceId__1=s, Tag__1__Key="aliyun:x")
    assert e.code == "InvalidParameter.TagKey"


def test_twenty_tags_per_resource(call: Any, services: Services, caller: Caller) -> None:
    a, b = add_source(services, caller), add_source(services, caller)
    call(
        "TagResources",
        ResourceType="sourceserver",
        ResourceId__1=a,
        **tag_params({f"k{i}": "v" for i in range(19)}),
    )
    # overwriting existing keys does not count twice
    call(
        "TagResources", ResourceType="sourceserver", ResourceId__1=a, **tag_params({"k0": "new", "k19": "v"})
    )
    e = error(
        call, "TagResources", ResourceType="sourceserver", ResourceId__1=b, ResourceId__2=a, Tag__1__Key="k20"
    )
    assert (e.code, e.http_status) == ("NumberExceed.Tags", 400) and a in e.message
    # checked before adding: b got nothing either
    assert listed(call, ResourceType="sourceserver", ResourceId__1=b) == []
    assert len(listed(call, ResourceType="sourceserver", ResourceId__1=a)) == 20


def test_resource_type_case(call: Any, services: Services, caller: Caller) -> None:
    s = add_source(services, caller)
    call("TagResources", ResourceType="SourceServer", ResourceId__1=s, Tag__1__Key="k", Tag__1__Value="v")
    assert listed(call, ResourceType=SRC) == [(s, SRC, "k", "v")]


def test_accounts_are_isolated(call: Any, services: Services, caller: Caller, other_caller: Caller) -> None:
    other = ActionCaller(services, other_caller)
    mine = add_source(services, caller)
    theirs = add_source(services, other_caller)
    call(
        "TagResources", ResourceType="sourceserver", ResourceId__1=mine, Tag__1__Key="k", Tag__1__Value="mine"
    )
    other(
        "TagResources",
        ResourceType="sourceserver",
        ResourceId__1=theirs,
        Tag__1__Key="k",
        Tag__1__Value="theirs",
    )
    assert listed(other, ResourceType="sourceserver") == [(theirs, SRC, "k", "theirs")]
    assert listed(other, ResourceType="sourceserver", Tag__1__Key="k", Tag__1__Value="mine") == []
    cases: list[tuple[str, dict[str, Any]]] = [
        ("TagResources", {"Tag__1__Key": "x"}),
        ("UntagResources", {"All": True}),
        ("ListTagResources", {}),
    ]
    for action, extra in cases:
        e = error(other, action, ResourceType="sourceserver", ResourceId__1=mine, **extra)
        assert e.code == "InvalidResourceId.NotFound"
    assert listed(call, ResourceType="sourceserver") == [(mine, SRC, "k", "mine")]
