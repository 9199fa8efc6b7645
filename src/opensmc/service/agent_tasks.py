"""The agent's side of a job run: its task, its receiver credential, progress and result.

A job in Running/Syncing is the source's task (:func:`tasks_for`): the
receiver to send to, a credential scoped to that run (:func:`data_token`,
checked by :func:`authorize`), the disks with the staging volume each goes to.
The agent reports progress (:func:`progress`, whose reply says whether to go
on and at what bandwidth) and the result (:func:`task_result`, which moves
the job to Processing).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
from typing import Any

from opensmc.domain import strictjson
from opensmc.domain.errors import SmcError
from opensmc.domain.runs import is_syncing_run
from opensmc.service import jobs as job_service
from opensmc.service.context import Services
from opensmc.service.space import DISK_FULL_CODE
from opensmc.service.staging import (
    CHUNK_SIZE,
    fail,
    job_of_volume,
    part_volume_id,
    selected_disks,
    staging_id,
    volume_id,
)
from opensmc.store import dataplane as q
from opensmc.store import jobs as job_store

log = logging.getLogger("opensmc.dataplane")


def replication_parameters(raw: str | None) -> dict[str, Any]:
    try:
        # strict: a row written before NaN was refused must not break every heartbeat
        value = strictjson.loads(raw or "{}")
    except strictjson.StrictJsonError:
        return {}
    return value if isinstance(value, dict) else {}


def data_token(svc: Services, job_id: str, run_id: int) -> str:
    """The receiver credential of one job run: valid only while that run is Syncing."""
    return f"{job_id}.{run_id}.{svc.secrets.mac(f'data:{job_id}:{run_id}')}"


def current_run(svc: Services, job_id: str) -> tuple[str, str, int | None]:
    """(status, business status, id of the open run) of a job; empty strings if it is gone."""
    with svc.db.connect() as conn:
        row = q.job_status(conn, job_id)
        if row is None:
            return ("", "", None)
        run = job_store.open_run(conn, job_id)
    return (row.status, row.business_status, run.id if run else None)


_auth_cache: dict[str, tuple[float, bool]] = {}
#: A data token is `<job id>.<run>.<hex HMAC-SHA256>`, well under this.
_MAX_TOKEN = 256
_auth_lock = threading.Lock()


def authorize(svc: Services, token: str, vid: str) -> bool:
    """May `token` write to volume `vid`? Only the current Syncing run of the volume's job."""
    now = time.monotonic()
    key = f"{token}|{vid}"
    with _auth_lock:
        hit = _auth_cache.get(key)
        if hit and now - hit[0] < 2.0:
            return hit[1]
    ok = _authorize(svc, token, vid)
    if ok:
        # Only verified credentials are cached: caching refusals let anyone grow the
        # cache with junk tokens (10,000 of 8 KB = 80 MiB). A refusal costs one HMAC
        # (no database read unless the MAC is right), so it need not be cached.
        with _auth_lock:
            if len(_auth_cache) > 10_000:
                _auth_cache.clear()
            _auth_cache[key] = (now, ok)
    return ok


def _authorize(svc: Services, token: str, vid: str) -> bool:
    if len(token) > _MAX_TOKEN:
        return False
    parts = token.split(".")
    # isascii: str.isdigit() also holds for "²", which int() refuses (a 500, not a 403)
    if len(parts) != 3 or not (parts[1].isascii() and parts[1].isdigit()):
        return False
    job_id, run_text, _mac = parts
    if not hmac.compare_digest(token, data_token(svc, job_id, int(run_text))):
        return False
    if job_of_volume(vid) != job_id:
        return False
    return is_syncing_run(*current_run(svc, job_id), int(run_text))


def _params_view(raw: str | None) -> dict[str, Any]:
    """The replication parameters a task carries (and a running task reacts to)."""
    params = replication_parameters(raw)
    return {
        "bandwidth_limit": float(params.get("bandwidth_limit") or 0),
        "compress_level": int(params.get("compress_level") or 0),
        "checksum": bool(params.get("checksum") or False),
    }


