"""CreateReplicationJob and CreateCrossZoneMigrationJob."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.exc import IntegrityError

from opensmc.clock import new_id
from opensmc.domain.enums import UNFINISHED, BusinessStatus, JobStatus, SourceState, TargetType
from opensmc.domain.errors import Conflict, InvalidParameter, InvalidSourceState, MissingParameter
from opensmc.params import Params
from opensmc.service import idempotency
from opensmc.service import jobs_params as jp
from opensmc.service.context import Caller, Services
from opensmc.service.validation import check_description, check_name, parse_tags
from opensmc.store import idempotency as idem_store
from opensmc.store import jobs as q
from opensmc.store import tags as tagq


def check_region(svc: Services, p: Params) -> str:
    region = p.req_str("RegionId", max_len=64)
    if region not in svc.settings.regions:
        raise InvalidParameter(
            p.wire("RegionId"),
            f"Unknown region {region!r}; configured regions: {', '.join(svc.settings.regions)}.",
        )
    return region


def _opt(p: Params, name: str, max_len: int = 128) -> str:
    return p.str(name, max_len=max_len) or ""


def _name_conflict() -> Conflict:
    return Conflict("ReplicationJobName.Duplicate", "The specified replication job name already exists.")


def _quota(svc: Services, conn: Connection, account_id: str) -> None:
    if q.count_jobs(conn, account_id) >= svc.settings.max_jobs_per_account:
        raise Conflict(
            "QuotaExceeded.ReplicationJob",
            "The maximum number of replication jobs is exceeded "
            f"({svc.settings.max_jobs_per_account} per account). Delete finished jobs or raise "
            "max_jobs_per_account.",
        )


def _insert(conn: Connection, values: dict[str, Any]) -> None:
    try:
        with conn.begin_nested():
            q.insert_job(conn, values)
    except IntegrityError:
        # The unique (account, name) index: a concurrent create took the name.
        raise _name_conflict() from None


def create_replication_job(svc: Services, caller: Caller, p: Params) -> str:
    """Validate everything, then create the job; returns its JobId."""
    now = svc.clock()
    region = check_region(svc, p)
    source_id = p.req_str("SourceId", max_len=32)
    token = idempotency.client_token(p)
    digest = idempotency.params_hash(p)
    name = p.str("Name")
    if name:
        check_name(p, "Name", name)
    description = p.str("Description")
    if description:
        check_description(p, "Description", description, lo=2, hi=128)
    ttype = jp.target_type(p) or TargetType.IMAGE.value
    image_name = p.str("ImageName")
    if image_name:
        check_name(p, "ImageName", image_name)
    instance_id = _opt(p, "InstanceId", 64)
    if ttype == TargetType.TARGET_INSTANCE.value and not instance_id:
        raise MissingParameter(p.wire("InstanceId"))
    system_disk_size = p.int("SystemDiskSize", lo=20, hi=2048)
    mode = jp.net_mode(p) or 0
    vswitch = _opt(p, "VSwitchId", 64)
    if mode == 2 and not vswitch:
        raise MissingParameter(p.wire("VSwitchId"))
    run_once = bool(p.bool("RunOnce", default=True))
    frequency = p.int("Frequency", lo=1, hi=168)
    max_images = p.int("MaxNumberOfImageToKeep", lo=1, hi=10)
    if not run_once:
        if frequency is None:
            raise MissingParameter(p.wire("Frequency"))
        if max_images is None:
            raise MissingParameter(p.wire("MaxNumberOfImageToKeep"))
    scheduled = jp.scheduled_start(p, now)
    valid = jp.valid_time(p, now) or now + jp.VALID_DEFAULT
    license_type = p.str("LicenseType", choices=("", "BYOL")) or ""
    job_type = p.int("JobType", lo=0, hi=3) or 0
    replication_parameters = jp.replication_parameters(p) or ""
    tag_pairs = parse_tags(p)

    job_id = new_id("j-")
    with svc.db.begin() as conn:
        # Locking the source serialises two creates for one source (one unfinished job each);
        # the ClientToken is looked up after the lock, so a concurrent retry with the same
        # token sees the first create's record and replays it.
        source = q.get_source(conn, source_id, caller.account_id, lock=True)
        earlier = idempotency.replay(conn, caller.account_id, "CreateReplicationJob", token, digest)
        if earlier is not None:
            return earlier
        if source.state != SourceState.AVAILABLE.value:
            raise InvalidSourceState(source.state, [SourceState.AVAILABLE.value])
        existing = q.unfinished_job_of(conn, source_id, [s.value for s in UNFINISHED])
        if existing is not None:
            raise Conflict(
                "SourceServer.WithReplicationJob",
                f"The specified source server {source_id} already has an unfinished replication job "
                f"{existing[0]} ({existing[1]}). Finish, cut over or delete it first.",
            )
        disks = jp.source_disks(source.disks)
        files = jp.has_file_level(p, "SystemDiskPart") or jp.has_file_level(p.sub("Disks").sub("System"), "Part")
        jp.check_min_size(p, "SystemDiskSize", system_disk_size, disks.get(0), "system disk", file_level=files)
        spec: dict[str, Any] = {}
        parts = jp.system_disk_parts(p, disks)
        if parts is not None:
            spec["SystemDiskParts"] = parts
        data = jp.data_disks(p, disks, have_source=True)
        if data is not None:
            spec["DataDisks"] = data
        new_model = jp.new_disks(p, disks, have_source=True)
        if new_model is not None:
            spec["Disks"] = new_model
        job_name = name or job_id
        if q.name_owner(conn, caller.account_id, job_name) is not None:
            raise _name_conflict()
        _quota(svc, conn, caller.account_id)
        values: dict[str, Any] = {
            "id": job_id,
            "account_id": caller.account_id,
            "source_id": source_id,
            "name": job_name,
            "description": description or "",
            "region_id": region,
            "resource_group_id": _opt(p, "ResourceGroupId", 64),
            "status": (JobStatus.WAITING if scheduled else JobStatus.READY).value,
            "business_status": BusinessStatus.NONE.value,
            "progress": 0.0,
            "job_type": job_type,
            "target_type": ttype,
            "net_mode": mode,
            "vpc_id": _opt(p, "VpcId", 64),
            "vswitch_id": vswitch,
            "instance_id": instance_id,
            "instance_type": _opt(p, "InstanceType", 64),
            "instance_ram_role": _opt(p, "InstanceRamRole"),
            "image_name": image_name or "",
            "container_namespace": _opt(p, "ContainerNamespace"),
            "container_repository": _opt(p, "ContainerRepository"),
            "container_tag": _opt(p, "ContainerTag"),
            "launch_template_id": _opt(p, "LaunchTemplateId", 64),
            "launch_template_version": _opt(p, "LaunchTemplateVersion", 32),
            "license_type": license_type,
            "replication_parameters": replication_parameters,
            "run_once": run_once,
            "frequency": frequency or 0,
            "max_images": max_images or 0,
            "system_disk_size": system_disk_size or 0,
            "disk_spec": json.dumps(spec),
            "extra": "{}",
            "created_at": now,
            "scheduled_start_time": scheduled,
            "next_run_at": scheduled,
            "valid_time": valid,
            "has_run": False,
            "final_run": False,
        }
        _insert(conn, values)
        q.point_source_at(conn, source_id, job_id)
        _record(
            conn,
            caller,
            now,
            job_id,
            JobStatus(values["status"]),
            tag_pairs,
            token,
            digest,
            "CreateReplicationJob",
        )
    return job_id


def _record(
    conn: Connection,
    caller: Caller,
    now: datetime,
    job_id: str,
    status: JobStatus,
    tag_pairs: list[tuple[str, str | None]],
    token: str | None,
    digest: str,
    action: str,
) -> None:
    if tag_pairs:
        tagq.put_tags(conn, caller.account_id, q.JOB_RTYPE, job_id, [(k, v or "") for k, v in tag_pairs], now)
    q.add_event(conn, job_id, "create", (status, BusinessStatus.NONE), (status, BusinessStatus.NONE), now)
    if token is not None:
        idem_store.record(conn, caller.account_id, action, token, digest, job_id, now)


PERFORMANCE_LEVELS = ("PL0", "PL1", "PL2", "PL3")


def create_cross_zone_job(svc: Services, caller: Caller, p: Params) -> str:
    """Record a cross-zone migration job (JobType 2); see the action's notes for what runs."""
    now = svc.clock()
    region = check_region(svc, p)
    instance_id = p.req_str("InstanceId", max_len=64)
    token = idempotency.client_token(p)
    digest = idempotency.params_hash(p)
    disks_out: list[dict[str, Any]] = []
    for _n, g in p.groups("Disk"):
        level = g.str("PerformanceLevel", choices=PERFORMANCE_LEVELS)
        category = g.str("Category", max_len=32)
        if category and category != "cloud_essd":
            raise InvalidParameter(g.wire("Category"), "Allowed values: cloud_essd.")
        disks_out.append(
            {
                "DiskId": g.str("DiskId", max_len=64) or "",
                "Category": category or "",
                "PerformanceLevel": level or "",
            }
        )
    extra = {
        "TargetZoneId": _opt(p, "TargetZoneId", 64),
        "TargetVSwitchId": _opt(p, "TargetVSwitchId", 64),
        "TargetInstanceType": _opt(p, "TargetInstanceType", 64),
        "AutoPay": bool(p.bool("AutoPay", default=True)),
        "Disks": disks_out,
    }
    job_id = new_id("j-")
    with svc.db.begin() as conn:
        earlier = idempotency.replay(conn, caller.account_id, "CreateCrossZoneMigrationJob", token, digest)
        if earlier is not None:
            return earlier
        _quota(svc, conn, caller.account_id)
        _insert(
            conn,
            {
                "id": job_id,
                "account_id": caller.account_id,
                "source_id": "",
                "name": job_id,
                "region_id": region,
                "resource_group_id": _opt(p, "ResourceGroupId", 64),
                "status": JobStatus.READY.value,
                "business_status": "",
                "job_type": 2,
                "target_type": TargetType.TARGET_INSTANCE.value,
                "instance_id": instance_id,
                "instance_type": extra["TargetInstanceType"],
                "vswitch_id": extra["TargetVSwitchId"],
                "extra": json.dumps(extra),
                "disk_spec": "{}",
                "created_at": now,
                "valid_time": now + jp.VALID_DEFAULT,
            },
        )
        _record(conn, caller, now, job_id, JobStatus.READY, [], token, digest, "CreateCrossZoneMigrationJob")
    return job_id
