"""The replication job actions (spec/API.md §3.3, 3.4, 3.6, 3.8, 3.11, 3.18, 3.21, 3.22).

Wire in, wire out: parameters go to service/jobs*.py, rows come back as §3.11 shapes.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from sqlalchemy import Row

from opensmc.api.registry import Action
from opensmc.clock import iso
from opensmc.params import Params
from opensmc.service import jobs as svc_jobs
from opensmc.service.context import Caller, Services
from opensmc.service.jobs_create import create_cross_zone_job, create_replication_job
from opensmc.service.jobs_describe import JobView, describe_jobs
from opensmc.service.jobs_modify import modify_job


def _create(svc: Services, caller: Caller, p: Params) -> dict[str, Any]:
    return {"JobId": create_replication_job(svc, caller, p)}


def _create_cross_zone(svc: Services, caller: Caller, p: Params) -> dict[str, Any]:
    return {"JobId": create_cross_zone_job(svc, caller, p)}


def _job_id(p: Params) -> str:
    return p.req_str("JobId", max_len=32)


def _start(svc: Services, caller: Caller, p: Params) -> dict[str, Any]:
    svc_jobs.start_job(svc, caller, _job_id(p))
    return {}


def _stop(svc: Services, caller: Caller, p: Params) -> dict[str, Any]:
    svc_jobs.stop_job(svc, caller, _job_id(p))
    return {}


def _cut_over(svc: Services, caller: Caller, p: Params) -> dict[str, Any]:
    job_id = _job_id(p)
    svc_jobs.cut_over_job(svc, caller, job_id, bool(p.bool("SyncData", default=False)))
    return {}


def _delete(svc: Services, caller: Caller, p: Params) -> dict[str, Any]:
    svc_jobs.delete_job(svc, caller, _job_id(p))
    return {}


def _modify(svc: Services, caller: Caller, p: Params) -> dict[str, Any]:
    modify_job(svc, caller, p)
    return {}


def _describe(svc: Services, caller: Caller, p: Params) -> dict[str, Any]:
    result = describe_jobs(svc, caller, p)
    return {
        "TotalCount": result.total,
        "PageNumber": result.page_number,
        "PageSize": result.page_size,
        "ReplicationJobs": {"ReplicationJob": [render_job(v) for v in result.jobs]},
    }


def _block_part(part: dict[str, Any]) -> dict[str, Any]:
    return {k: part[k] for k in ("Device", "SizeBytes", "Block") if k in part}


def _path_part(part: dict[str, Any]) -> dict[str, Any]:
    return {k: part[k] for k in ("Path", "SizeBytes", "Block") if k in part}


def _new_disk(disk: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {k: disk[k] for k in ("DiskId", "Size", "LVM") if k in disk}
    out["Parts"] = {"Part": [_path_part(x) for x in disk.get("Parts", [])]}
    return out


def render_disks(spec_json: str) -> dict[str, Any]:
    """The stored disk selection in the §3.11 wrapper shapes.

    Cached by the stored text (a fleet's jobs mostly share a few selections): the result is
    shared between calls, so it is only ever read (rendered), never changed.
    """
    return _render_disks(spec_json or "{}")


@functools.lru_cache(maxsize=1024)
def _render_disks(spec_json: str) -> dict[str, Any]:
    spec: dict[str, Any] = json.loads(spec_json)
    out: dict[str, Any] = {
        "SystemDiskParts": {"SystemDiskPart": [_block_part(x) for x in spec.get("SystemDiskParts", [])]},
        "DataDisks": {
            "DataDisk": [
                {
                    **{k: d[k] for k in ("Index", "Size") if k in d},
                    "Parts": {"Part": [_block_part(x) for x in d.get("Parts", [])]},
                }
                for d in spec.get("DataDisks", [])
            ]
        },
    }
    disks = spec.get("Disks")
    if disks:
        rendered: dict[str, Any] = {}
        if "System" in disks:
            rendered["System"] = _new_disk(disks["System"])
        rendered["Data"] = {"Data": [_new_disk(d) for d in disks.get("Data", [])]}
        out["Disks"] = rendered
    return out


def _run(run: Row[Any]) -> dict[str, Any]:
    # BytesDone..FilesTotal are OpenSMC's additions (SDKs ignore unknown fields): what
    # `opensmc watch` shows. EtaSeconds is -1 when not known; FilesDone and FilesTotal are there
    # only for a run that copies partitions file by file.
    p = svc_jobs.run_progress(run)
    out = {
        "StartTime": iso(run.start_time),
        "EndTime": iso(run.end_time),
        "ImageId": run.image_id,
        "Type": run.type,
        "BytesDone": p.bytes_done,
        "BytesTotal": p.bytes_total,
        "BytesPerSecond": p.bytes_per_second,
        "EtaSeconds": -1 if p.eta_seconds is None else p.eta_seconds,
    }
    if p.files_done is not None and p.files_total is not None:
        out["FilesDone"], out["FilesTotal"] = p.files_done, p.files_total
    return out


def render_job(v: JobView) -> dict[str, Any]:
    r = v.row
    return {
        "JobId": r.id,
        "Name": r.name,
        "Description": r.description,
        "SourceId": r.source_id,
        "RegionId": r.region_id,
        "ResourceGroupId": r.resource_group_id,
        "WorkgroupId": v.workgroup_id,
        "Status": r.status,
        "BusinessStatus": r.business_status,
        "StatusInfo": r.status_info,
        "ErrorCode": r.error_code,
        "Progress": float(r.progress),
        "JobType": r.job_type,
        "TargetType": r.target_type,
        "NetMode": r.net_mode,
        "VpcId": r.vpc_id,
        "VSwitchId": r.vswitch_id,
        "InstanceId": r.instance_id,
        "TransitionInstanceId": r.transition_instance_id,
        "InstanceType": r.instance_type,
        "InstanceRamRole": r.instance_ram_role,
        "ImageName": r.image_name,
        "ImageId": r.image_id,
        "ContainerNamespace": r.container_namespace,
        "ContainerRepository": r.container_repository,
        "ContainerTag": r.container_tag,
        "LaunchTemplateId": r.launch_template_id,
        "LaunchTemplateVersion": r.launch_template_version,
        "LicenseType": r.license_type,
        "ReplicationParameters": r.replication_parameters,
        "RunOnce": bool(r.run_once),
        "Frequency": r.frequency,
        "MaxNumberOfImageToKeep": r.max_images,
        "SystemDiskSize": r.system_disk_size,
        "CreationTime": iso(r.created_at),
        "StartTime": iso(r.start_time),
        "EndTime": iso(r.end_time),
        "ScheduledStartTime": iso(r.scheduled_start_time),
        "ValidTime": iso(r.valid_time),
        **render_disks(r.disk_spec),
        "ReplicationJobRuns": {"ReplicationJobRun": [_run(x) for x in v.runs]},
        "Tags": {"Tag": [{"Key": k, "Value": val} for k, val in v.tags]},
    }


_DISK_PARAMS = (
    "SystemDiskSize",
    "SystemDiskPart.N.Device",
    "SystemDiskPart.N.SizeBytes",
    "SystemDiskPart.N.Block",
    "DataDisk.N.Index",
    "DataDisk.N.Size",
    "DataDisk.N.Part.M.Device",
    "DataDisk.N.Part.M.SizeBytes",
    "DataDisk.N.Part.M.Block",
)
_BEFORE_RUN = (
    "TargetType",
    "ImageName",
    "InstanceId",
    *_DISK_PARAMS,
    "NetMode",
    "VpcId",
    "VSwitchId",
    "ScheduledStartTime",
    "InstanceType",
    "InstanceRamRole",
    "LaunchTemplateId",
    "LaunchTemplateVersion",
    "ContainerNamespace",
    "ContainerRepository",
    "ContainerTag",
    "ReplicationParameters",
)
_STORED_ONLY = (
    "Stored and echoed but not acted on: VpcId, VSwitchId, InstanceType, InstanceRamRole, "
    "LaunchTemplateId, LaunchTemplateVersion, LicenseType, ResourceGroupId, Container*, JobType, "
    "Disks.System.LVM/Disks.Data.N.LVM. Data moves block by block: the system disk and the data "
    "disks named by DataDisk.N.Index or Disks.Data.N.DiskId, each whole except the partitions "
    "marked Block=false (SystemDiskPart.N, DataDisk.N.Part.M, Disks.System.Part.N by Path), which are "
    "copied file by file (rsync from the mounted filesystem) into a new ext2/3/4 filesystem of their "
    "SizeBytes, smaller or larger, with the same UUID and label; the partitions after them move and the "
    "partition table is rewritten, and the disk may then be smaller than the source (docs/agent.md). "
    "xfs, vfat, swap and logical partitions cannot be Block=false (refused when the run is prepared). "
    "A block-copied partition keeps its size (its SizeBytes is stored as given). A target size "
    "above the source size gives the image disk that size (the source's bytes, then zeros; with OS "
    "adaptation on, the last partition and its file system grow into it). ReplicationParameters keys "
    "read: bandwidth_limit, compress_level, checksum, boot_test, boot_test_timeout, os_adaptation "
    "(docs/operations.md). TargetType "
    "ContainerImage and TargetInstance are recorded; only Image targets are produced."
)

ACTIONS: tuple[Action, ...] = (
    Action(
        "CreateReplicationJob",
        _create,
        (
            "RegionId",
            "SourceId",
            "ClientToken",
            "Name",
            "Description",
            "TargetType",
            "ImageName",
            "InstanceId",
            *_DISK_PARAMS,
            "Disks.System.Size",
            "Disks.System.LVM",
            "Disks.System.Part.N.Path",
            "Disks.System.Part.N.SizeBytes",
            "Disks.System.Part.N.Block",
            "Disks.Data.N.DiskId",
            "Disks.Data.N.Size",
            "Disks.Data.N.LVM",
            "Disks.Data.N.Part.M.Path",
            "Disks.Data.N.Part.M.SizeBytes",
            "Disks.Data.N.Part.M.Block",
            "NetMode",
            "VpcId",
            "VSwitchId",
            "RunOnce",
            "Frequency",
            "MaxNumberOfImageToKeep",
            "ScheduledStartTime",
            "ValidTime",
            "InstanceType",
            "InstanceRamRole",
            "LaunchTemplateId",
            "LaunchTemplateVersion",
            "LicenseType",
            "JobType",
            "ContainerNamespace",
            "ContainerRepository",
            "ContainerTag",
            "ReplicationParameters",
            "ResourceGroupId",
            "Tag.N.Key",
            "Tag.N.Value",
        ),
        _STORED_ONLY + " Without Name the job is named after its JobId.",
    ),
    Action(
        "CreateCrossZoneMigrationJob",
        _create_cross_zone,
        (
            "RegionId",
            "ClientToken",
            "InstanceId",
            "TargetZoneId",
            "TargetVSwitchId",
            "TargetInstanceType",
            "AutoPay",
            "ResourceGroupId",
            "Disk.N.DiskId",
            "Disk.N.Category",
            "Disk.N.PerformanceLevel",
        ),
        "The job is recorded (JobType 2) and listed by DescribeReplicationJobs, but OpenSMC manages no "
        "ECS instances: starting it is refused with OperationDenied.NotSupported.",
    ),
    Action(
        "DescribeReplicationJobs",
        _describe,
        (
            "JobId.N",
            "SourceId.N",
            "InstanceId.N",
            "Name",
            "Status",
            "BusinessStatus",
            "JobType",
            "RegionId",
            "ResourceGroupId",
            "Tag.N.Key",
            "Tag.N.Value",
            "PageNumber",
            "PageSize",
        ),
        "RegionId filters only when it names a configured region (the legacy SDK sends its client "
        "region on every request). Jobs are listed newest first.",
    ),
    Action(
        "ModifyReplicationJobAttribute",
        _modify,
        ("JobId", "Name", "Description", "Frequency", "MaxNumberOfImageToKeep", "ValidTime", *_BEFORE_RUN),
        "SystemDiskSize accepts 20-2048 GiB, as CreateReplicationJob does (older Modify docs say 20-500). "
        "ReplicationParameters may also change while the job runs, is Stopped, InError or Waiting "
        "(SMC's console allows it while Syncing); a running transfer picks up bandwidth_limit within a second.",
    ),
    Action("StartReplicationJob", _start, ("JobId",)),
    Action(
        "StopReplicationJob", _stop, ("JobId",), "Also accepted for a Waiting job (docs/architecture.md, job states)."
    ),
    Action("CutOverReplicationJob", _cut_over, ("JobId", "SyncData")),
    Action(
        "DeleteReplicationJob",
        _delete,
        ("JobId",),
        "The job passes through Deleting and is removed by the orchestrator once its staging is released.",
    ),
)
