"""The real server and agent processes: register a source with an activation code."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import OPENSMC, ServerProcess, clean_env, stop

pytestmark = pytest.mark.e2e


def make_disk(path: Path, size: int = 64 << 20) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
        f.seek(1 << 20)
        f.write(os.urandom(1 << 20))
    return path


def wait_for(predicate: Any, timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; last value {last!r}")


def sources(server: ServerProcess) -> list[dict[str, Any]]:
    body = server.call_json("DescribeSourceServers")
    return list(body["SourceServers"]["SourceServer"])  # type: ignore[index]


def start_agent(server: ServerProcess, token_id: str, code: str, disk: Path, state: Path) -> subprocess.Popen[str]:
    log = state.parent / "agent.log"
    return subprocess.Popen(
        [
            *OPENSMC,
            "agent",
            "run",
            "--server",
            server.endpoint,
            "--token-id",
            token_id,
            "--token-code",
            code,
            "--disk",
            str(disk),
            "--state-dir",
            str(state),
        ],
        stdout=log.open("a"),
        stderr=subprocess.STDOUT,
        text=True,
        env=clean_env(),
    )


def test_credentials_file_is_private(server: ServerProcess) -> None:
    path = server.data_dir / "admin-credentials.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    creds = json.loads(path.read_text())
    assert set(creds) == {"access_key_id", "access_key_secret", "endpoint"}
    assert creds["endpoint"] == server.endpoint


def test_agent_registers_goes_offline_and_comes_back(server: ServerProcess, tmp_path: Path) -> None:
    token = server.call_json("CreateAccessToken", "--Name", "e2e", "--Count", "2")
    disk = make_disk(tmp_path / "disk0.img")
    state = tmp_path / "agent-state"
    agent = start_agent(server, str(token["AccessTokenId"]), str(token["AccessTokenCode"]), disk, state)
    try:
        found = wait_for(lambda: [s for s in sources(server) if s["State"] == "Available"], what="source Available")
        src = found[0]
        assert src["SourceId"].startswith("s-")
        assert src["Disks"]["System"]["Size"] >= 1
        listed = server.call_json("ListAccessTokens")["AccessTokens"]["AccessToken"]  # type: ignore[index]
        assert listed[0]["RegisteredCount"] == "1"
    finally:
        stop(agent)
    # Without heartbeats the source goes Unavailable after the grace period (3 s here).
    gone = wait_for(
        lambda: [s for s in sources(server) if s["State"] == "Unavailable"], timeout=30, what="source Unavailable"
    )
    assert gone[0]["ErrorCode"]
    assert json.loads(gone[0]["StatusInfo"])
    # The same state dir brings back the same source, not a new one.
    agent = start_agent(server, str(token["AccessTokenId"]), str(token["AccessTokenCode"]), disk, state)
    try:
        back = wait_for(lambda: [s for s in sources(server) if s["State"] == "Available"], what="source back")
        assert back[0]["SourceId"] == src["SourceId"]
        assert len(sources(server)) == 1
    finally:
        stop(agent)


def test_call_prints_errors_and_exits_non_zero(server: ServerProcess) -> None:
    result = server.call("StartReplicationJob", "--JobId", "j-doesnotexist", check=False)
    assert result.returncode == 1
    assert result.stderr.startswith("opensmc call: error: InvalidJobId.NotFound: ")
    assert "RequestId " in result.stderr


def test_wrong_region_is_refused(server: ServerProcess) -> None:
    result = server.call("CreateReplicationJob", "--RegionId", "cn-hangzhou", "--SourceId", "s-x", check=False)
    assert result.returncode == 1
    assert "InvalidParameter" in result.stderr or "InvalidRegionId" in result.stderr


def test_server_restart_keeps_data(tmp_path: Path) -> None:
    from tests.e2e.conftest import start_server

    srv = start_server(tmp_path / "data")
    token = srv.call_json("CreateAccessToken", "--Name", "keep")
    stop(srv.proc)
    srv2 = start_server(tmp_path / "data")
    try:
        ids = [t["AccessTokenId"] for t in srv2.call_json("ListAccessTokens")["AccessTokens"]["AccessToken"]]  # type: ignore[index]
        assert token["AccessTokenId"] in ids
        assert "Created the first account" not in srv2.log.read_text().split("OpenSMC API on")[-1]
    finally:
        stop(srv2.proc)


def test_opensmc_help_runs() -> None:
    result = subprocess.run([*OPENSMC, "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    assert "server" in result.stdout
