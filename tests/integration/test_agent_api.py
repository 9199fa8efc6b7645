"""The agent API through real Starlette routes, and the agent process against it, on both databases."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update
from starlette.applications import Starlette

from opensmc import __version__
from opensmc.agent import runner
from opensmc.agent import state as agent_state
from opensmc.agent.runner import AgentError, run_agent
from opensmc.api import agent_routes
from opensmc.clock import new_id
from opensmc.service.accounts import new_key_pair
from opensmc.service.context import Caller, Services
from opensmc.service.sources import mark_lost_agents
from opensmc.store.tables import sources

with warnings.catch_warnings():
    # Starlette would rather use the `httpx2` fork; httpx works the same for these tests.
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

T0 = datetime(2024, 6, 1, tzinfo=UTC)
GIB = 1 << 30


def make_report(machine_id: str, hostname: str = "app-1", disk_gib: int = 40) -> dict[str, Any]:
    return {
        "report_version": 1,
        "machine_id": machine_id,
        "hostname": hostname,
        "platform": "Debian GNU/Linux",
        "architecture": "arm64",
        "kernel_level": 601,
        "system_info": json.dumps({"hostname": hostname, "cores": "2"}),
        "disks": [
            {
                "index": 0,
                "path": "/dev/sda",
                "size_bytes": disk_gib * GIB,
                "parts": [
                    {
                        "device": "0_0",
                        "path": "/",
                        "offset": 1 << 20,
                        "size_bytes": disk_gib * GIB - (1 << 20),
                        "fs_type": "ext4",
                        "can_block": True,
                        "need": True,
                        "type": "System",
                    }
                ],
            },
        ],
    }


@pytest.fixture
def now(services: Services) -> list[datetime]:
    """The services' clock; tests move it by assigning now[0]."""
    box = [T0]
    services.clock = lambda: box[0]
    return box


@pytest.fixture
def client(services: Services, now: list[datetime]) -> Iterator[TestClient]:
    app = Starlette(routes=agent_routes.routes)
    app.state.services = services
    # An agent on the server's machine: loopback, where plain HTTP is accepted for AccessKeys.
    with TestClient(app, client=("127.0.0.1", 50000)) as c:
        yield c


@pytest.fixture
def token(call: Any) -> dict[str, str]:
    created: dict[str, str] = call("CreateAccessToken", Count="2", TimeToLiveInDays="7")
    return created


def reg(client: TestClient, token: dict[str, str], machine: str, **extra: Any) -> httpx.Response:
    body = {
        "token_id": token["AccessTokenId"],
        "token_code": token["AccessTokenCode"],
        "machine_id": machine,
        "agent_version": "0.1.0",
        "report": make_report(machine),
        **extra,
    }
    return client.post("/agent/v1/register", json=body)


def beat(client: TestClient, agent_token: str, body: dict[str, Any] | None = None) -> httpx.Response:
    return client.post(
        "/agent/v1/heartbeat", json=body or {}, headers={"Authorization": f"Bearer {agent_token}"}
    )


def source(call: Any, sid: str) -> dict[str, Any]:
    [s] = call("DescribeSourceServers", SourceId__1=sid)["SourceServers"]["SourceServer"]
    return s


def registered_count(call: Any, tid: str) -> str:
    [t] = call("ListAccessTokens", AccessTokenId__1=tid)["AccessTokens"]["AccessToken"]
    return str(t["RegisteredCount"])


def test_info(client: TestClient) -> None:
    body = client.get("/agent/v1/info").json()
    assert body["service"] == "opensmc" and body["api_version"] == 1


def test_register_with_token(client: TestClient, call: Any, token: dict[str, str]) -> None:
    resp = reg(client, token, "machine-a")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    sid = body["source_id"]
    assert sid.startswith("s-") and body["agent_token"].startswith(f"{sid}.") and body["created"] is True
    s = source(call, sid)
    assert (s["Name"], s["State"], s["Architecture"], s["KernelLevel"], s["SystemDiskSize"]) == (
        "app-1",
        "Available",
        "arm64",
        601,
        40,
    )
    assert (s["AgentVersion"], s["Platform"]) == ("0.1.0", "Debian GNU/Linux")
    assert registered_count(call, token["AccessTokenId"]) == "1"
    assert call("ListAccessTokens")["AccessTokens"]["AccessToken"][0]["Status"] == "activated"


