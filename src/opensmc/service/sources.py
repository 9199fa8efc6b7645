"""Migration sources: the agent's report, DescribeSourceServers, Modify, Delete, liveness.

Sources are made by agents (service/agents.py). Their disks are kept as the
normalised report below (JSON in ``sources.disks``), one entry per disk,
index 0 the system disk and 1..16 data disks::

    [{"index": 0, "path": "/dev/vda", "size_bytes": 21474836480,
      "parts": [{"device": "0_0", "path": "/", "offset": 1048576, "size_bytes": 21473787904,
                 "fs_type": "ext4", "can_block": true, "need": true, "type": "System"}]}]

:func:`disks_of` reads it back (job validation uses it for disk indexes and
partition devices).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from opensmc.clock import as_utc, iso
from opensmc.domain.enums import JobStatus, SourceState
from opensmc.domain.errors import Conflict, InvalidSourceState, NotFound, SmcError
from opensmc.domain.transitions import TRANSITIONS, JobEvent
from opensmc.service.context import Caller, Services
from opensmc.store import sources as q
from opensmc.store import tags as tag_store

NOT_FOUND_CODE = "InvalidSourceId.NotFound"
OFFLINE = "SourceServer.Offline"
SYSTEM_INFO_MAX = 1024
MAX_DISKS = 17  #: the system disk and data disks 1..16
MAX_PARTS = 128
PART_TYPES = ("Normal", "System", "Boot")
_GIB = 1 << 30
_INT64 = 2**63 - 1


def gib_up(size_bytes: int) -> int:
    return math.ceil(size_bytes / _GIB)


# -- the agent's report ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Report:
    """A validated discovery report (opensmc.agent.discovery.to_report), as the server keeps it."""

    hostname: str
    platform: str
    architecture: str
    kernel_level: int
    system_info: str  #: compact JSON object of strings, at most 1 KB
    disks: list[dict[str, Any]]

    @property
    def system_disk_size(self) -> int:
        system = [d for d in self.disks if d["index"] == 0]
        return gib_up(system[0]["size_bytes"]) if system else 0

    def disks_json(self) -> str:
        return json.dumps(self.disks, separators=(",", ":"))


def _bad(message: str) -> SmcError:
    return SmcError(message, code="InvalidReport", http_status=400)


def _str(obj: Mapping[str, Any], key: str, where: str, *, max_len: int, default: str = "") -> str:
    value = obj.get(key, default)
    if value is None:
        return default
    if not isinstance(value, str) or len(value) > max_len:
        raise _bad(f"{where}{key} must be a string of at most {max_len} characters.")
    return value


def _int(obj: Mapping[str, Any], key: str, where: str, *, lo: int, hi: int, default: int | None = None) -> int:
    value = obj.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _bad(f"{where}{key} must be an integer from {lo} to {hi}.")
    return value


def _bool(obj: Mapping[str, Any], key: str, where: str, default: bool) -> bool:
    value = obj.get(key, default)
    if not isinstance(value, bool):
        raise _bad(f"{where}{key} must be true or false.")
    return value


def parse_report(raw: Any) -> Report:
    """Check an agent's report field by field; a bad field is a 400 InvalidReport naming it."""
    if not isinstance(raw, Mapping):
        raise _bad('"report" must be a JSON object (the discovery report).')
    disks_raw = raw.get("disks", [])
    if not isinstance(disks_raw, list) or len(disks_raw) > MAX_DISKS:
        raise _bad(f"disks must be a list of at most {MAX_DISKS} disks.")
    disks = [_parse_disk(d, n) for n, d in enumerate(disks_raw)]
    indexes = [d["index"] for d in disks]
    if len(set(indexes)) != len(indexes):
        raise _bad("disks[].index values must be unique.")
    disks.sort(key=lambda d: int(d["index"]))
    return Report(
        hostname=_str(raw, "hostname", "", max_len=255),
        platform=_str(raw, "platform", "", max_len=64),
        architecture=_str(raw, "architecture", "", max_len=32),
        kernel_level=_int(raw, "kernel_level", "", lo=0, hi=2**31 - 1, default=0),
        system_info=_system_info(raw.get("system_info", "{}")),
        disks=disks,
    )


