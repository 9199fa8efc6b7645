"""Activation codes on both databases: create, list, disable, delete, statuses, validation, isolation."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select

from opensmc.api.actions import ACTIONS
from opensmc.domain.errors import SmcError
from opensmc.params import Params
from opensmc.service import agents
from opensmc.service.context import Caller, Services
from opensmc.store.tables import access_tokens

T0 = datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC)


def report(machine: str = "m-1", hostname: str = "web-1") -> dict[str, Any]:
    return {"machine_id": machine, "hostname": hostname, "platform": "Ubuntu", "disks": []}


def as_other(services: Services, other: Caller, action: str, **params: str) -> dict[str, Any]:
    return ACTIONS[action].handler(
        services, other, Params({k.replace("__", "."): v for k, v in params.items()})
    )


def tokens(call: Any, **filters: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = call("ListAccessTokens", **filters)["AccessTokens"]["AccessToken"]
    return out


@pytest.fixture(autouse=True)
def fixed_clock(services: Services) -> None:
    services.clock = lambda: T0


def test_create_defaults_and_list_shape(call: Any, services: Services) -> None:
    created = call("CreateAccessToken")
    assert set(created) == {"AccessTokenId", "AccessTokenCode"}
    assert re.fullmatch(r"at-[a-z0-9]{20}", created["AccessTokenId"])
    assert re.fullmatch(r"[A-Za-z0-9]{32}", created["AccessTokenCode"])
    body = call("ListAccessTokens")
    assert (body["TotalCount"], body["PageNumber"], body["PageSize"]) == (1, 1, 20)
    [tok] = body["AccessTokens"]["AccessToken"]
    assert tok == {
        "AccessTokenId": created["AccessTokenId"],
        "Name": "",
        "Description": "",
        "Count": "100",
        "RegisteredCount": "0",
        "TimeToLiveInDays": "30",
        "CreationTime": "2024-03-01T12:00:00Z",
        "Status": "unactivated",
    }
    # Only a salted hash is stored, never the code.
    with services.db.connect() as conn:
        stored = conn.execute(select(access_tokens.c.code_hash)).scalar_one()
    assert created["AccessTokenCode"] not in stored and stored.startswith("sha256$")


def test_create_with_every_parameter(call: Any) -> None:
    tid = call(
        "CreateAccessToken", Name="batch-1", Description="first wave", Count="5", TimeToLiveInDays="90"
    )["AccessTokenId"]
    [tok] = tokens(call, AccessTokenId__1=tid)
    assert (tok["Name"], tok["Description"], tok["Count"], tok["TimeToLiveInDays"]) == (
        "batch-1",
        "first wave",
        "5",
        "90",
    )


@pytest.mark.parametrize(
    ("param", "value"),
    [
        ("Count", "0"),
        ("Count", "1001"),
        ("Count", "ten"),
        ("TimeToLiveInDays", "0"),
        ("TimeToLiveInDays", "91"),
        ("TimeToLiveInDays", "1.5"),
        ("Name", "1abc"),
        ("Name", "a"),
        ("Name", "http://x"),
        ("Name", "has space"),
        ("Description", "x" * 1025),
    ],
)
def test_create_rejects_bad_values(call: Any, param: str, value: str) -> None:
    with pytest.raises(SmcError) as err:
        call("CreateAccessToken", **{param: value})
    assert err.value.code == "InvalidParameter" and param in err.value.message


def test_bounds_are_accepted(call: Any) -> None:
    call("CreateAccessToken", Count="1", TimeToLiveInDays="1")
    call("CreateAccessToken", Count="1000", TimeToLiveInDays="90")
    assert len(tokens(call)) == 2


def test_statuses_and_status_filter(call: Any, services: Services, caller: Caller) -> None:
    fresh = call("CreateAccessToken", Name="fresh")
    used = call("CreateAccessToken", Name="used")
    off = call("CreateAccessToken", Name="off")
    short = call("CreateAccessToken", Name="short", TimeToLiveInDays="1")
    agents.register(
        services, {"token_id": used["AccessTokenId"], "token_code": used["AccessTokenCode"], **report()}
    )
    call("DisableAccessToken", AccessTokenId=off["AccessTokenId"])
    services.clock = lambda: T0 + timedelta(days=1)  # `short` expires exactly now
    by_name = {t["Name"]: t for t in tokens(call)}
    assert {n: t["Status"] for n, t in by_name.items()} == {
        "fresh": "unactivated",
        "used": "activated",
        "off": "expired",
        "short": "expired",
    }
    assert by_name["used"]["RegisteredCount"] == "1"
    assert {t["Name"] for t in tokens(call, Status="expired")} == {"off", "short"}
    assert [t["Name"] for t in tokens(call, Status="activated")] == ["used"]
    assert [t["AccessTokenId"] for t in tokens(call, Status="unactivated")] == [fresh["AccessTokenId"]]
    with pytest.raises(SmcError) as err:
        call("ListAccessTokens", Status="disabled")
    assert err.value.code == "InvalidParameter"
    _ = short


def test_list_filters_by_ids_and_name(call: Any) -> None:
    a = call("CreateAccessToken", Name="alpha")["AccessTokenId"]
    b = call("CreateAccessToken", Name="beta")["AccessTokenId"]
    call("CreateAccessToken", Name="gamma")
    assert {t["AccessTokenId"] for t in tokens(call, AccessTokenId__1=a, AccessTokenId__2=b)} == {a, b}
    assert [t["AccessTokenId"] for t in tokens(call, Name="beta")] == [b]
    assert [t["AccessTokenId"] for t in tokens(call, Name="beta", AccessTokenId__1=a)] == []
    body = call("ListAccessTokens", Name="nobody")
    assert body["TotalCount"] == 0 and body["AccessTokens"] == {"AccessToken": []}


def test_disable_and_delete(call: Any) -> None:
    tid = call("CreateAccessToken")["AccessTokenId"]
    assert call("DisableAccessToken", AccessTokenId=tid) == {}
    assert call("DisableAccessToken", AccessTokenId=tid) == {}  # disabling twice is harmless
    assert tokens(call)[0]["Status"] == "expired"
    assert call("DeleteAccessToken", AccessTokenId=tid) == {}
    assert tokens(call) == []
    for action in ("DeleteAccessToken", "DisableAccessToken"):
        with pytest.raises(SmcError) as err:
            call(action, AccessTokenId=tid)
        assert (err.value.code, err.value.http_status) == ("InvalidAccessTokenId.NotFound", 404)
        with pytest.raises(SmcError) as err:
            call(action)
        assert err.value.code == "MissingParameter"


def test_deleting_a_code_keeps_its_sources(call: Any, services: Services) -> None:
    tok = call("CreateAccessToken")
    reg = agents.register(
        services, {"token_id": tok["AccessTokenId"], "token_code": tok["AccessTokenCode"], **report()}
    )
    call("DeleteAccessToken", AccessTokenId=tok["AccessTokenId"])
    found = call("DescribeSourceServers", SourceId__1=reg.source_id)["SourceServers"]["SourceServer"]
    assert [s["SourceId"] for s in found] == [reg.source_id]


def test_accounts_are_isolated(call: Any, services: Services, other_caller: Caller) -> None:
    tid = call("CreateAccessToken", Name="mine")["AccessTokenId"]
    theirs = as_other(services, other_caller, "ListAccessTokens")
    assert theirs["TotalCount"] == 0
    assert as_other(services, other_caller, "ListAccessTokens", AccessTokenId__1=tid)["TotalCount"] == 0
    for action in ("DisableAccessToken", "DeleteAccessToken"):
        with pytest.raises(SmcError) as err:
            as_other(services, other_caller, action, AccessTokenId=tid)
        assert err.value.code == "InvalidAccessTokenId.NotFound"
    assert tokens(call)[0]["Status"] == "unactivated"
