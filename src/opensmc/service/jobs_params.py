"""The job parameters shared by CreateReplicationJob and ModifyReplicationJobAttribute.

Disk selections are checked against the source's discovered disks
(``sources.disks``: index 0 is the system disk, 1..16 data disks) and stored
as JSON in ``jobs.disk_spec`` in the shapes DescribeReplicationJobs echoes:
``{"SystemDiskParts": [...], "DataDisks": [...], "Disks": {"System": {...}, "Data": [...]}}``.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta
from typing import Any

from opensmc.domain import strictjson
from opensmc.domain.errors import Conflict, InvalidParameter, MissingParameter
from opensmc.params import Params

GIB = 1024**3
MAX_REPLICATION_PARAMETERS = 2048
SCHEDULE_WINDOW = timedelta(days=30)
VALID_MIN = timedelta(days=7)
VALID_MAX = timedelta(days=90)
VALID_DEFAULT = timedelta(days=30)


def source_disks(disks_json: str) -> dict[int, dict[str, Any]]:
    """The source's discovered disks by index (bad or missing JSON gives none)."""
    try:
        raw = json.loads(disks_json or "[]")
    except ValueError:
        return {}
    out: dict[int, dict[str, Any]] = {}
    if isinstance(raw, list):
        for d in raw:
            if isinstance(d, dict) and isinstance(d.get("index"), int):
                out[d["index"]] = d
    return out


def _partitions(disk: dict[str, Any]) -> list[dict[str, Any]]:
    # The agent report names them "parts"; older rows say "partitions".
    parts = disk.get("partitions", disk.get("parts", []))
    return [p for p in parts if isinstance(p, dict)] if isinstance(parts, list) else []


def check_min_size(
    p: Params, field: str, gib: int | None, disk: dict[str, Any] | None, what: str, *, file_level: bool = False
) -> None:
    """Block replication copies the whole source disk: the target must be at least as big.

    A disk with partitions copied file by file (``file_level``) may be smaller: whether its
    partitions fit is checked against their SizeBytes when a run is prepared (domain/file_layout.py).
    """
    if gib is None or disk is None or file_level:
        return
    size = disk.get("size_bytes")
    if not isinstance(size, int) or size <= 0:
        return
    if gib * GIB < size:
        raise InvalidParameter(
            p.wire(field),
            f"It must be at least {math.ceil(size / GIB)} GiB: block replication copies the whole "
            f"source {what} ({size} bytes), so the target disk cannot be smaller.",
        )


def has_file_level(p: Params, prefix: str) -> bool:
    """Does any ``<prefix>.N.Block`` of these parameters say false (a partition copied file by file)?"""
    return any(g.bool("Block", default=True) is False for _n, g in p.groups(prefix))


def _block_parts(
    groups: list[tuple[int, Params]], disk: dict[str, Any] | None, disk_label: str
) -> list[dict[str, Any]]:
    """`…Part.N.{Device,SizeBytes,Block}` items; Device and SizeBytes both or neither."""
    known = {str(x.get("device")) for x in _partitions(disk)} if disk is not None else None
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for _n, g in groups:
        device = g.str("Device", max_len=64)
        size = g.int("SizeBytes", lo=1, hi=2**63 - 1, wide=True)
        block = g.bool("Block", default=True)
        if (device is None or device == "") != (size is None):
            missing = "SizeBytes" if size is None else "Device"
            raise MissingParameter(g.wire(missing))
        item: dict[str, Any] = {}
        if device:
            if known is not None and known and device not in known:
                raise InvalidParameter(
                    g.wire("Device"),
                    f"The source {disk_label} has no partition {device!r}; it has {', '.join(sorted(known))}.",
                )
            if device in seen:
                raise InvalidParameter(g.wire("Device"), f"Partition {device!r} is selected twice.")
            seen.add(device)
            item["Device"] = device
            item["SizeBytes"] = size
        item["Block"] = block
        out.append(item)
    return out


def system_disk_parts(p: Params, disks: dict[int, dict[str, Any]]) -> list[dict[str, Any]] | None:
    groups = p.groups("SystemDiskPart")
    if not groups:
        return None
    return _block_parts(groups, disks.get(0), "system disk")


def data_disks(p: Params, disks: dict[int, dict[str, Any]], *, have_source: bool) -> list[dict[str, Any]] | None:
    groups = p.groups("DataDisk", max_n=16)
    if not groups:
        return None
    out: list[dict[str, Any]] = []
    seen: set[int] = set()
    for _n, g in groups:
        index = g.int("Index", required=True, lo=1, hi=16)
        size = g.int("Size", lo=20, hi=32768)
        assert index is not None
        if index in seen:
            raise Conflict("DataDisk.DuplicateIndex", "The source server data disk cannot contain the same index.")
        seen.add(index)
        disk = disks.get(index)
        if have_source and disk is None:
            raise Conflict(
                "ReplicationJobDataDiskIndex.Invalid",
                "The specified replication job contains data disk index not found in source server. "
                f"{g.wire('Index')}={index}; the source's data disks are "
                f"{sorted(i for i in disks if i != 0) or 'none'}.",
            )
        check_min_size(g, "Size", size, disk, f"data disk {index}", file_level=has_file_level(g, "Part"))
        item: dict[str, Any] = {"Index": index}
        if size is not None:
            item["Size"] = size
        item["Parts"] = _block_parts(g.groups("Part"), disk, f"data disk {index}")
        out.append(item)
    return out


