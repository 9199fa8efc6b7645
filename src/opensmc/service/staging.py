"""A job's staging: what its runs write into on the receiver, kept between runs.

A started job waits in Running/Preparing until :func:`prepare` allocates a
staging volume for every disk it moves (named by the job's
TransitionInstanceId and the disk's index) and moves it to Syncing. Staging
outlives a run, so a resumed or incremental run sends only what it lacks; it
is released when the job can never run again (:func:`sweep_staging`).
"""

from __future__ import annotations

import json
import logging
import shutil
from typing import Any

from opensmc.domain.enums import BusinessStatus
from opensmc.domain.errors import SmcError
from opensmc.domain.runs import MAY_RUN_AGAIN
from opensmc.domain.selection import copy_ranges, excluded_devices
from opensmc.receiver.volume import StagingVolume
from opensmc.service import jobs as job_service
from opensmc.service import leases
from opensmc.service.context import Services
from opensmc.service.jobs_params import source_disks
from opensmc.store import dataplane as q

log = logging.getLogger("opensmc.dataplane")

CHUNK_SIZE = 64 * 1024


def staging_id(job_id: str) -> str:
    """The job's TransitionInstanceId: one staging allocation per job, kept between runs."""
    return "ti-" + job_id.removeprefix("j-")


def volume_id(transition_instance_id: str, disk_index: int) -> str:
    return f"{transition_instance_id}-d{disk_index}"


def job_of_volume(vid: str) -> str | None:
    head, sep, _disk = vid.rpartition("-d")
    return "j-" + head.removeprefix("ti-") if sep and head.startswith("ti-") else None


def selected_disks(job: Any, source_disks_json: str) -> list[dict[str, Any]]:
    """The source disks a job moves: the system disk, plus the data disks it names."""
    disks = source_disks(source_disks_json)
    if 0 not in disks:
        raise SmcError(
            "The source server reported no system disk; restart the agent so that it reports its disks.",
            code="SourceServer.NoDisk",
            http_status=400,
        )
    spec = json.loads(job.disk_spec or "{}")
    chosen = {0}
    for item in spec.get("DataDisks") or []:
        chosen.add(int(item["Index"]))
    for item in (spec.get("Disks") or {}).get("Data") or []:
        disk_id = str(item.get("DiskId", ""))
        for index, disk in disks.items():
            if index and disk_id in (str(index), str(disk.get("path", "")), str(disk.get("disk_id", ""))):
                chosen.add(index)
    missing = sorted(chosen - set(disks))
    if missing:
        raise SmcError(
            f"The job selects data disk(s) {missing} that the source no longer reports.",
            code="ReplicationJobDataDiskIndex.Invalid",
            http_status=400,
        )
    out: list[dict[str, Any]] = []
    for i in sorted(chosen):
        size = int(disks[i]["size_bytes"])
        parts = list(disks[i].get("parts") or disks[i].get("partitions") or [])
        excluded = excluded_devices(spec, i, parts)
        entry: dict[str, Any] = {"index": i, "path": str(disks[i].get("path", "")), "size_bytes": size}
        if excluded:
            entry["ranges"] = [list(r) for r in copy_ranges(size, parts, excluded, CHUNK_SIZE)]
            entry["excluded"] = sorted(excluded)
        out.append(entry)
    return out


def fail(svc: Services, job_id: str, code: str, message: str) -> None:
    """Turn a running job InError (nothing to do if it has moved on: stopped, deleted)."""
    log.warning("job %s failed: %s: %s", job_id, code, message)
    try:
        job_service.mark_failed(svc, job_id, code, job_service.status_info(code, message))
    except SmcError:
        pass


def prepare(svc: Services) -> int:
    """Allocate staging for every job waiting in Preparing; returns how many moved on."""
    done = 0
    for job_id in leases.each_leased(svc, BusinessStatus.PREPARING):
        try:
            with svc.db.connect() as conn:
                job, disks_json = q.job_with_disks(conn, job_id)
            ti = job.transition_instance_id or staging_id(job_id)
            for disk in selected_disks(job, disks_json):
                allocate_volume(svc, volume_id(ti, disk["index"]), disk["size_bytes"])
            job_service.mark_prepared(svc, job_id, ti)
            done += 1
        except SmcError as err:
            fail(svc, job_id, err.code, err.message)
        except OSError as err:
            fail(svc, job_id, "Staging.AllocationFailed", f"Cannot allocate the staging volumes: {err}")
    return done


def allocate_volume(svc: Services, vid: str, size: int) -> None:
    """Create the sparse staging volume, or keep the existing one (resume, incremental runs)."""
    directory = svc.settings.staging_dir / vid
    if directory.exists():
        try:
            # Only the volume's metadata: StagingVolume.open() of a volume left dirty (a run
            # stopped or interrupted before its flush) rebuilds and checkpoints it, removing
            # the dirty marker under the receiver, which still holds the volume open and
            # then fails its next flush (500) and loses its crash protection.
            meta = json.loads((directory / "volume.json").read_text())
            if int(meta["size"]) == size and meta.get("version") == 1:
                return
        except Exception:  # an unreadable leftover is replaced below
            log.warning("staging volume %s is unreadable; making a new one", vid)
        shutil.rmtree(directory)
    svc.settings.staging_dir.mkdir(parents=True, exist_ok=True)
    StagingVolume.create(directory, size, CHUNK_SIZE).close()


def release_staging(svc: Services, job_id: str, transition_instance_id: str | None = None) -> None:
    ti = transition_instance_id or staging_id(job_id)
    root = svc.settings.staging_dir
    if not root.exists():
        return
    for entry in root.iterdir():
        if entry.name.startswith(ti + "-d"):
            shutil.rmtree(entry, ignore_errors=True)


def sweep_staging(svc: Services) -> int:
    """Release staging of jobs that can never run again: gone, Deleting, Finished or Expired.

    Finished matters for CutOverReplicationJob SyncData=false (and expiry) of an
    incremental job: it ends the job without a run, so nothing else releases the
    staging kept between its runs.
    """
    root = svc.settings.staging_dir
    if not root.exists():
        return 0
    removed = 0
    owners: dict[str, list[str]] = {}
    for entry in root.iterdir():
        job_id = job_of_volume(entry.name)
        if job_id:
            owners.setdefault(job_id, []).append(entry.name)
    if not owners:
        return 0
    with svc.db.connect() as conn:
        alive = q.jobs_that_may_run(conn, list(owners), MAY_RUN_AGAIN)
    for job_id, names in owners.items():
        if job_id in alive:
            continue
        for name in names:
            shutil.rmtree(root / name, ignore_errors=True)
            removed += 1
    return removed