def _version(entries: list[tuple[str, int, dict[str, Any], str]]) -> str:
    """A short name for a task view: what the agent sends back as ``since``.

    It covers what a task's agent must react to: which job run is wanted, its
    replication parameters (a bandwidth change is a new version) and the
    receiver to send to (a run handed over to another receiver is a new version).
    """
    text = json.dumps(sorted([job, run, params, recv] for job, run, params, recv in entries), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def receiver_of(svc: Services, placed: str | None) -> str:
    """The URL a run sends to: the receiver it was placed on, else this server's own."""
    return placed or svc.settings.receiver_endpoint


def view_version(svc: Services, source_id: str) -> str:
    """The version of the source's task view, in two indexed queries (the long-poll asks it often)."""
    with svc.db.connect() as conn:
        found = q.syncing_run_of_source(conn, source_id)
    return _version([(job, run, _params_view(raw), receiver_of(svc, recv)) for job, run, raw, recv in found])


#: sources per query of :func:`view_versions`
VERSIONS_PER_QUERY = 500


def view_versions(svc: Services, source_ids: list[str]) -> dict[str, str]:
    """:func:`view_version` of many sources, in one query per :data:`VERSIONS_PER_QUERY`.

    What the open long-polls of a process share: one read for all of them per
    poll interval, instead of one each.
    """
    out: dict[str, str] = {}
    with svc.db.connect() as conn:
        for i in range(0, len(source_ids), VERSIONS_PER_QUERY):
            for sid, found in q.syncing_runs_of_sources(conn, source_ids[i : i + VERSIONS_PER_QUERY]).items():
                out[sid] = _version([(j, r, _params_view(raw), receiver_of(svc, recv)) for j, r, raw, recv in found])
    return out


def task_view(svc: Services, source_id: str) -> dict[str, Any]:
    """What ``GET /agent/v1/tasks`` answers: the version and the tasks."""
    tasks = tasks_for(svc, source_id)
    version = _version([(t["job_id"], t["run_id"], t["replication_parameters"], t["receiver"]) for t in tasks])
    return {"version": version, "tasks": tasks}


def tasks_for(svc: Services, source_id: str) -> list[dict[str, Any]]:
    """The work a source's agent should be doing now (at most one task: one job per source)."""
    with svc.db.connect() as conn:
        found = q.syncing_job_of_source(conn, source_id)
    if found is None:
        return []
    job, disks_json = found
    _s, _b, run_id = current_run(svc, job.id)
    if run_id is None:
        return []
    try:
        disks = selected_disks(job, disks_json)
    except SmcError:
        return []
    ti = job.transition_instance_id or staging_id(job.id)
    return [
        {
            "task_id": f"{job.id}:{run_id}",
            "job_id": job.id,
            "run_id": run_id,
            "receiver": receiver_of(svc, job.receiver),
            "token": data_token(svc, job.id, run_id),
            "replication_parameters": _params_view(job.replication_parameters),
            "chunk_size": CHUNK_SIZE,
            "disks": [_disk_task(d, volume_id(ti, d["index"])) for d in disks],
        }
    ]


def _disk_task(disk: dict[str, Any], vid: str) -> dict[str, Any]:
    out = {**disk, "volume_id": vid}
    if disk.get("files"):
        out["files"] = [{**f, "volume_id": part_volume_id(vid, f["device"])} for f in disk["files"]]
    return out


def _task_ids(body: dict[str, Any]) -> tuple[str, int]:
    job_id = body.get("job_id")
    run_id = body.get("run_id")
    if not isinstance(job_id, str) or not isinstance(run_id, int):
        raise SmcError("job_id (string) and run_id (integer) are required.", code="InvalidTask", http_status=400)
    return job_id, run_id


def _owned(svc: Services, source_id: str, job_id: str) -> None:
    with svc.db.connect() as conn:
        row = q.job_status(conn, job_id)
    if row is None or row.source_id != source_id:
        raise SmcError(f"Job {job_id} is not a job of this source.", code="InvalidTask", http_status=404)


def progress(svc: Services, source_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """Record progress; tell the agent whether to go on and at what bandwidth."""
    job_id, run_id = _task_ids(body)
    _owned(svc, source_id, job_id)
    done = body.get("bytes_done")
    total = body.get("bytes_total")
    go_on = is_syncing_run(*current_run(svc, job_id), run_id)
    files_done, files_total = body.get("files_done"), body.get("files_total")
    files = None
    if isinstance(files_done, int) and isinstance(files_total, int) and 0 <= files_done <= files_total:
        files = (files_done, files_total)  # a file-level partition: files checked, of those rsync knows
    if go_on and isinstance(done, int) and isinstance(total, int) and done >= 0 and total >= 0:
        try:
            job_service.report_progress(svc, job_id, run_id, min(done, total), total, files)
        except SmcError:
            go_on = False
    with svc.db.connect() as conn:
        row = q.job_status(conn, job_id)
    params = replication_parameters(row.replication_parameters) if row else {}
    return {"continue": go_on, "bandwidth_limit": float(params.get("bandwidth_limit") or 0)}


#: StatusInfo codes of a run whose source was written while it was read (agent/writewatch.py)
SOURCE_RESYNCED = "Source.WrittenDuringSync.Resynced"
SOURCE_INCONSISTENT = "Source.WrittenDuringSync"


def source_writes_info(stats: Any) -> str | None:
    """The StatusInfo of a run whose source disk was written during the sync (None: it was not)."""
    seen = stats.get("source_writes") if isinstance(stats, dict) else None
    if not isinstance(seen, dict) or not seen.get("disks_written"):
        return None
    disks = ", ".join(str(d) for d in seen.get("disks_written") or [])[:300]
    changing = ", ".join(str(d) for d in seen.get("still_changing") or [])[:300]
    if changing:
        return json.dumps(
            {
                "warning_code": SOURCE_INCONSISTENT,
                "warning_msg": f"The source disk(s) {changing} kept being written while they were read, also "
                "during the extra passes: the image may be inconsistent (it matches no single moment of the "
                "disk). For a consistent image stop the services that write, or migrate from a snapshot "
                "(docs/operations.md), and run the job again.",
            }
        )
    return json.dumps(
        {
            "warning_code": SOURCE_RESYNCED,
            "warning_msg": f"The source disk(s) {disks} were written while they were read; the agent read them "
            f"again and sent what changed ({seen.get('passes_with_writes')} extra pass(es)), so the image "
            "is the disk as it was at the end of the run.",
        }
    )


def task_result(svc: Services, source_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """The agent finished (or failed) a task."""
    job_id, run_id = _task_ids(body)
    _owned(svc, source_id, job_id)
    status, business, current = current_run(svc, job_id)
    if not is_syncing_run(status, business, current, run_id):
        return {"accepted": False, "reason": f"the job is {status}({business}), not syncing run {run_id}"}
    if body.get("ok") is True:
        stats = body.get("stats", {})
        with svc.db.begin() as conn:
            q.record_synced_run(conn, run_id, int(body.get("bytes_total") or 0), stats)
            written = source_writes_info(stats)
            if written is not None:
                job_store.update_job(conn, job_id, {"status_info": written})
        job_service.mark_synced(svc, job_id)
        return {"accepted": True}
    code = str(body.get("error_code") or "Agent.SyncFailed")[:64]
    message = str(body.get("message") or "The agent could not send the disk data.")[:1000]
    fail(svc, job_id, code, message)
    return {"accepted": True}


def receiver_disk_full(svc: Services, vid: str, message: str) -> None:
    """The receiver refused a write to volume `vid` for a full disk: its job turns InError, saying so."""
    job_id = job_of_volume(vid)
    if job_id is not None:
        fail(svc, job_id, DISK_FULL_CODE, message)