def _path_parts(groups: list[tuple[int, Params]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for _n, g in groups:
        path = g.str("Path", max_len=4096)
        size = g.int("SizeBytes", lo=1, hi=2**63 - 1, wide=True)
        block = g.bool("Block", default=True)
        item: dict[str, Any] = {}
        if path:
            item["Path"] = path
        if size is not None:
            item["SizeBytes"] = size
        item["Block"] = block
        out.append(item)
    return out


def _find_disk(disks: dict[int, dict[str, Any]], disk_id: str) -> dict[str, Any] | None:
    for idx, d in disks.items():
        if idx != 0 and disk_id in {str(d.get("id", "")), str(d.get("path", "")), str(idx)}:
            return d
    return None


def new_disks(p: Params, disks: dict[int, dict[str, Any]], *, have_source: bool) -> dict[str, Any] | None:
    """The newer `Disks.System.*` / `Disks.Data.N.*` model."""
    d = p.sub("Disks")
    if d.is_empty():
        return None
    out: dict[str, Any] = {}
    system = d.sub("System")
    if not system.is_empty():
        size = system.int("Size", lo=20, hi=32768)
        check_min_size(system, "Size", size, disks.get(0), "system disk", file_level=has_file_level(system, "Part"))
        item: dict[str, Any] = {}
        if size is not None:
            item["Size"] = size
        item["LVM"] = system.bool("LVM", default=False)
        item["Parts"] = _path_parts(system.groups("Part"))
        out["System"] = item
    data: list[dict[str, Any]] = []
    for _n, g in d.groups("Data", max_n=16):
        disk_id = g.str("DiskId", max_len=128)
        size = g.int("Size", lo=20, hi=32768)
        disk = _find_disk(disks, disk_id) if disk_id else None
        if disk_id and have_source and disk is None:
            raise InvalidParameter(g.wire("DiskId"), f"The source has no data disk {disk_id!r}.")
        check_min_size(g, "Size", size, disk, f"data disk {disk_id}", file_level=has_file_level(g, "Part"))
        entry: dict[str, Any] = {}
        if disk_id:
            entry["DiskId"] = disk_id
        if size is not None:
            entry["Size"] = size
        entry["LVM"] = g.bool("LVM", default=False)
        entry["Parts"] = _path_parts(g.groups("Part"))
        data.append(entry)
    if data:
        out["Data"] = data
    return out


def replication_parameters(p: Params) -> str | None:
    """Stored verbatim; the keys the agent understands are checked when present."""
    raw = p.str("ReplicationParameters")
    if raw is None or raw == "":
        return raw
    if len(raw) > MAX_REPLICATION_PARAMETERS:
        raise InvalidParameter(
            p.wire("ReplicationParameters"),
            f"It must be at most {MAX_REPLICATION_PARAMETERS} characters long.",
        )
    try:
        doc = strictjson.loads(raw)
    except strictjson.StrictJsonError as exc:
        raise InvalidParameter(p.wire("ReplicationParameters"), f"It must be a JSON object, but {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidParameter(p.wire("ReplicationParameters"), "It must be a JSON object.")
    bw = doc.get("bandwidth_limit")
    if "bandwidth_limit" in doc and (isinstance(bw, bool) or not isinstance(bw, int | float) or bw < 0):
        raise InvalidParameter(
            p.wire("ReplicationParameters"), "bandwidth_limit must be a number >= 0 (Mbit/s, 0 = no limit)."
        )
    cl = doc.get("compress_level")
    if "compress_level" in doc and (isinstance(cl, bool) or not isinstance(cl, int) or not 0 <= cl <= 10):
        raise InvalidParameter(p.wire("ReplicationParameters"), "compress_level must be an integer from 0 to 10.")
    if "checksum" in doc and not isinstance(doc["checksum"], bool):
        raise InvalidParameter(p.wire("ReplicationParameters"), "checksum must be true or false.")
    if "boot_test" in doc and not isinstance(doc["boot_test"], bool):
        raise InvalidParameter(p.wire("ReplicationParameters"), "boot_test must be true or false.")
    if "os_adaptation" in doc and not isinstance(doc["os_adaptation"], bool):
        raise InvalidParameter(p.wire("ReplicationParameters"), "os_adaptation must be true or false.")
    bt = doc.get("boot_test_timeout")
    if "boot_test_timeout" in doc and (isinstance(bt, bool) or not isinstance(bt, int | float) or not 10 <= bt <= 480):
        raise InvalidParameter(p.wire("ReplicationParameters"), "boot_test_timeout must be 10 to 480 seconds.")
    return raw


def scheduled_start(p: Params, now: datetime) -> datetime | None:
    when = p.time("ScheduledStartTime")
    if when is not None and not now < when <= now + SCHEDULE_WINDOW:
        raise InvalidParameter(
            p.wire("ScheduledStartTime"), "It must be a time in the future, at most 30 days from now."
        )
    return when


def valid_time(p: Params, created: datetime) -> datetime | None:
    when = p.time("ValidTime")
    if when is not None and not created + VALID_MIN <= when <= created + VALID_MAX:
        raise InvalidParameter(
            p.wire("ValidTime"),
            f"It must be 7 to 90 days after the job's creation ({created.strftime('%Y-%m-%dT%H:%M:%SZ')}).",
        )
    return when


def target_type(p: Params) -> str | None:
    raw = p.str("TargetType")
    if raw is None or raw == "":
        return None
    for choice in ("Image", "ContainerImage", "TargetInstance"):
        if raw.lower() == choice.lower():
            return choice
    raise InvalidParameter(p.wire("TargetType"), "Allowed values: Image, ContainerImage, TargetInstance.")


def net_mode(p: Params) -> int | None:
    value = p.int("NetMode")
    if value is not None and value not in (0, 2):
        raise InvalidParameter(p.wire("NetMode"), "Allowed values: 0 (Internet), 2 (VPC).")
    return value
