"""Two `opensmc server` processes on one PostgreSQL database, as the scale-out mode promises."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, make_url, text

from opensmc.store.db import normalize_url
from tests.conftest import PG_URL, _pg_available
from tests.e2e.conftest import ServerProcess, start_server, stop

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]


@pytest.fixture
def pg_url() -> Iterator[str]:
    if not _pg_available():
        pytest.skip(f"PostgreSQL not reachable at {PG_URL}")
    admin = create_engine(normalize_url(PG_URL), isolation_level="AUTOCOMMIT")
    name = f"opensmc_e2e_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    yield make_url(normalize_url(PG_URL)).set(database=name).render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def test_two_servers_share_one_database(pg_url: str, tmp_path: Path) -> None:
    key = "m" * 43 + "="  # both processes must share the master key that seals AccessKey secrets
    first = start_server(tmp_path / "a", "--database", pg_url, extra_env={"OPENSMC_MASTER_KEY": key})
    second: ServerProcess | None = None
    try:
        assert "PostgreSQL" in first.log.read_text()
        second = start_server(tmp_path / "b", "--database", pg_url, extra_env={"OPENSMC_MASTER_KEY": key})
        # Only the first start creates the account; the second reuses it.
        assert not (tmp_path / "b" / "admin-credentials.json").exists()
        creds = first.credentials
        token = first.call_json("CreateAccessToken", "--Name", "shared")
        # The same key pair works against the second process and sees the same data.
        creds_b = tmp_path / "b-creds.json"
        creds_b.write_text(json.dumps({**creds, "endpoint": second.endpoint}))
        listed = second.call_json_with(creds_b, "ListAccessTokens")
        ids = [t["AccessTokenId"] for t in listed["AccessTokens"]["AccessToken"]]  # type: ignore[index]
        assert token["AccessTokenId"] in ids
    finally:
        stop(first.proc)
        if second is not None:
            stop(second.proc)


def test_migration_with_two_servers_on_postgresql(pg_url: str, tmp_path: Path) -> None:
    """Two orchestrators race for one job on PostgreSQL (leases, SKIP LOCKED); it moves once, byte for byte."""
    from tests.e2e.conftest import free_port
    from tests.e2e.disks import MiB, build_disk, require_tools, sha256_file
    from tests.e2e.flows import create_job, export, register, wait_status

    require_tools()
    disk = build_disk(tmp_path / "sys.img", 64 * MiB, label="gpt", parts=2, seed=51)
    data = tmp_path / "data"  # one data dir: the receiver and both orchestrators share staging and images
    rport = free_port()
    common = ("--database", pg_url, "--heartbeat-rate", "1", "--orchestrator-interval", "0.2")
    first = start_server(data, *common, "--receiver-listen", f"127.0.0.1:{rport}")
    second: ServerProcess | None = None
    agent = None
    try:
        second = start_server(
            data, *common, "--roles", "api,orchestrator", "--receiver-endpoint", f"http://127.0.0.1:{rport}"
        )
        # The agent heartbeats to the second server (so its tasks come from there); both orchestrators race.
        second_view = ServerProcess(second.proc, second.endpoint, data, second.log)
        agent, source_id = register(second_view, [disk.path], tmp_path / "agent")
        job_id = create_job(first, source_id, "two-servers")
        first.call_json("StartReplicationJob", "--JobId", job_id)
        job = wait_status(first, job_id, "Finished", timeout=90)
        [run] = job["ReplicationJobRuns"]["ReplicationJobRun"]
        assert run["ImageId"] == job["ImageId"]
        out = export(first, str(job["ImageId"]), 0, tmp_path / "out.img")
        assert sha256_file(out) == disk.sha256()
    finally:
        if agent:
            agent.stop()
        stop(first.proc)
        if second is not None:
            stop(second.proc)


def test_start_through_one_server_reaches_an_agent_connected_to_the_other(pg_url: str, tmp_path: Path) -> None:
    """The agent's task channel is on a server without an orchestrator; Start and Preparing happen on the other.

    Nothing in the agent's server process makes the transitions, so no in-process
    wake-up can answer its long-poll: only the long-poll's re-read of the database.
    Heartbeats come once a minute, so a task that reaches the agent before the next
    one came on the channel (the agent's log says which).
    """
    from tests.e2e.conftest import free_port
    from tests.e2e.flows import create_job, export, register, wait_status

    data = tmp_path / "data"
    disk = tmp_path / "disk.img"
    with disk.open("wb") as f:
        f.truncate(32 << 20)
        f.seek(4 << 20)
        f.write(os.urandom(4 << 20))
    rport = free_port()
    common = ("--database", pg_url, "--heartbeat-rate", "60", "--heartbeat-grace", "300")
    first = start_server(data, *common, "--receiver-listen", f"127.0.0.1:{rport}")
    second: ServerProcess | None = None
    agent = None
    try:
        second = start_server(data, *common, "--roles", "api", "--receiver-endpoint", f"http://127.0.0.1:{rport}")
        agent, source_id = register(
            ServerProcess(second.proc, second.endpoint, data, second.log), [disk], tmp_path / "a"
        )
        job_id = create_job(first, source_id, "channel-two-servers")
        first.call_json("StartReplicationJob", "--JobId", job_id)
        job = wait_status(first, job_id, "Finished", timeout=120)
        log = agent.log_text()
        assert f"task {job_id}:1: starting (from the task channel)" in log, log
        assert "(from the heartbeat)" not in log
        out = export(first, str(job["ImageId"]), 0, tmp_path / "out.img")
        assert out.read_bytes() == disk.read_bytes()
    finally:
        if agent:
            agent.stop()
        stop(first.proc)
        if second is not None:
            stop(second.proc)