def test_known_agent_comes_back_as_the_same_source(
    client: TestClient, call: Any, token: dict[str, str], now: list[datetime]
) -> None:
    first = reg(client, token, "machine-a").json()
    call("ModifySourceServerAttribute", SourceId=first["source_id"], Name="renamed")
    # With its saved token (proof): the same source, its token kept, no code use spent.
    again = reg(
        client, token, "machine-a", agent_token=first["agent_token"], report=make_report("machine-a", disk_gib=80)
    )
    assert again.status_code == 200, again.text
    assert again.json()["source_id"] == first["source_id"] and again.json()["created"] is False
    assert again.json()["agent_token"] == first["agent_token"]
    assert registered_count(call, token["AccessTokenId"]) == "1"
    s = source(call, first["source_id"])
    assert s["Name"] == "renamed" and s["SystemDiskSize"] == 80  # the name stays, the report is new
    assert beat(client, first["agent_token"]).status_code == 200
    # Without it, while the agent is online: refused, the online agent keeps the source.
    conflict = reg(client, token, "machine-a")
    assert conflict.status_code == 409 and conflict.json()["code"] == "SourceServer.IdentityConflict"
    assert beat(client, first["agent_token"]).status_code == 200
    # Once the agent is silent past the grace period, a code may take it back, spending a use.
    now[0] += timedelta(seconds=91)
    back = reg(client, token, "machine-a").json()
    assert back["source_id"] == first["source_id"] and back["created"] is False
    assert registered_count(call, token["AccessTokenId"]) == "2"
    assert beat(client, first["agent_token"]).status_code == 401  # the old token was replaced
    assert beat(client, back["agent_token"]).status_code == 200
    assert "Re-registered" in source(call, first["source_id"])["StatusInfo"]
    assert call("DescribeSourceServers")["TotalCount"] == 1


def test_count_is_enforced_for_new_sources_only(client: TestClient, call: Any, token: dict[str, str]) -> None:
    m1 = reg(client, token, "m1").json()
    assert reg(client, token, "m2").status_code == 200
    third = reg(client, token, "m3")
    assert third.status_code == 403 and third.json()["code"] == "AccessToken.CountExceeded"
    # a known agent with its token uses no registration
    assert reg(client, token, "m1", agent_token=m1["agent_token"]).status_code == 200
    assert registered_count(call, token["AccessTokenId"]) == "2"


def test_ttl_expiry(client: TestClient, token: dict[str, str], now: list[datetime]) -> None:
    now[0] = T0 + timedelta(days=7) - timedelta(seconds=1)
    assert reg(client, token, "m1").status_code == 200
    now[0] = T0 + timedelta(days=7)
    resp = reg(client, token, "m2")
    assert resp.status_code == 403 and resp.json()["code"] == "AccessToken.Expired"
    assert "2024-06-08T00:00:00Z" in resp.json()["message"]


def test_disabled_and_wrong_codes_are_refused(client: TestClient, call: Any, token: dict[str, str]) -> None:
    wrong = reg(client, {**token, "AccessTokenCode": "x" * 32}, "m1")
    assert wrong.status_code == 403 and wrong.json()["code"] == "InvalidAccessToken"
    unknown = reg(client, {**token, "AccessTokenId": "at-doesnotexist"}, "m1")
    assert unknown.status_code == 403 and unknown.json()["code"] == "InvalidAccessToken"
    call("DisableAccessToken", AccessTokenId=token["AccessTokenId"])
    off = reg(client, token, "m1")
    assert off.status_code == 403 and off.json()["code"] == "AccessToken.Disabled"
    assert call("DescribeSourceServers")["TotalCount"] == 0


def test_register_with_access_key(client: TestClient, services: Services, call: Any, caller: Caller) -> None:
    pair = new_key_pair(services, caller.account_id)
    body = {
        "access_key_id": pair.access_key_id,
        "access_key_secret": pair.access_key_secret,
        "machine_id": "m-key",
        "report": make_report("m-key"),
    }
    resp = client.post("/agent/v1/register", json=body)
    assert resp.status_code == 200, resp.text
    assert source(call, resp.json()["source_id"])["State"] == "Available"
    with services.db.connect() as conn:
        assert conn.execute(select(sources.c.registered_with)).scalar_one() == pair.access_key_id
    bad = client.post("/agent/v1/register", json={**body, "access_key_secret": "nope"})
    assert bad.status_code == 403 and bad.json()["code"] == "InvalidAccessKey"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"machine_id": "m1", "report": {}}, "MissingCredential"),
        ({"token_id": "at-x", "machine_id": "m1", "report": {}}, "MissingCredential"),
        ({"token_id": "at-x", "token_code": "c", "report": {"disks": []}}, "InvalidMachineId"),
        ({"token_id": "at-x", "token_code": "c", "machine_id": "bad id!", "report": {}}, "InvalidMachineId"),
        (
            {"token_id": "at-x", "token_code": "c", "machine_id": "m1", "report": {"disks": "x"}},
            "InvalidReport",
        ),
        (
            {
                "token_id": "at-x",
                "token_code": "c",
                "machine_id": "m1",
                "report": {"disks": [{"index": 0, "path": "/dev/x"}]},
            },
            "InvalidReport",
        ),
        (
            {
                "token_id": "at-x",
                "token_code": "c",
                "machine_id": "m1",
                "report": {
                    "disks": [{"index": 0, "size_bytes": 1, "parts": [{"size_bytes": 1, "type": "Odd"}]}]
                },
            },
            "InvalidReport",
        ),
        (
            {
                "token_id": "at-x",
                "token_code": "c",
                "machine_id": "m1",
                "report": {"system_info": "{not json"},
            },
            "InvalidReport",
        ),
    ],
)
def test_malformed_registrations(client: TestClient, body: dict[str, Any], code: str) -> None:
    resp = client.post("/agent/v1/register", json=body)
    assert resp.status_code == 400 and resp.json()["code"] == code, resp.text
    assert resp.json()["message"]


