"""The replication job life cycle (docs/architecture.md): user actions and the data-plane seam.

User actions: Start, Stop, CutOver, Delete (Create, Modify and Describe live
in ``jobs_create``, ``jobs_modify`` and ``jobs_describe``).

The data-plane seam: the receiver/orchestrator calls these as work really
happens; nothing here pretends to move data, so a started job stays in
Running/Preparing until :func:`mark_prepared` is called.

    mark_prepared(svc, job_id, transition_instance_id)   Preparing  → Syncing
    report_progress(svc, job_id, run_id, done, total)    (Syncing)  Progress = done/total*100
    mark_synced(svc, job_id)                              Syncing    → Processing
    mark_processed(svc, job_id, image_id)                 Processing → Cleaning
    mark_cleaned(svc, job_id)                             Cleaning   → Finished | Waiting
    mark_failed(svc, job_id, error_code, status_info)     Running/*  → InError
    finish_deletion(svc, job_id)                          Deleting   → gone

Each is one transaction: a guarded UPDATE plus a ``job_events`` row.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Row

from opensmc.domain.enums import JobStatus, RunType, SourceState
from opensmc.domain.errors import InvalidJobStatus, InvalidSourceState, SmcError
from opensmc.domain.runs import progress_percent
from opensmc.domain.transitions import JobEvent, State, describe, next_state
from opensmc.service import wakeup
from opensmc.service.context import Caller, Services
from opensmc.store import jobs as q
from opensmc.store import tags as tagq
from opensmc.store.tables import jobs as jobs_table

CROSS_ZONE = 2


class NotSupported(SmcError):
    code = "OperationDenied.NotSupported"
    http_status = 400


def _refuse_cross_zone(row: Row[Any]) -> None:
    if row.job_type == CROSS_ZONE:
        raise NotSupported(
            f"Job {row.id} is a cross-zone migration (JobType 2): it moves an ECS instance between "
            "zones, which OpenSMC cannot do (it manages no ECS instances). The job is kept for the "
            "record; delete it when no longer needed."
        )


def begin_run(
    conn: Connection,
    row: Row[Any],
    event: JobEvent,
    run_type: RunType,
    now: datetime,
    *,
    account_id: str | None = None,
    final_run: bool | None = None,
) -> int:
    """Running/Preparing with a new run; the source becomes InUse. Returns the run id."""
    next_state(event, q.state_of(row))  # the job's status is checked before the source's
    if not q.claim_source(conn, row.source_id, row.id):
        found = q.source_state(conn, row.source_id)
        current = found[0] if found else "Deleted"
        raise InvalidSourceState(current, [SourceState.AVAILABLE.value])
    values: dict[str, Any] = {
        "progress": 0.0,
        "error_code": "",
        "status_info": "",
        "has_run": True,
        "next_run_at": None,
        "end_time": None,
        "start_time": row.start_time or now,
    }
    if final_run is not None:
        values["final_run"] = final_run
    run_id = q.start_run(conn, row.id, run_type.value, now)
    q.transition(
        conn,
        row.id,
        event,
        now,
        account_id=account_id,
        values=values,
        detail={"run_id": run_id, "type": run_type},
    )
    return run_id


# user actions -----------------------------------------------------------------


def start_job(svc: Services, caller: Caller, job_id: str) -> None:
    now = svc.clock()
    with svc.db.begin() as conn:
        row = q.get_job(conn, job_id, caller.account_id, lock=True)
        _refuse_cross_zone(row)
        begin_run(conn, row, JobEvent.START, RunType.MANUAL, now, account_id=caller.account_id)
    wakeup.notify()  # the orchestrator prepares it now, not at its next pass


def stop_job(svc: Services, caller: Caller, job_id: str) -> None:
    now = svc.clock()
    with svc.db.begin() as conn:
        row = q.get_job(conn, job_id, caller.account_id, lock=True)
        q.transition(conn, job_id, JobEvent.STOP, now, account_id=caller.account_id, values={"next_run_at": None})
        q.close_open_runs(conn, job_id, now)
        q.release_source(conn, row.source_id, job_id)
    wakeup.notify()  # the agent's open channel answers at once: its task is gone


def cut_over_job(svc: Services, caller: Caller, job_id: str, sync_data: bool) -> None:
    now = svc.clock()
    with svc.db.begin() as conn:
        row = q.get_job(conn, job_id, caller.account_id, lock=True)
        event = JobEvent.CUTOVER_SYNC if sync_data else JobEvent.CUTOVER_NOW
        next_state(event, q.state_of(row))
        if row.run_once:
            raise InvalidJobStatus(f"{row.status} (RunOnce=true)", ["Waiting (incremental jobs, RunOnce=false)"])
        if sync_data:
            begin_run(conn, row, event, RunType.MANUAL, now, account_id=caller.account_id, final_run=True)
        else:
            # Nothing to release yet: staging is held only while a run is active.
            q.transition(
                conn,
                job_id,
                event,
                now,
                account_id=caller.account_id,
                values={"next_run_at": None, "end_time": now},
            )
    wakeup.notify()


def delete_job(svc: Services, caller: Caller, job_id: str) -> None:
    """→ Deleting; the orchestrator (or the data plane, once staging is released) finishes it."""
    now = svc.clock()
    with svc.db.begin() as conn:
        row = q.get_job(conn, job_id, caller.account_id, lock=True)
        q.transition(conn, job_id, JobEvent.DELETE, now, account_id=caller.account_id, values={"next_run_at": None})
        tagq.remove_tags(conn, q.JOB_RTYPE, job_id, None)
        q.release_source(conn, row.source_id, job_id)
    wakeup.notify()


def finish_deletion(svc: Services, job_id: str) -> bool:
    """Remove a Deleting job once its staging is released; False if it is not (or no longer) Deleting."""
    now = svc.clock()
    with svc.db.begin() as conn:
        row = q.lock_if_still(
            conn,
            job_id,
            jobs_table.c.status == JobStatus.DELETING.value,
            skip_locked=svc.db.supports_skip_locked,
        )
        if row is None:
            return False
        state = q.state_of(row)
        q.add_event(conn, job_id, "deleted", state, state, now)
        q.remove_job(conn, job_id)
    return True


# data-plane seam --------------------------------------------------------------


def mark_prepared(svc: Services, job_id: str, transition_instance_id: str) -> State:
    """Staging allocated and the task handed to the agent: Preparing → Syncing."""
    with svc.db.begin() as conn:
        _frm, to = q.transition(
            conn,
            job_id,
            JobEvent.PREPARED,
            svc.clock(),
            values={"transition_instance_id": transition_instance_id},
            detail={"transition_instance_id": transition_instance_id},
        )
    wakeup.notify()  # hands the task to the agent's open channel now
    return to


def report_progress(
    svc: Services, job_id: str, run_id: int, bytes_done: int, bytes_total: int, files: tuple[int, int] | None = None
) -> float:
    """Record a Syncing run's progress; returns Progress (0-99.99: 100 only once synced, see mark_synced).

    `bytes_done` is what the agent read of the selected disks *and* the receiver
    acknowledged (agent/pipeline.py). It only grows within a run: an attempt
    that resumes after lost contact counts again from 0 while it skips what the
    receiver holds, and Progress must not go back meanwhile. The run's
    ``detail`` JSON keeps ``progress``: bytes, a smoothed rate (bytes/s) and the
    ETA (seconds), which `opensmc watch` shows, and for a run copying files (``files``: checked,
    known to rsync so far) those counts.
    """
    if bytes_total < 0 or bytes_done < 0:
        raise ValueError("byte counts are never negative")
    now = svc.clock()
    with svc.db.begin() as conn:
        row = q.get_job(conn, job_id, lock=True)
        state = q.state_of(row)
        if row.status != JobStatus.RUNNING.value or row.business_status != "Syncing":
            raise InvalidJobStatus(describe(state), ["Running(Syncing)"])
        run = q.open_run(conn, job_id)
        if run is None or run.id != run_id:
            raise InvalidJobStatus(f"{describe(state)}, run {run_id} is not the job's current run", ["current run"])
        if int(run.bytes_total or 0) == bytes_total:
            bytes_done = max(bytes_done, int(run.bytes_done or 0))
        detail = _detail(run.detail)
        before = detail.get("progress")
        detail["progress"] = _rate_sample(before, bytes_done, bytes_total, now)
        if files is not None:
            detail["progress"].update(files_done=files[0], files_total=files[1])
        elif isinstance(before, dict) and "files_done" in before:  # a block range between two partitions
            detail["progress"].update({k: before.get(k) for k in ("files_done", "files_total")})
        progress = max(float(row.progress or 0), progress_percent(bytes_done, bytes_total, safe=False))
        q.update_run(
            conn, run_id, {"bytes_done": bytes_done, "bytes_total": bytes_total, "detail": json.dumps(detail)}
        )
        q.update_job(conn, job_id, {"progress": progress})
    return progress


@dataclass(frozen=True)
class RunProgress:
    """What a run record says about its data: DescribeReplicationJobs shows it on each ReplicationJobRun."""

    bytes_done: int
    bytes_total: int
    bytes_per_second: float  #: smoothed while syncing; the average once synced; 0 when unknown
    eta_seconds: float | None  #: None when unknown (no rate yet, or the run ended unsynced)
    #: a run with file-level partitions: files checked so far and files rsync knows of (all, once synced);
    #: None for a block-only run
    files_done: int | None = None
    files_total: int | None = None


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def run_progress(run: Row[Any]) -> RunProgress:
    """A job_runs row's progress, from its columns and its ``detail`` JSON."""
    done, total = int(run.bytes_done or 0), int(run.bytes_total or 0)
    detail = _detail(run.detail)
    sample = detail.get("progress")
    if isinstance(sample, dict) and run.end_time is None:
        rate = sample.get("rate")
        eta = sample.get("eta")
        return RunProgress(
            done,
            total,
            float(rate) if isinstance(rate, (int, float)) else 0.0,
            float(eta) if isinstance(eta, (int, float)) else None,
            _count(sample.get("files_done")),
            _count(sample.get("files_total")),
        )
    agent = detail.get("agent")
    files = _count(agent.get("files")) if isinstance(agent, dict) else None
    seconds = agent.get("seconds") if isinstance(agent, dict) else None
    if isinstance(seconds, (int, float)) and seconds > 0:  # synced: the agent's own totals
        return RunProgress(done, total, round(total / seconds, 1), 0.0, files, files)
    return RunProgress(done, total, 0.0, None, files, files)


