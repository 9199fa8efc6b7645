"""Issue 7 items 6 and 7: hostile JSON (NaN, deep nesting) is a 400, and XML output always parses."""

from __future__ import annotations

import json
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import update
from starlette.applications import Starlette

from opensmc.api import agent_routes
from opensmc.api.render import render
from opensmc.domain.errors import InvalidParameter
from opensmc.service import staging
from opensmc.service.agents import register_source
from opensmc.service.context import Caller, Services
from opensmc.store.tables import jobs
from tests.fake_agent import agent_report

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

DEEP = "[" * 1000 + "]" * 1000


@pytest.fixture
def client(services: Services) -> Iterator[TestClient]:
    app = Starlette(routes=agent_routes.routes)
    app.state.services = services
    with TestClient(app) as c:
        yield c


@pytest.fixture
def source_id(services: Services, caller: Caller) -> str:
    report = agent_report("web-1", 20, ())
    return register_source(services, caller.account_id, report, machine_id=report["machine_id"]).source_id


@pytest.mark.parametrize(
    "params",
    [
        '{"bandwidth_limit": NaN}',
        '{"bandwidth_limit": Infinity}',
        '{"bandwidth_limit": -Infinity}',
        '{"bandwidth_limit": 1e400}',
        '{"other": ' + DEEP + "}",
        DEEP,
    ],
)
def test_replication_parameters_refuse_non_finite_and_deep(call: Any, source_id: str, params: str) -> None:
    with pytest.raises(InvalidParameter) as err:
        call("CreateReplicationJob", RegionId="local", SourceId=source_id, Name="j1", ReplicationParameters=params)
    assert "ReplicationParameters" in err.value.message
    job = call("CreateReplicationJob", RegionId="local", SourceId=source_id, Name="j1")
    with pytest.raises(InvalidParameter):
        call("ModifyReplicationJobAttribute", JobId=job["JobId"], ReplicationParameters=params)


def test_heartbeat_survives_a_stored_nan(client: TestClient, services: Services, call: Any, caller: Caller) -> None:
    # A database written before the check may hold NaN: the agent's heartbeats must still work.
    token = call("CreateAccessToken", Count="1")
    report = agent_report("web-2", 20, ())
    resp = client.post(
        "/agent/v1/register",
        json={"token_id": token["AccessTokenId"], "token_code": token["AccessTokenCode"],
              "machine_id": report["machine_id"], "report": report},
    )  # fmt: skip
    assert resp.status_code == 200, resp.text
    reg = resp.json()
    job = call("CreateReplicationJob", RegionId="local", SourceId=reg["source_id"], Name="j2")
    with services.db.begin() as conn:
        conn.execute(
            update(jobs).where(jobs.c.id == job["JobId"]).values(replication_parameters='{"bandwidth_limit": NaN}')
        )
    call("StartReplicationJob", JobId=job["JobId"])
    assert staging.prepare(services) == 1  # Syncing: the heartbeat now carries the task
    resp = client.post("/agent/v1/heartbeat", json={}, headers={"Authorization": f"Bearer {reg['agent_token']}"})
    assert resp.status_code == 200, resp.text
    [task] = resp.json()["tasks"]
    assert task["replication_parameters"]["bandwidth_limit"] == 0  # unreadable parameters: the defaults


@pytest.mark.parametrize(
    "raw",
    [
        b'{"machine_id": "m-1", "report": {"cores": NaN}}',
        b'{"machine_id": "m-1", "x": Infinity}',
        b'{"machine_id": "m-1", "x": -Infinity}',
        b'{"machine_id": "m-1", "x": 1e999}',
        b'{"machine_id": "m-1", "x": ' + DEEP.encode() + b"}",
        b'{"machine_id": "m-1", "x": "\\ud800"}',
    ],
)
def test_agent_api_refuses_non_finite_and_deep(client: TestClient, raw: bytes) -> None:
    for path in ("/agent/v1/register", "/agent/v1/heartbeat", "/agent/v1/tasks/progress", "/agent/v1/tasks/result"):
        resp = client.post(path, content=raw, headers={"content-type": "application/json"})
        assert resp.status_code == 400, (path, resp.text)
        assert resp.json()["code"] == "InvalidParameter", (path, resp.text)


def test_agent_api_still_tells_broken_json_apart(client: TestClient) -> None:
    resp = client.post("/agent/v1/register", content=b'{"a": ', headers={"content-type": "application/json"})
    assert (resp.status_code, resp.json()["code"]) == (400, "InvalidJson")


def test_xml_answer_with_control_characters_in_user_and_agent_fields(
    services: Services, call: Any, caller: Caller
) -> None:
    report = agent_report("web-3", 20, ())
    report["platform"] = "Ubuntu\x1b[31m\x07"
    report["system_info"] = json.dumps({"hostname": "h\x01\x02", "cores": "2"})
    sid = register_source(services, caller.account_id, report, machine_id=report["machine_id"]).source_id
    call("ModifySourceServerAttribute", SourceId=sid, Description="bell\x07 escape\x1b vt\x0b")
    call("TagResources", ResourceType="SourceServer", ResourceId__1=sid, Tag__1__Key="k\x1f", Tag__1__Value="v\x0c")
    body = call("DescribeSourceServers", SourceId__1=sid)
    data, _ = render({"RequestId": "r", **body}, "DescribeSourceServersResponse", "XML")
    root = ET.fromstring(data)
    assert (root.findtext("SourceServers/SourceServer/Description") or "").startswith("bell")
