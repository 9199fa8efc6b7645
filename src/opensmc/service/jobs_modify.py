"""ModifyReplicationJobAttribute: field by field, each with the statuses it may change in (§3.18).

"Before it runs" means the job has never run and is Ready, or Waiting for
its ScheduledStartTime. Frequency and MaxNumberOfImageToKeep may also
change in Waiting (between incremental runs); ValidTime in Ready, Running,
Stopped, InError and Waiting; Name and Description any time.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Row
from sqlalchemy.exc import IntegrityError

from opensmc.clock import as_utc
from opensmc.domain.enums import JobStatus, TargetType
from opensmc.domain.errors import Conflict, InvalidJobStatus, MissingParameter
from opensmc.domain.transitions import JobEvent, describe
from opensmc.params import Params
from opensmc.service import jobs_params as jp
from opensmc.service.context import Caller, Services
from opensmc.service.validation import check_description, check_name
from opensmc.store import jobs as q

#: wire parameter → jobs column, for the plain strings changeable before the first run
_BEFORE_RUN_STRINGS: dict[str, tuple[str, int]] = {
    "InstanceId": ("instance_id", 64),
    "VSwitchId": ("vswitch_id", 64),
    "VpcId": ("vpc_id", 64),
    "InstanceType": ("instance_type", 64),
    "InstanceRamRole": ("instance_ram_role", 128),
    "LaunchTemplateId": ("launch_template_id", 64),
    "LaunchTemplateVersion": ("launch_template_version", 32),
    "ContainerNamespace": ("container_namespace", 128),
    "ContainerRepository": ("container_repository", 128),
    "ContainerTag": ("container_tag", 128),
}
VALID_TIME_STATUSES = ("Ready", "Running", "Stopped", "InError", "Waiting")
REPLICATION_PARAMETERS_STATUSES = ("Ready", "Running", "Stopped", "InError", "Waiting")


def _before_run(row: Row[Any]) -> bool:
    return not row.has_run and row.status in (JobStatus.READY.value, JobStatus.WAITING.value)


def _given(p: Params, name: str) -> bool:
    return p.raw(name) not in (None, "")


def modify_job(svc: Services, caller: Caller, p: Params) -> None:
    job_id = p.req_str("JobId", max_len=32)
    now = svc.clock()
    with svc.db.begin() as conn:
        row = q.get_job(conn, job_id, caller.account_id, lock=True)
        current = describe(q.state_of(row))
        values: dict[str, Any] = {}
        before_run_changes: list[str] = []

        name = p.str("Name")
        if name:
            check_name(p, "Name", name)
            owner = q.name_owner(conn, caller.account_id, name)
            if owner is not None and owner != job_id:
                raise Conflict("ReplicationJobName.Duplicate", "The specified replication job name already exists.")
            values["name"] = name
        description = p.str("Description")
        if description:
            values["description"] = check_description(p, "Description", description, lo=2, hi=128)

        for field, column, lo, hi in (
            ("Frequency", "frequency", 1, 168),
            ("MaxNumberOfImageToKeep", "max_images", 1, 10),
        ):
            value = p.int(field, lo=lo, hi=hi)
            if value is not None:
                if not (_before_run(row) or row.status == JobStatus.WAITING.value):
                    raise InvalidJobStatus(current, ["Ready", "Waiting"])
                values[column] = value

        created = as_utc(row.created_at)
        assert created is not None
        valid = jp.valid_time(p, created)
        if valid is not None:
            if row.status not in VALID_TIME_STATUSES:
                raise InvalidJobStatus(current, VALID_TIME_STATUSES)
            values["valid_time"] = valid

        # Everything below may change only before the job's first run.
        ttype = jp.target_type(p)
        if ttype is not None:
            values["target_type"] = ttype
            before_run_changes.append("TargetType")
        image_name = p.str("ImageName")
        if image_name:
            values["image_name"] = check_name(p, "ImageName", image_name)
            before_run_changes.append("ImageName")
        for field, (column, max_len) in _BEFORE_RUN_STRINGS.items():
            text = p.str(field, max_len=max_len)
            if text:
                values[column] = text
                before_run_changes.append(field)
        mode = jp.net_mode(p)
        if mode is not None:
            values["net_mode"] = mode
            before_run_changes.append("NetMode")
        params = jp.replication_parameters(p)
        if params:
            # Unlike the other job settings, the transfer knobs (bandwidth_limit,
            # compress_level, checksum) may change while the job runs, as in SMC's
            # console: the agent re-reads them with every progress report.
            if row.status not in REPLICATION_PARAMETERS_STATUSES:
                raise InvalidJobStatus(current, REPLICATION_PARAMETERS_STATUSES)
            values["replication_parameters"] = params
        scheduled = jp.scheduled_start(p, now)
        if scheduled is not None:
            values["scheduled_start_time"] = scheduled
            values["next_run_at"] = scheduled
            before_run_changes.append("ScheduledStartTime")

        disks: dict[int, dict[str, Any]] = {}
        if row.source_id:
            src = q.source_state(conn, row.source_id)
            if src is not None:
                disks = jp.source_disks(q.get_source(conn, row.source_id, caller.account_id).disks)
        size = p.int("SystemDiskSize", lo=20, hi=2048)
        if size is not None:
            stored = json.loads(row.disk_spec or "{}")
            files = jp.has_file_level(p, "SystemDiskPart") or any(
                part.get("Block") is False for part in stored.get("SystemDiskParts") or []
            )
            jp.check_min_size(p, "SystemDiskSize", size, disks.get(0), "system disk", file_level=files)
            values["system_disk_size"] = size
            before_run_changes.append("SystemDiskSize")
        spec = json.loads(row.disk_spec or "{}")
        parts = jp.system_disk_parts(p, disks)
        if parts is not None:
            spec["SystemDiskParts"] = parts
            before_run_changes.append("SystemDiskPart")
        data = jp.data_disks(p, disks, have_source=bool(row.source_id))
        if data is not None:
            spec["DataDisks"] = data
            before_run_changes.append("DataDisk")
        if parts is not None or data is not None:
            values["disk_spec"] = json.dumps(spec)

        if before_run_changes and not _before_run(row):
            raise InvalidJobStatus(
                f"{current} ({', '.join(before_run_changes)} can change only before the job first runs)",
                ["Ready"],
            )
        target = values.get("target_type", row.target_type)
        if target == TargetType.TARGET_INSTANCE.value and not values.get("instance_id", row.instance_id):
            raise MissingParameter(p.wire("InstanceId"))
        if values.get("net_mode", row.net_mode) == 2 and not values.get("vswitch_id", row.vswitch_id):
            raise MissingParameter(p.wire("VSwitchId"))

        try:
            with conn.begin_nested():
                if scheduled is not None and row.status == JobStatus.READY.value:
                    q.transition(conn, job_id, JobEvent.SCHEDULE, now, account_id=caller.account_id, values=values)
                elif values:
                    q.update_job(conn, job_id, values)
        except IntegrityError:
            # The unique (account, name) index: a concurrent request took the name.
            raise Conflict(
                "ReplicationJobName.Duplicate", "The specified replication job name already exists."
            ) from None