#: weight of the newest sample in the smoothed rate: a few seconds of memory at one report a second
RATE_WEIGHT = 0.3


def _detail(raw: str | None) -> dict[str, Any]:
    try:
        value = json.loads(raw or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _rate_sample(prev: Any, done: int, total: int, now: datetime) -> dict[str, Any]:
    """The run's progress record after one more sample: bytes, rate (bytes/s, smoothed) and ETA (s)."""
    rate: float | None = None
    if isinstance(prev, dict) and isinstance(prev.get("at"), str):
        rate = prev.get("rate") if isinstance(prev.get("rate"), (int, float)) else None
        try:
            seconds = (now - datetime.fromisoformat(prev["at"])).total_seconds()
        except (TypeError, ValueError):
            seconds = 0.0
        if seconds <= 0:  # two reports in one clock tick: keep the last sample as it was
            return {**prev, "bytes_done": done, "bytes_total": total}
        moved = max(0, done - int(prev.get("bytes_done") or 0))
        instant = moved / seconds
        rate = instant if rate is None else RATE_WEIGHT * instant + (1 - RATE_WEIGHT) * rate
    eta = round((total - done) / rate, 1) if rate and rate > 0 else None
    return {
        "bytes_done": done,
        "bytes_total": total,
        "rate": None if rate is None else round(rate, 1),
        "eta": eta,
        "at": now.isoformat(),
    }


def mark_synced(svc: Services, job_id: str) -> State:
    """The agent reported every disk synced: Syncing → Processing."""
    with svc.db.begin() as conn:
        # Syncing ends only on the agent's result, sent after its final flush was
        # acknowledged: every byte is safe on the receiver, so Progress may say 100.
        _frm, to = q.transition(
            conn, job_id, JobEvent.SYNCED, svc.clock(), values={"progress": progress_percent(1, 1, safe=True)}
        )
    wakeup.notify()  # the orchestrator seals the image now
    return to


def mark_processed(
    svc: Services, job_id: str, image_id: str, *, also: Callable[[Connection], None] | None = None
) -> State:
    """The run's image exists: Processing → Cleaning.

    `also` runs in the same transaction (the image row becomes Available in it),
    so a crash leaves either an unfinished image of a job still Processing, or
    an Available image of a job in Cleaning: never both steps half done.
    """
    now = svc.clock()
    with svc.db.begin() as conn:
        if also is not None:
            also(conn)
        _frm, to = q.transition(
            conn,
            job_id,
            JobEvent.PROCESSED,
            now,
            values={"image_id": image_id},
            detail={"image_id": image_id},
        )
        run = q.open_run(conn, job_id)
        if run is not None:
            q.update_run(conn, run.id, {"image_id": image_id})
    wakeup.notify()  # the orchestrator cleans up now
    return to


def mark_cleaned(svc: Services, job_id: str) -> State:
    """Staging released (or kept): Finished for RunOnce or a final run, else Waiting for the next run."""
    now = svc.clock()
    with svc.db.begin() as conn:
        row = q.get_job(conn, job_id, lock=True)
        finish = bool(row.run_once or row.final_run)
        values: dict[str, Any] = {"end_time": now, "progress": 100.0}
        if finish:
            event = JobEvent.FINISH
            values["next_run_at"] = None
        else:
            event = JobEvent.WAIT
            values["next_run_at"] = now + timedelta(hours=row.frequency)
        _frm, to = q.transition(conn, job_id, event, now, values=values)
        q.close_open_runs(conn, job_id, now)
        q.release_source(conn, row.source_id, job_id)
    wakeup.notify()
    return to


def mark_failed(svc: Services, job_id: str, error_code: str, status_info: str) -> State:
    """A run failed: Running/any → InError with ErrorCode and StatusInfo; the source is released."""
    now = svc.clock()
    with svc.db.begin() as conn:
        row = q.get_job(conn, job_id, lock=True)
        _frm, to = q.transition(
            conn,
            job_id,
            JobEvent.FAIL,
            now,
            values={"error_code": error_code, "status_info": status_info, "next_run_at": None},
            detail={"error_code": error_code},
        )
        q.close_open_runs(conn, job_id, now)
        q.release_source(conn, row.source_id, job_id)
    wakeup.notify()  # the agent's open channel answers at once: its task is gone
    return to


def status_info(error_code: str, message: str) -> str:
    """StatusInfo as SMC writes it: a JSON string."""
    return json.dumps({"error_code": error_code, "error_msg": message})
