"""Operating the server: /healthz, /readyz, /metrics, the API access log and the job transition log."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update

from opensmc import API_VERSION, logs
from opensmc.api.app import create_app
from opensmc.domain.transitions import JobEvent
from opensmc.service.accounts import KeyPair, create_account
from opensmc.service.context import Caller, Services
from opensmc.signer import sign_acs3
from opensmc.store import jobs as jobs_q
from opensmc.store.db import Database
from opensmc.store.tables import sources
from tests.conftest import ActionCaller
from tests.integration.jobs_support import T0, Clock, add_source
from tests.live_server import running


@pytest.fixture
def key(services: Services) -> KeyPair:
    return create_account(services, "ops")


@pytest.fixture
def client(services: Services) -> Iterator[httpx.Client]:
    with running(create_app(services)) as endpoint, httpx.Client(base_url=f"http://{endpoint}", timeout=10) as c:
        yield c


def signed(client: httpx.Client, key: KeyPair, action: str, params: dict[str, str] | None = None) -> httpx.Response:
    qs, headers = sign_acs3(
        "POST", client.base_url.netloc.decode(), action, API_VERSION, params or {},
        key.access_key_id, key.access_key_secret,
    )  # fmt: skip
    return client.post(f"/?{qs}", headers=headers)


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


# health -------------------------------------------------------------------------------------------


def test_healthz_and_readyz(client: httpx.Client, services: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    assert client.get("/healthz").text == "ok\n"
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"ready": True, "checks": {"database": "ok", "data_dir": "ok", "free_space": "ok"}}
    monkeypatch.setenv("OPENSMC_READY_MIN_FREE_MIB", str(1 << 40))  # an exbibyte: never free
    full = client.get("/readyz")
    assert full.status_code == 503 and "below" in full.json()["checks"]["free_space"]
    monkeypatch.delenv("OPENSMC_READY_MIN_FREE_MIB")
    shutil.rmtree(services.settings.data_dir)
    gone = client.get("/readyz")
    assert gone.status_code == 503 and gone.json()["checks"]["data_dir"].startswith("not writable")
    assert client.get("/healthz").status_code == 200  # the process still serves


def test_readyz_without_a_database(services: Services) -> None:
    dead = Services(db=Database("postgresql://nobody@127.0.0.1:9/none"), settings=services.settings,
                    secrets=services.secrets)  # fmt: skip
    with running(create_app(dead)) as endpoint:
        answer = httpx.get(f"http://{endpoint}/readyz", timeout=30)
    assert answer.status_code == 503
    assert answer.json()["checks"]["database"].startswith("unreachable")
    dead.db.dispose()


# the access log and request metrics ---------------------------------------------------------------


def test_every_api_call_is_logged_once_and_counted(
    client: httpx.Client, key: KeyPair, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="opensmc.api.access")
    ok = signed(client, key, "DescribeSourceServers")
    bad = signed(client, key, "StartReplicationJob", {"JobId": "j-nope"})
    unknown = signed(client, key, "DescribeNothing")
    assert (ok.status_code, bad.status_code, unknown.status_code) == (200, 404, 404)
    records = [r for r in caplog.records if r.name == "opensmc.api.access"]
    fields = [r.fields for r in records]  # type: ignore[attr-defined]
    assert [f["request_id"] for f in fields] == [
        r.headers["x-acs-request-id"] for r in (ok, bad, unknown)
    ]
    assert fields[0]["action"] == "DescribeSourceServers" and fields[0]["http_status"] == 200
    assert fields[0]["account_id"] == key.account_id and fields[0]["access_key_id"] == key.access_key_id
    assert fields[0]["error_code"] == "" and fields[0]["duration_ms"] >= 0
    assert (fields[1]["action"], fields[1]["http_status"], fields[1]["error_code"]) == (
        "StartReplicationJob", 404, "InvalidJobId.NotFound"
    )
    assert fields[2]["error_code"] == "InvalidAction.NotFound" and fields[2]["access_key_id"] == ""
    assert f"RequestId={fields[1]['request_id']}" in records[1].getMessage()

    found = samples(client.get("/metrics").text)
    assert value(found, "opensmc_api_requests_total", action="DescribeSourceServers", code="OK") == 1
    assert value(found, "opensmc_api_requests_total", action="StartReplicationJob", code="InvalidJobId.NotFound") == 1
    assert value(found, "opensmc_api_requests_total", action="unknown", code="InvalidAction.NotFound") == 1
    assert value(found, "opensmc_api_request_duration_seconds_count", action="DescribeSourceServers") == 1
    # /metrics itself is not an API call: nothing more was logged
    assert len([r for r in caplog.records if r.name == "opensmc.api.access"]) == 3


# state metrics ------------------------------------------------------------------------------------


def test_state_metrics(client: httpx.Client, services: Services, key: KeyPair) -> None:
    clock = Clock(T0)
    services.clock = clock  # type: ignore[method-assign]
    caller = Caller(key.account_id, key.access_key_id)
    sid = add_source(services, caller)
    with services.db.begin() as conn:
        conn.execute(update(sources).where(sources.c.id == sid).values(last_heartbeat_at=T0))
    call = ActionCaller(services, caller)
    job_id = call("CreateReplicationJob", RegionId="local", SourceId=sid, Name="metered")["JobId"]
    call("CreateReplicationJob", RegionId="local", SourceId=add_source(services, caller), Name="idle")
    call("StartReplicationJob", JobId=job_id)
    clock.advance(seconds=42)

    text = client.get("/metrics").text
    found = samples(text)
    assert value(found, "opensmc_jobs", status="Running", business_status="Preparing") == 1
    assert value(found, "opensmc_jobs", status="Ready", business_status="") == 1
    assert value(found, "opensmc_job_progress_ratio", job_id=job_id) == 0
    assert value(found, "opensmc_job_bytes_done", job_id=job_id) == 0
    assert value(found, "opensmc_agents", state="InUse") == 1
    assert value(found, "opensmc_agents", state="Available") == 1
    assert value(found, "opensmc_agent_heartbeat_age_seconds", source_id=sid) == 42
    assert (value(found, "opensmc_data_dir_free_bytes") or 0) > 0
    assert value(found, "opensmc_image_store_bytes") == 0
    assert value(found, "opensmc_receiver_bytes_total", kind="plain") is not None  # counted by this process
    assert value(found, "opensmc_receiver_frames_total") is not None
    assert key.account_id not in text and key.access_key_id not in text


# the job transition log ---------------------------------------------------------------------------


def transitions(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [r.fields for r in caplog.records if r.name == "opensmc.jobs"]  # type: ignore[attr-defined]


def test_job_transitions_are_logged_with_the_job(
    services: Services, caller: Caller, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="opensmc.jobs")
    call = ActionCaller(services, caller)
    job_id = call("CreateReplicationJob", RegionId="local", SourceId=add_source(services, caller), Name="logged")[
        "JobId"
    ]
    call("StartReplicationJob", JobId=job_id)
    from opensmc.service import jobs as job_service

    job_service.mark_failed(services, job_id, "SourceServerOffline", "gone")
    got = [(f["job_id"], f["from"], f["to"], f["reason"]) for f in transitions(caplog)]
    assert got == [
        (job_id, "Ready", "Ready", "create"),
        (job_id, "Ready", "Running/Preparing", "start run_id=1 type=Manual"),
        (job_id, "Running/Preparing", "InError", "fail error_code=SourceServerOffline"),
    ]
    messages = [r.getMessage() for r in caplog.records]
    assert f"job {job_id}: Ready -> Running/Preparing (start run_id=1 type=Manual)" in messages


def test_a_rolled_back_transition_is_not_logged(
    services: Services, caller: Caller, caplog: pytest.LogCaptureFixture
) -> None:
    call = ActionCaller(services, caller)
    job_id = call("CreateReplicationJob", RegionId="local", SourceId=add_source(services, caller), Name="undone")[
        "JobId"
    ]
    caplog.set_level(logging.INFO, logger="opensmc.jobs")
    with pytest.raises(RuntimeError), services.db.begin() as conn:
        jobs_q.transition(conn, job_id, JobEvent.START, services.clock() + timedelta(seconds=1))
        raise RuntimeError("abort")
    assert transitions(caplog) == []
    with services.db.begin() as conn:  # the next transaction on a pooled connection logs only its own
        jobs_q.transition(conn, job_id, JobEvent.START, services.clock())
    assert [f["reason"] for f in transitions(caplog)] == ["start"]


def test_json_log_lines() -> None:
    record = logging.LogRecord("opensmc.jobs", logging.INFO, __file__, 1, "job %s moved", ("j-1",), None)
    record.fields = {"job_id": "j-1", "to": "Running/Preparing"}
    doc = json.loads(logs.JsonFormatter().format(record))
    assert doc["message"] == "job j-1 moved" and doc["level"] == "info" and doc["logger"] == "opensmc.jobs"
    assert doc["job_id"] == "j-1" and doc["to"] == "Running/Preparing" and doc["time"].endswith("+00:00")


# the console's files ------------------------------------------------------------------------------


def test_console_files(client: httpx.Client) -> None:
    page = client.get("/console")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="/console/app.js">' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]  # no inline or foreign script
    script = client.get("/console/acs3.js")
    assert script.headers["content-type"].startswith("text/javascript") and "ACS3-HMAC-SHA256" in script.text
    assert client.get("/console/app.py").status_code == 404
    assert client.get("/console/..%2Fops.py").status_code == 404
    moved = client.get("/ui", follow_redirects=False)
    assert moved.status_code == 308 and moved.headers["location"] == "/console"