def _parse_disk(raw: Any, n: int) -> dict[str, Any]:
    where = f"disks[{n}]."
    if not isinstance(raw, Mapping):
        raise _bad(f"disks[{n}] must be an object.")
    index = _int(raw, "index", where, lo=0, hi=MAX_DISKS - 1)
    # discovery.to_report says "parts"; "partitions" is accepted as well.
    parts_raw = raw.get("parts", raw.get("partitions", []))
    if not isinstance(parts_raw, list) or len(parts_raw) > MAX_PARTS:
        raise _bad(f"{where}parts must be a list of at most {MAX_PARTS} partitions.")
    parts = []
    for m, p in enumerate(parts_raw):
        pw = f"{where}parts[{m}]."
        if not isinstance(p, Mapping):
            raise _bad(f"{where}parts[{m}] must be an object.")
        kind = _str(p, "type", pw, max_len=16, default="Normal")
        if kind not in PART_TYPES:
            raise _bad(f"{pw}type must be one of {', '.join(PART_TYPES)}.")
        parts.append(
            {
                "device": _str(p, "device", pw, max_len=32, default=f"{index}_{m}"),
                "path": _str(p, "path", pw, max_len=1024),
                "offset": _int(p, "offset", pw, lo=0, hi=_INT64, default=0),
                "size_bytes": _int(p, "size_bytes", pw, lo=0, hi=_INT64),
                "fs_type": _str(p, "fs_type", pw, max_len=32),
                # number and mount point: where file-level copying (Block=false) finds the partition
                "number": _int(p, "number", pw, lo=0, hi=4096, default=m + 1),
                "mount_point": _str(p, "mount_point", pw, max_len=1024) or None,
                "can_block": _bool(p, "can_block", pw, True),
                "need": _bool(p, "need", pw, False),
                "type": kind,
            }
        )
    return {
        "index": index,
        "path": _str(raw, "path", where, max_len=1024),
        "size_bytes": _int(raw, "size_bytes", where, lo=0, hi=_INT64),
        # the partition table's kind and sector size: file-level copying rewrites the table
        "label": _str(raw, "label", where, max_len=8) or None,
        "sector_size": _int(raw, "sector_size", where, lo=512, hi=65536, default=512),
        "parts": parts,
    }


def _system_info(raw: Any) -> str:
    """SMC's SystemInfo: a JSON object of strings, at most 1 KB; addresses are dropped first to fit."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw or "{}")
        except ValueError:
            raise _bad("system_info must be a JSON object (or a string holding one).") from None
    if not isinstance(raw, Mapping):
        raise _bad("system_info must be a JSON object (or a string holding one).")
    info = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in raw.items()}
    for drop in ("", "ipv6", "ipv4"):
        info.pop(drop, None)
        text = json.dumps(info, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
        if len(text.encode()) <= SYSTEM_INFO_MAX:
            return text
    raise _bad(f"system_info must serialise to at most {SYSTEM_INFO_MAX} bytes.")


def disks_of(row: Any) -> list[dict[str, Any]]:
    """A source row's disks, in the layout of the module docstring."""
    try:
        disks = json.loads(row.disks or "[]")
    except ValueError:
        return []
    return disks if isinstance(disks, list) else []


# -- DescribeSourceServers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceFilters:
    ids: list[str]
    name: str | None = None
    state: str | None = None
    job_id: str | None = None
    workgroup_id: str | None = None
    related_job_types: tuple[int, ...] = ()
    resource_group_id: str | None = None
    tags: tuple[tuple[str, str | None], ...] = ()


@dataclass(frozen=True)
class SourceView:
    row: Any
    job_id: str
    tags: list[tuple[str, str]]


def describe(
    svc: Services, caller: Caller, f: SourceFilters, page_number: int, page_size: int
) -> tuple[int, list[SourceView]]:
    if f == SourceFilters(ids=[]):  # no filter: the commonest call, on the store's precompiled path
        total, rows, tag_map, latest = q.describe_account(
            svc.db, caller.account_id, offset=(page_number - 1) * page_size, limit=page_size
        )
        return total, [SourceView(r, r.job_id or latest.get(r.id, ""), tag_map.get(r.id, [])) for r in rows]
    with svc.db.connect() as conn:
        total, rows = q.describe(
            conn,
            caller.account_id,
            ids=f.ids,
            name=f.name,
            state=f.state,
            job_id=f.job_id,
            workgroup_id=f.workgroup_id,
            related_job_types=f.related_job_types,
            resource_group_id=f.resource_group_id,
            tag_filters=f.tags,
            offset=(page_number - 1) * page_size,
            limit=page_size,
        )
        ids = [r.id for r in rows]
        tag_map = tag_store.tags_of(conn, q.SOURCE_TAG, ids)
        latest = q.latest_jobs(conn, [r.id for r in rows if not r.job_id])
    return total, [SourceView(r, r.job_id or latest.get(r.id, ""), tag_map.get(r.id, [])) for r in rows]


