"""The console's signed routes: a job's events and runs with bytes, running jobs' bytes, sources' last heartbeat."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime

import httpx
import pytest
from sqlalchemy import update

from opensmc import API_VERSION
from opensmc.api.app import create_app
from opensmc.service.accounts import KeyPair, create_account
from opensmc.service.context import Caller, Services
from opensmc.signer import sign_acs3
from opensmc.store.tables import job_runs, sources
from tests.conftest import ActionCaller
from tests.integration.jobs_support import T0, Clock, add_source
from tests.live_server import running

PREFIX = "/opensmc/v1/console"


@pytest.fixture
def base(services: Services) -> Iterator[str]:
    with running(create_app(services)) as endpoint:
        yield f"http://{endpoint}"


def get(base: str, key: KeyPair, path: str, action: str, now: datetime | None = None) -> httpx.Response:
    _query, headers = sign_acs3(
        "GET", base.removeprefix("http://"), action, API_VERSION, {}, key.access_key_id, key.access_key_secret,
        now, path=path,
    )  # fmt: skip
    return httpx.get(base + path, headers=headers, timeout=30)


def test_history_progress_and_heartbeats(base: str, services: Services) -> None:
    services.clock = Clock(T0)  # type: ignore[method-assign]
    owner, other = create_account(services, "owner"), create_account(services, "other")
    caller = Caller(owner.account_id, owner.access_key_id)
    sid = add_source(services, caller)
    with services.db.begin() as conn:
        conn.execute(update(sources).where(sources.c.id == sid).values(last_heartbeat_at=T0))
    call = ActionCaller(services, caller)
    job_id = call("CreateReplicationJob", RegionId="local", SourceId=sid, Name="shown")["JobId"]
    call("StartReplicationJob", JobId=job_id)
    with services.db.begin() as conn:
        conn.execute(
            update(job_runs).where(job_runs.c.job_id == job_id).values(bytes_done=5 << 20, bytes_total=70 << 30)
        )

    history = get(base, owner, f"{PREFIX}/jobs/{job_id}", "DescribeJobHistory", T0)
    assert history.status_code == 200, history.text
    doc = history.json()
    assert [(e["Event"], e["From"], e["To"]) for e in doc["Events"]] == [
        ("create", "Ready", "Ready"), ("start", "Ready", "Running/Preparing")
    ]
    assert doc["Events"][1]["Detail"] == {"run_id": 1, "type": "Manual"}
    (run,) = doc["Runs"]
    assert (run["Type"], run["BytesDone"], run["BytesTotal"], run["EndTime"]) == ("Manual", 5 << 20, 70 << 30, "")

    progress = get(base, owner, f"{PREFIX}/progress", "DescribeJobProgress", T0).json()["Jobs"]
    assert progress == [{"JobId": job_id, "RunId": run["RunId"], "BytesDone": 5 << 20, "BytesTotal": 70 << 30}]
    beats = get(base, owner, f"{PREFIX}/heartbeats", "DescribeSourceHeartbeats", T0).json()["Sources"]
    assert beats == [{"SourceId": sid, "LastHeartbeatTime": "2030-01-01T12:00:00Z"}]

    # another account sees none of it
    hidden = get(base, other, f"{PREFIX}/jobs/{job_id}", "DescribeJobHistory", T0)
    assert hidden.status_code == 404 and hidden.json()["Code"] == "InvalidJobId.NotFound"
    assert get(base, other, f"{PREFIX}/progress", "DescribeJobProgress", T0).json()["Jobs"] == []
    assert get(base, other, f"{PREFIX}/heartbeats", "DescribeSourceHeartbeats", T0).json()["Sources"] == []


def test_console_routes_are_signed(base: str, services: Services) -> None:
    key = create_account(services, "k")
    assert httpx.get(f"{base}{PREFIX}/progress").status_code == 401
    wrong = get(base, key, f"{PREFIX}/progress", "DownloadImage")  # a signature for another action
    assert wrong.status_code == 404 and wrong.json()["Code"] == "InvalidAction.NotFound"
    _q, headers = sign_acs3("GET", base.removeprefix("http://"), "DescribeJobProgress", API_VERSION, {},
                            key.access_key_id, key.access_key_secret, path=f"{PREFIX}/heartbeats")  # fmt: skip
    moved = httpx.get(f"{base}{PREFIX}/progress", headers=headers, timeout=30)  # signed for another path
    assert moved.json()["Code"] == "SignatureDoesNotMatch"


def test_console_reads_are_in_the_access_log(base: str, services: Services, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    key = create_account(services, "audited")
    caplog.set_level(logging.INFO, logger="opensmc.api.access")
    answer = get(base, key, f"{PREFIX}/heartbeats", "DescribeSourceHeartbeats")
    assert answer.status_code == 200
    httpx.get(f"{base}/healthz")  # at DEBUG only: a load balancer asks every few seconds
    (record,) = [r for r in caplog.records if r.name == "opensmc.api.access"]
    fields = record.fields  # type: ignore[attr-defined]
    assert (fields["method"], fields["path"], fields["http_status"]) == ("GET", f"{PREFIX}/heartbeats", 200)
    assert fields["account_id"] == key.account_id and fields["request_id"] == answer.headers["x-acs-request-id"]
