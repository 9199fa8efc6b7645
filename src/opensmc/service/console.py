"""What the web console shows beyond the SMC API: a job's events and run byte counts, sources' last heartbeat.

Per account, like every action: another account's job is InvalidJobId.NotFound.
"""

from __future__ import annotations

import json
from typing import Any

from opensmc.clock import as_utc, iso
from opensmc.service.context import Caller, Services
from opensmc.store import history
from opensmc.store import jobs as jobs_q


def _detail(text: str) -> Any:
    try:
        return json.loads(text) if text else {}
    except ValueError:
        return {"detail": text}


def _state(status: str, business: str) -> str:
    return f"{status}/{business}" if business else status


def job_detail(svc: Services, caller: Caller, job_id: str) -> dict[str, Any]:
    with svc.db.connect() as conn:
        jobs_q.get_job(conn, job_id, caller.account_id)  # InvalidJobId.NotFound for anyone else's
        events = history.events_of(conn, job_id)
        runs = jobs_q.runs_of(conn, [job_id])[job_id]
    return {
        "JobId": job_id,
        "Events": [
            {
                "Time": iso(as_utc(e.at)),
                "Event": e.event,
                "From": _state(e.from_status, e.from_business),
                "To": _state(e.to_status, e.to_business),
                "Detail": _detail(e.detail),
            }
            for e in events
        ],
        "Runs": [
            {
                "RunId": r.id,
                "Type": r.type,
                "StartTime": iso(as_utc(r.start_time)),
                "EndTime": iso(as_utc(r.end_time)),
                "BytesDone": int(r.bytes_done or 0),
                "BytesTotal": int(r.bytes_total or 0),
                "ImageId": r.image_id,
                "ChecksumVerified": r.checksum_verified,
            }
            for r in runs
        ],
    }


def progress(svc: Services, caller: Caller) -> list[dict[str, Any]]:
    with svc.db.connect() as conn:
        rows = history.open_runs(conn, caller.account_id)
    return [
        {
            "JobId": r.job_id,
            "RunId": r.run_id,
            "BytesDone": int(r.bytes_done or 0),
            "BytesTotal": int(r.bytes_total or 0),
        }
        for r in rows
    ]


def heartbeats(svc: Services, caller: Caller) -> list[dict[str, Any]]:
    with svc.db.connect() as conn:
        rows = history.heartbeats(conn, caller.account_id)
    return [{"SourceId": r.id, "LastHeartbeatTime": iso(as_utc(r.last_heartbeat_at))} for r in rows]