def test_not_json(client: TestClient) -> None:
    resp = client.post("/agent/v1/register", content=b"{", headers={"content-type": "application/json"})
    assert resp.status_code == 400 and resp.json()["code"] == "InvalidJson"


def test_heartbeat_and_liveness(
    client: TestClient, call: Any, services: Services, token: dict[str, str], now: list[datetime]
) -> None:
    body = reg(client, token, "m1").json()
    sid, agent_token = body["source_id"], body["agent_token"]
    assert beat(client, "").status_code == 401
    assert beat(client, f"{sid}.wrong").status_code == 401
    assert beat(client, "s-unknown.x").json()["code"] == "InvalidAgentToken"
    ok = beat(client, agent_token)
    assert ok.status_code == 200 and ok.json() == {
        "source_id": sid,
        "state": "Available",
        "heartbeat_rate": 10,
        "server_version": __version__,
        "tasks": [],
    }
    now[0] = T0 + timedelta(minutes=5)
    assert mark_lost_agents(services, now[0]) == 1
    s = source(call, sid)
    assert (s["State"], s["ErrorCode"]) == ("Unavailable", "SourceServer.Offline")
    assert json.loads(s["StatusInfo"])["error_msg"].startswith(
        "No heartbeat from the SMC agent since 2024-06-01T00:00:00Z"
    )
    # The agent is back, with a bigger disk.
    resp = beat(client, agent_token, {"agent_version": "0.2.0", "report": make_report("m1", disk_gib=64)})
    assert resp.json()["state"] == "Available"
    s = source(call, sid)
    assert (s["State"], s["ErrorCode"], s["StatusInfo"], s["SystemDiskSize"], s["AgentVersion"]) == (
        "Available",
        "",
        "",
        64,
        "0.2.0",
    )
    assert mark_lost_agents(services, now[0] + timedelta(seconds=30)) == 0
    bad = beat(client, agent_token, {"report": {"disks": 5}})
    assert bad.status_code == 400 and bad.json()["code"] == "InvalidReport"


def test_heartbeat_leaves_in_use_and_deleting_alone(
    client: TestClient, call: Any, services: Services, token: dict[str, str]
) -> None:
    body = reg(client, token, "m1").json()
    for state in ("InUse", "Deleting"):
        with services.db.begin() as conn:
            conn.execute(update(sources).where(sources.c.id == body["source_id"]).values(state=state))
        assert beat(client, body["agent_token"]).json()["state"] == state
    again = reg(client, token, "m1")
    assert again.status_code == 409 and again.json()["code"] == "SourceServerState.Invalid"


def test_accounts_are_isolated(
    client: TestClient, services: Services, call: Any, other_caller: Caller, token: dict[str, str]
) -> None:
    mine = reg(client, token, "shared-machine").json()
    pair = new_key_pair(services, other_caller.account_id)
    theirs = client.post(
        "/agent/v1/register",
        json={
            "access_key_id": pair.access_key_id,
            "access_key_secret": pair.access_key_secret,
            "machine_id": "shared-machine",
            "report": make_report("shared-machine"),
        },
    ).json()
    assert theirs["source_id"] != mine["source_id"]
    assert [s["SourceId"] for s in call("DescribeSourceServers")["SourceServers"]["SourceServer"]] == [
        mine["source_id"]
    ]


# -- the agent process -------------------------------------------------------------------------------------