# -- ModifySourceServerAttribute ---------------------------------------------------------------------------


def modify(svc: Services, caller: Caller, source_id: str, *, name: str | None, description: str | None) -> None:
    with svc.db.begin() as conn:
        row = q.get(conn, caller.account_id, source_id)
        if row is None:
            raise NotFound("SourceId", source_id, code=NOT_FOUND_CODE)
        if row.state == SourceState.DELETING.value:
            raise InvalidSourceState(row.state, _not_deleting())
        values: dict[str, Any] = {}
        if name is not None and name != row.name:
            if q.name_taken(conn, caller.account_id, name, source_id):
                raise Conflict(
                    "SourceServerName.Duplicate",
                    "The specified source server name already exists. Please modify the source server name.",
                )
            values["name"] = name
        if description is not None:
            values["description"] = description
        if values and not q.set_attributes(conn, caller.account_id, source_id, values):
            raise InvalidSourceState(SourceState.DELETING.value, _not_deleting())


def _not_deleting() -> list[str]:
    return [s.value for s in SourceState if s is not SourceState.DELETING]


# -- DeleteSourceServer ------------------------------------------------------------------------------------


def delete(svc: Services, caller: Caller, source_id: str, *, force: bool) -> list[str]:
    """Delete a source; with `force` its jobs too. Returns the deleted job IDs.

    A Running job blocks even with Force; any other job blocks without it. The
    source passes through Deleting inside the transaction, so a concurrent
    call sees SourceServerState.Invalid, and each job goes through the DELETE
    transition (with a job event) before its rows are removed.
    """
    now = svc.clock()
    with svc.db.begin() as conn:
        if not q.start_deleting(conn, caller.account_id, source_id):
            row = q.get(conn, caller.account_id, source_id)
            if row is None:
                raise NotFound("SourceId", source_id, code=NOT_FOUND_CODE)
            raise InvalidSourceState(row.state, _not_deleting())
        job_rows = q.jobs_of(conn, caller.account_id, source_id)
        running = [j.id for j in job_rows if j.status == JobStatus.RUNNING.value]
        if running:
            raise Conflict(
                "SourceServer.WithRunningReplicationJob",
                "The specified source server has related replication jobs that are running: "
                f"{', '.join(running)}. Stop them first (StopReplicationJob) or wait for them to end.",
            )
        if job_rows and not force:
            raise Conflict(
                "ReplicationJob.Related",
                f"The specified source server has related replication jobs. Please delete replication jobs: "
                f"{', '.join(j.id for j in job_rows)} before delete this source server, or use Force=true.",
            )
        t = TRANSITIONS[JobEvent.DELETE]
        allowed = [(s.value, b.value) for s, b in t.sources]
        target = (t.target[0].value, t.target[1].value)
        for j in job_rows:
            before = (j.status, j.business_status)
            if j.status == JobStatus.DELETING.value:
                continue
            if not q.set_job_status(conn, j.id, allowed, target):
                # Started between our read and this update: the whole deletion is refused.
                raise Conflict(
                    "SourceServer.WithRunningReplicationJob",
                    f"The replication job {j.id} changed state during the deletion; try again.",
                )
            q.add_job_event(
                conn,
                j.id,
                now,
                JobEvent.DELETE.value,
                before,
                target,
                f"DeleteSourceServer {source_id} Force",
            )
        deleted = [j.id for j in job_rows]
        q.delete_jobs(conn, deleted)
        q.delete_source(conn, caller.account_id, source_id)
    return deleted


# -- liveness ----------------------------------------------------------------------------------------------


def mark_lost_agents(svc: Services, now: datetime) -> int:
    """Available or InUse sources silent for longer than Settings.heartbeat_grace become Unavailable.

    ErrorCode ``SourceServer.Offline``; StatusInfo says since when. The
    orchestrator then fails a running job of such a source; when its agent is
    heard from again the source is Available and the job can be started again
    (it resumes from what the receiver holds). Returns the number of sources changed.
    """
    cutoff = now - svc.settings.heartbeat_grace
    changed = 0
    with svc.db.begin() as conn:
        for source_id, last, created in q.silent_since(conn, cutoff):
            since = iso(as_utc(last) or as_utc(created))
            info = json.dumps(
                {
                    "error_code": OFFLINE,
                    "error_msg": f"No heartbeat from the SMC agent since {since}; "
                    "start the agent on the source server.",
                },
                separators=(",", ":"),
            )
            changed += q.mark_unavailable(conn, source_id, cutoff, OFFLINE, info)
    return changed
