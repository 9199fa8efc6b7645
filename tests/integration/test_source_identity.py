"""Issue 7 item 4: a source is its agent's identity, taken over only with proof, never flapped."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text
from starlette.applications import Starlette

from opensmc.agent import state as agent_state
from opensmc.agent.runner import AgentError, run_agent
from opensmc.api import agent_routes
from opensmc.service.context import Services
from opensmc.store.db import Database
from opensmc.store.migrate import upgrade
from opensmc.store.tables import sources
from tests.integration.test_agent_api import beat, make_report, reg, registered_count, source

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

T0 = datetime(2024, 6, 1, tzinfo=UTC)


@pytest.fixture
def now(services: Services) -> list[datetime]:
    box = [T0]
    services.clock = lambda: box[0]
    return box


@pytest.fixture
def client(services: Services, now: list[datetime]) -> Iterator[TestClient]:
    app = Starlette(routes=agent_routes.routes)
    app.state.services = services
    with TestClient(app, client=("127.0.0.1", 50000)) as c:
        yield c


@pytest.fixture
def token(call: Any) -> dict[str, str]:
    created: dict[str, str] = call("CreateAccessToken", Count="5", TimeToLiveInDays="7")
    return created


def test_machine_id_and_a_code_no_longer_take_a_source_over(
    client: TestClient, call: Any, token: dict[str, str], now: list[datetime]
) -> None:
    victim = reg(client, token, "victim-machine", instance_id="a" * 32).json()
    # The attacker knows the victim's machine id (it is no secret) and holds a usable code.
    stolen = reg(client, token, "victim-machine")
    assert stolen.status_code == 200 and stolen.json()["source_id"] != victim["source_id"]  # its own source
    # Claiming the victim's identity too (which is a secret of the victim's state dir) while it is online:
    claim = reg(client, token, "victim-machine", instance_id="a" * 32)
    assert claim.status_code == 409, claim.text
    assert claim.json()["code"] == "SourceServer.IdentityConflict"
    assert beat(client, victim["agent_token"]).status_code == 200  # the victim keeps its source
    s = source(call, victim["source_id"])
    assert s["ErrorCode"] == "SourceServer.IdentityConflict"  # shown on the source
    assert "without its agent token" in s["StatusInfo"]
    # The victim proving itself (re-registering with its token) clears the conflict.
    again = reg(client, token, "victim-machine", instance_id="a" * 32, agent_token=victim["agent_token"])
    assert again.status_code == 200 and again.json()["agent_token"] == victim["agent_token"]
    assert source(call, victim["source_id"])["ErrorCode"] == ""


def test_proof_of_another_source_is_no_proof(client: TestClient, token: dict[str, str]) -> None:
    a = reg(client, token, "m-a", instance_id="a" * 32).json()
    reg(client, token, "m-b", instance_id="b" * 32)
    # a's token does not prove b's identity
    claim = reg(client, token, "m-b", instance_id="b" * 32, agent_token=a["agent_token"])
    assert claim.status_code == 409


def test_two_state_dirs_on_one_host_are_two_sources(
    client: TestClient, call: Any, token: dict[str, str], tmp_path: Path
) -> None:
    report = make_report("same-machine-id")  # one /etc/machine-id: two agents, or two clones
    kw: dict[str, Any] = {"token_id": token["AccessTokenId"], "token_code": token["AccessTokenCode"],
                          "once": True, "http": client, "report_fn": lambda: report}  # fmt: skip
    one = run_agent("http://testserver", state_dir=tmp_path / "one", **kw)
    two = run_agent("http://testserver", state_dir=tmp_path / "two", **kw)
    assert one is not None and two is not None and one.source_id != two.source_id
    # Each keeps heartbeating its own source: no fight, again and again.
    for _ in range(3):
        assert run_agent("http://testserver", state_dir=tmp_path / "one", **kw) == one
        assert run_agent("http://testserver", state_dir=tmp_path / "two", **kw) == two
    assert call("DescribeSourceServers")["TotalCount"] == 2
    assert registered_count(call, token["AccessTokenId"]) == "2"


def test_state_dir_copied_to_another_machine_is_a_new_source(
    client: TestClient, call: Any, token: dict[str, str], tmp_path: Path
) -> None:
    kw: dict[str, Any] = {"token_id": token["AccessTokenId"], "token_code": token["AccessTokenCode"],
                          "once": True, "http": client}  # fmt: skip
    state = tmp_path / "state"
    first = run_agent("http://testserver", state_dir=state, report_fn=lambda: make_report("machine-1"), **kw)
    clone = tmp_path / "clone"
    clone.mkdir()
    for f in state.iterdir():
        (clone / f.name).write_bytes(f.read_bytes())
    second = run_agent("http://testserver", state_dir=clone, report_fn=lambda: make_report("machine-2"), **kw)
    assert first is not None and second is not None and first.source_id != second.source_id
    assert agent_state.instance_id(clone, "machine-2") != agent_state.instance_id(state, "machine-1")


def test_copied_state_dir_on_an_online_source_stops_instead_of_fighting(
    client: TestClient, call: Any, token: dict[str, str], tmp_path: Path
) -> None:
    report = make_report("m-x")
    kw: dict[str, Any] = {"token_id": token["AccessTokenId"], "token_code": token["AccessTokenCode"],
                          "once": True, "http": client, "report_fn": lambda: report}  # fmt: skip
    first = run_agent("http://testserver", state_dir=tmp_path / "a", **kw)
    assert first is not None
    # Another agent with this identity but without the credential (say agent.json lost
    # while a copy of instance.json lives on) is refused for good, not retried.
    other = tmp_path / "b"
    other.mkdir()
    (other / agent_state.INSTANCE_FILE).write_bytes((tmp_path / "a" / agent_state.INSTANCE_FILE).read_bytes())
    with pytest.raises(AgentError, match="IdentityConflict"):
        run_agent("http://testserver", state_dir=other, **kw)
    assert run_agent("http://testserver", state_dir=tmp_path / "a", **kw) == first
    assert registered_count(call, token["AccessTokenId"]) == "1"


def test_instance_id_is_validated(client: TestClient, token: dict[str, str]) -> None:
    for bad in ("short", "x" * 65, "a b" * 10, 12345678901234567890):
        resp = reg(client, token, "m-1", instance_id=bad)
        assert resp.status_code == 400 and resp.json()["code"] == "InvalidInstanceId", bad


def test_migration_gives_old_sources_their_machine_identity(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'old.db'}")
    upgrade(db, "0001")
    with db.engine.begin() as conn:
        conn.execute(text("INSERT INTO accounts (id, name, created_at) VALUES ('acc-1', 'a', '2024-01-01')"))
        conn.execute(
            text(
                "INSERT INTO sources (id, account_id, name, description, state, error_code, status_info, job_id, "
                "workgroup_id, resource_group_id, agent_version, architecture, platform, kernel_level, "
                "heartbeat_rate, replication_driver, system_info, system_disk_size, disks, machine_id, "
                "agent_secret_hash, registered_with, created_at) VALUES ('s-1', 'acc-1', 'n', '', 'Available', "
                "'', '', '', '', '', '', '', '', 0, 10, 'SMT', '{}', 0, '[]', 'old-machine', 'h', '', '2024-01-01')"
            )
        )
    upgrade(db)
    with db.engine.connect() as conn:
        assert conn.execute(select(sources.c.instance_id)).scalar_one() == "machine:old-machine"
    db.dispose()


def test_a_registration_sent_again_after_its_answer_was_lost_proves_itself(
    client: TestClient, call: Any, now: list[datetime]
) -> None:
    """Found by the 200-agent load run: the server registered the source, the agent timed out
    before the answer, and its retry looked like a second agent claiming an online source."""
    one_use: dict[str, str] = call("CreateAccessToken", Count="1", TimeToLiveInDays="1")
    secret = "s" * 43
    first = reg(client, one_use, "m-lost", instance_id="c" * 32, registration_secret=secret)
    assert first.status_code == 200, first.text  # ... and the answer never reaches the agent
    again = reg(client, one_use, "m-lost", instance_id="c" * 32, registration_secret=secret)
    assert again.status_code == 200, again.text  # no second use of the one-use code is needed
    assert again.json()["source_id"] == first.json()["source_id"]
    assert again.json()["agent_token"] == first.json()["agent_token"] == f"{first.json()['source_id']}.{secret}"
    assert beat(client, again.json()["agent_token"]).status_code == 200
    # Another secret is no proof: while the source is online it is a conflict, as before.
    other = reg(client, one_use, "m-lost", instance_id="c" * 32, registration_secret="t" * 43)
    assert other.status_code == 409 and other.json()["code"] == "SourceServer.IdentityConflict"


@pytest.mark.parametrize("bad", ["short", "x" * 129, "no spaces allowed in it, none at all......", 42])
def test_a_malformed_registration_secret_is_refused(client: TestClient, token: dict[str, str], bad: Any) -> None:
    r = reg(client, token, "m-bad", instance_id="d" * 32, registration_secret=bad)
    assert r.status_code == 400 and r.json()["code"] == "InvalidRegistrationSecret", r.text


def test_the_agent_keeps_its_registration_secret_until_it_has_a_credential(tmp_path: Path) -> None:
    a = agent_state.registration_secret(tmp_path, "i" * 32)
    assert agent_state.registration_secret(tmp_path, "i" * 32) == a and len(a) >= 32  # a retry sends the same
    assert agent_state.registration_secret(tmp_path, "j" * 32) != a  # another identity, another secret
    b = agent_state.registration_secret(tmp_path, "i" * 32)
    agent_state.save(tmp_path, agent_state.AgentState("http://s", "s-1", f"s-1.{b}", "m"))
    assert not (tmp_path / agent_state.REGISTRATION_FILE).exists()  # over: the secret is the token's now
    assert agent_state.registration_secret(tmp_path, "i" * 32) != b  # a later registration proposes a new one
