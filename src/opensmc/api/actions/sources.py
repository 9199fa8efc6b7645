"""Migration-source actions: DescribeSourceServers, ModifySourceServerAttribute, DeleteSourceServer.

Disks are rendered twice, as SMC does: the older ``SystemDiskParts`` /
``DataDisks`` shapes and the newer ``Disks`` shape (spec/API.md §3.12).
Disk sizes are GiB rounded up; partition sizes and offsets are bytes.
"""

from __future__ import annotations

from typing import Any

from opensmc.api.registry import Action
from opensmc.clock import as_utc, iso
from opensmc.domain.enums import SourceState
from opensmc.domain.errors import InvalidParameter
from opensmc.params import Params
from opensmc.service import sources
from opensmc.service.context import Caller, Services
from opensmc.service.validation import check_description, check_name, page, parse_tags

JOB_TYPES = ("0", "1", "2", "3")
STATES = tuple(s.value for s in SourceState)  #: once, not per request (iterating an Enum is slow)


def _describe(svc: Services, caller: Caller, p: Params) -> dict[str, Any]:
    number, size = page(p)
    types = p.list("RelatedJobType")
    for n, value in enumerate(types, 1):
        if value not in JOB_TYPES:
            raise InvalidParameter(p.wire(f"RelatedJobType.{n}"), "Allowed values: 0, 1, 2, 3.")
    filters = sources.SourceFilters(
        ids=p.list("SourceId"),
        name=p.str("Name") or None,
        state=p.str("State", choices=STATES) or None,
        job_id=p.str("JobId") or None,
        workgroup_id=p.str("WorkgroupId") or None,
        related_job_types=tuple(int(t) for t in types),
        resource_group_id=p.str("ResourceGroupId") or None,
        tags=tuple(parse_tags(p)),
    )
    total, views = sources.describe(svc, caller, filters, number, size)
    return {
        "TotalCount": total,
        "PageNumber": number,
        "PageSize": size,
        "SourceServers": {"SourceServer": [render_source(v) for v in views]},
    }


def render_source(v: sources.SourceView) -> dict[str, Any]:
    r = v.row
    disks = sources.disks_of(r)
    system = next((d for d in disks if d.get("index") == 0), None)
    data = [d for d in disks if d.get("index", 0) > 0]
    return {
        "SourceId": r.id,
        "Name": r.name,
        "Description": r.description,
        "State": r.state,
        "ErrorCode": r.error_code,
        "StatusInfo": r.status_info,
        "JobId": v.job_id,
        "WorkgroupId": r.workgroup_id,
        "ResourceGroupId": r.resource_group_id,
        "AgentVersion": r.agent_version,
        "Architecture": r.architecture,
        "Platform": r.platform,
        "KernelLevel": int(r.kernel_level),
        "HeartbeatRate": int(r.heartbeat_rate),
        "ReplicationDriver": r.replication_driver,
        "SystemInfo": r.system_info,
        "SystemDiskSize": int(r.system_disk_size),
        "CreationTime": iso(as_utc(r.created_at)),
        "SystemDiskParts": {"SystemDiskPart": [_old_part(p) for p in (system or {}).get("parts", [])]},
        "DataDisks": {
            "DataDisk": [
                {
                    "Index": d["index"],
                    "Path": d.get("path", ""),
                    "Size": sources.gib_up(int(d.get("size_bytes", 0))),
                    "Parts": {"Part": [_old_part(p) for p in d.get("parts", [])]},
                }
                for d in data
            ]
        },
        "Disks": _new_disks(system, data),
        "Tags": {"Tag": [{"Key": k, "Value": val} for k, val in v.tags]},
    }


def _old_part(p: dict[str, Any]) -> dict[str, Any]:
    return {
        "Device": p.get("device", ""),
        "Path": p.get("path", ""),
        "SizeBytes": int(p.get("size_bytes", 0)),
        "CanBlock": bool(p.get("can_block", False)),
        "Need": bool(p.get("need", False)),
    }


def _new_disk(d: dict[str, Any]) -> dict[str, Any]:
    parts = d.get("parts", [])
    return {
        "Size": sources.gib_up(int(d.get("size_bytes", 0))),
        "Offset": int(parts[0].get("offset", 0)) if parts else 0,
        "Parts": {
            "Part": [
                {
                    "Path": p.get("path", ""),
                    "SizeBytes": int(p.get("size_bytes", 0)),
                    "CanBlock": bool(p.get("can_block", False)),
                    "Type": p.get("type", "Normal"),
                }
                for p in parts
            ]
        },
    }


def _new_disks(system: dict[str, Any] | None, data: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if system is not None:
        out["System"] = _new_disk(system)
    out["Data"] = {"Data": [_new_disk(d) for d in data]}
    return out


def _modify(svc: Services, caller: Caller, p: Params) -> dict[str, Any]:
    source_id = p.req_str("SourceId")
    name = p.str("Name")
    if name is not None:
        check_name(p, "Name", name)
    description = p.str("Description")
    if description is not None:
        check_description(p, "Description", description, hi=256)
    sources.modify(svc, caller, source_id, name=name, description=description)
    return {}


def _delete(svc: Services, caller: Caller, p: Params) -> dict[str, Any]:
    source_id = p.req_str("SourceId")
    force = bool(p.bool("Force", default=False))
    sources.delete(svc, caller, source_id, force=force)
    return {}


ACTIONS: tuple[Action, ...] = (
    Action(
        "DescribeSourceServers",
        _describe,
        (
            "SourceId.N",
            "Name",
            "State",
            "JobId",
            "WorkgroupId",
            "RelatedJobType.N",
            "ResourceGroupId",
            "Tag.N.Key",
            "Tag.N.Value",
            "PageNumber",
            "PageSize",
        ),
        notes="Name is an exact match. RelatedJobType.N matches sources with any job of that JobType. "
        "Sources are newest first. Disk sizes are GiB rounded up.",
    ),
    Action("ModifySourceServerAttribute", _modify, ("SourceId", "Name", "Description")),
    Action(
        "DeleteSourceServer",
        _delete,
        ("SourceId", "Force"),
        notes="Deletion is immediate. With Force=true the source's jobs (rows, runs, tags) are deleted "
        "in the same transaction; their images are kept.",
    ),
)