def test_run_agent_once_then_reuse_then_reregister(
    client: TestClient, call: Any, token: dict[str, str], tmp_path: Path
) -> None:
    state_dir = tmp_path / "agent"
    report = make_report("m-run")
    kw: dict[str, Any] = {
        "token_id": token["AccessTokenId"],
        "token_code": token["AccessTokenCode"],
        "state_dir": state_dir,
        "once": True,
        "http": client,
        "report_fn": lambda: report,
    }
    first = run_agent("http://testserver", **kw)
    assert first is not None
    path = agent_state.state_path(state_dir)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    saved = agent_state.load(state_dir)
    assert saved == first and saved.machine_id == "m-run"
    assert source(call, first.source_id)["State"] == "Available"
    # A second start reuses the saved credential: no registration, same token.
    second = run_agent(
        "http://testserver", state_dir=state_dir, once=True, http=client, report_fn=lambda: report
    )
    assert second == first
    # The source is deleted: the agent's credential is refused and it registers again.
    call("DeleteSourceServer", SourceId=first.source_id)
    third = run_agent("http://testserver", **kw)
    assert third is not None and third.source_id != first.source_id
    assert registered_count(call, token["AccessTokenId"]) == "2"
    # ...but without a code it cannot.
    call("DeleteSourceServer", SourceId=third.source_id)
    with pytest.raises(AgentError, match="no activation code"):
        run_agent("http://testserver", state_dir=state_dir, once=True, http=client, report_fn=lambda: report)


def test_run_agent_refused_registration_is_fatal(
    client: TestClient, token: dict[str, str], tmp_path: Path
) -> None:
    with pytest.raises(AgentError, match="InvalidAccessToken"):
        run_agent(
            "http://testserver",
            token_id=token["AccessTokenId"],
            token_code="wrong",
            state_dir=tmp_path,
            once=True,
            http=client,
            report_fn=lambda: make_report("m"),
        )
    with pytest.raises(AgentError, match="both"):
        run_agent("http://testserver", token_id="at-x", state_dir=tmp_path, once=True)
    assert agent_state.load(tmp_path) is None


def test_run_agent_daemon_heartbeats_until_stopped(
    client: TestClient,
    services: Services,
    call: Any,
    token: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", logger="opensmc.agent")
    services.settings = replace(services.settings, heartbeat_rate=1)
    # Short long-polls: Starlette's TestClient deadlocks when it closes with a request still open,
    # and run_agent waits only briefly for its channel to end.
    monkeypatch.setattr(runner, "CHANNEL_WAIT", 0.2)
    beats: list[int] = []

    def report() -> dict[str, Any]:
        beats.append(1)
        return make_report("m-daemon")

    stop = threading.Event()
    t = threading.Thread(
        target=run_agent,
        args=("http://testserver",),
        kwargs={
            "token_id": token["AccessTokenId"],
            "token_code": token["AccessTokenCode"],
            "state_dir": tmp_path,
            "stop_event": stop,
            "http": client,
            "report_fn": report,
        },
    )
    t.start()
    deadline = time.monotonic() + 20
    while (len(beats) < 2 or "task channel open" not in caplog.text) and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    t.join(10)
    assert not t.is_alive() and len(beats) >= 2
    assert "task channel open" in caplog.text and "task channel to" not in caplog.text  # opened, never lost
    [s] = call("DescribeSourceServers")["SourceServers"]["SourceServer"]
    assert s["HeartbeatRate"] == 1


def test_run_agent_retries_then_gives_up_in_once_mode(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing listens at the server's port: http.client's ConnectionRefusedError is retried, then fatal."""
    monkeypatch.setattr(runner, "BACKOFF_START", 0.01)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: connections are refused
    with caplog.at_level("WARNING", logger="opensmc.agent"), pytest.raises(AgentError, match="cannot reach"):
        run_agent(
            f"http://127.0.0.1:{port}",
            token_id="at-x",
            token_code="c",
            state_dir=tmp_path,
            once=True,
            report_fn=lambda: make_report("m"),
        )
    assert caplog.text.count("not reachable") == runner.ONCE_ATTEMPTS - 1


def test_run_agent_with_real_discovery_of_an_image(
    client: TestClient, call: Any, token: dict[str, str], tmp_path: Path
) -> None:
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    st = run_agent(
        "http://testserver",
        token_id=token["AccessTokenId"],
        token_code=token["AccessTokenCode"],
        disks=[str(image)],
        state_dir=tmp_path / "state",
        once=True,
        http=client,
    )
    assert st is not None
    s = source(call, st.source_id)
    assert s["SystemDiskSize"] == 1
    assert s["Disks"]["System"]["Parts"]["Part"][0]["SizeBytes"] == 64 << 20
    with pytest.raises(AgentError, match="no such file"):
        run_agent(
            "http://testserver",
            disks=[str(tmp_path / "missing.img")],
            state_dir=tmp_path,
            once=True,
            http=client,
        )
    _ = new_id
