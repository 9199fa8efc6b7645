"""A job's staging: what its runs write into on the receiver, kept between runs.

A started job waits in Running/Preparing until :func:`prepare` allocates a
staging index for every disk it moves (``<staging dir>/<volume id>.fidx``,
the volume id made of the job's TransitionInstanceId and the disk's index)
and moves it to Syncing. A staging index names the blob of each chunk the
receiver holds (``opensmc.chunkstore.staging``): 16 bytes per chunk, never a
copy of the data. It outlives a run, so a resumed or incremental run sends
only what it lacks; it is released when the job can never run again
(:func:`sweep_staging`).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from opensmc.chunkstore.snapshots import DiskIndex
from opensmc.chunkstore.staging import StagingError, StagingIndex
from opensmc.domain.enums import BusinessStatus
from opensmc.domain.errors import SmcError
from opensmc.domain.file_layout import Layout, LayoutError, plan
from opensmc.domain.runs import MAY_RUN_AGAIN
from opensmc.domain.selection import copy_ranges, file_level_sizes
from opensmc.faults import crash_point
from opensmc.receiver.space import is_disk_full
from opensmc.service import jobs as job_service
from opensmc.service import leases, receivers, space
from opensmc.service.context import Services
from opensmc.service.jobs_params import source_disks
from opensmc.store import dataplane as q

log = logging.getLogger("opensmc.dataplane")

#: The transfer and dedupe unit. 16 KiB: a run that rewrites 1 % of a disk's 4 KiB blocks at
#: random dirties ~4 % of 16 KiB chunks (~15 % of 64 KiB ones), so three images of such a disk
#: take ~1.2x one; it costs 16 bytes of index per 16 KiB of disk (1 MiB per GiB).
CHUNK_SIZE = 16 * 1024
INDEX_SUFFIX = ".fidx"


def staging_id(job_id: str) -> str:
    """The job's TransitionInstanceId: one staging allocation per job, kept between runs."""
    return "ti-" + job_id.removeprefix("j-")


def volume_id(transition_instance_id: str, disk_index: int) -> str:
    return f"{transition_instance_id}-d{disk_index}"


def index_path(svc: Services, vid: str) -> Path:
    return svc.settings.staging_dir / f"{vid}{INDEX_SUFFIX}"


def job_of_volume(vid: str) -> str | None:
    vid = vid.removesuffix(INDEX_SUFFIX)
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
        file_sizes = file_level_sizes(spec, i, parts, str(disks[i].get("path", "")))
        entry: dict[str, Any] = {"index": i, "path": str(disks[i].get("path", "")), "size_bytes": size}
        if file_sizes:
            layout = disk_layout(job, disks[i], file_sizes)
            entry["ranges"] = [list(r) for r in copy_ranges(size, parts, set(file_sizes), CHUNK_SIZE)]
            entry["excluded"] = sorted(file_sizes)
            entry["files"] = [
                {
                    "device": m.device,
                    "number": m.number,
                    "offset": m.src_offset,
                    "size_bytes": m.src_size,
                    "target_size": m.dst_size,
                    "fs_type": m.fs_type,
                    "mount_point": next(
                        (p.get("mount_point") for p in parts if str(p.get("device")) == m.device), None
                    ),
                }
                for m in layout.file_parts()
            ]
        out.append(entry)
    return out


def disk_layout(job: Any, disk: dict[str, Any], file_sizes: dict[str, int | None]) -> Layout:
    """Where the disk's partitions go in the image (``domain/file_layout.py``); SmcError if they cannot."""
    index = int(disk.get("index", 0))
    what = "system disk" if index == 0 else f"data disk {index}"
    from opensmc.service.disk_sizes import asked_sizes  # disk_sizes reads the image store: not at import

    asked = asked_sizes(job, [{"index": index, "path": disk.get("path", "")}])[0]
    try:
        return plan(disk, file_sizes, asked, what)
    except LayoutError as err:
        raise SmcError(str(err), code="ReplicationJob.PartitionLayoutInvalid", http_status=400) from None


def part_volume_id(vid: str, device: str) -> str:
    """The staging index a partition copied file by file is built into (beside its disk's, same job)."""
    return f"{vid}.p{device}"


def copy_bytes(disk: dict[str, Any]) -> int:
    """Bytes a run copies of a disk of :func:`selected_disks`: its selected ranges, or all of it."""
    ranges = disk.get("ranges")
    block = sum(int(n) for _o, n in ranges) if ranges else int(disk["size_bytes"])
    # a partition copied file by file: its files in the receiver's tree, its new filesystem in the
    # store, and that filesystem's image kept for the next run to patch (at most its target size each)
    return block + 3 * sum(int(f["target_size"]) for f in disk.get("files") or [])


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
            disks = selected_disks(job, disks_json)
            volumes = [(index_path(svc, volume_id(ti, d["index"])), copy_bytes(d)) for d in disks]
            no_room = space.shortfall(svc, volumes)
            if no_room is not None:
                fail(svc, job_id, space.NO_ROOM_CODE, no_room)
                continue
            for disk in disks:
                allocate_volume(svc, volume_id(ti, disk["index"]), disk["size_bytes"])
            try:
                receivers.place(svc, job_id)
            except receivers.NoRoom as why:
                log.debug("job %s waits in Preparing: %s", job_id, why)
                continue
            crash_point("prepare.allocated")
            job_service.mark_prepared(svc, job_id, ti)
            done += 1
        except SmcError as err:
            fail(svc, job_id, err.code, err.message)
        except OSError as err:
            if is_disk_full(err):
                fail(svc, job_id, space.DISK_FULL_CODE, space.guard(svc).message(None))
            else:
                fail(svc, job_id, "Staging.AllocationFailed", f"Cannot allocate the staging volumes: {err}")
    return done


def allocate_volume(svc: Services, vid: str, size: int) -> None:
    """Create the disk's staging index, or keep the existing one (resume, incremental runs)."""
    path = index_path(svc, vid)
    if path.exists():
        try:
            # Only the header: the receiver may hold the index open with entries pending.
            with path.open("rb") as f:
                existing = StagingIndex.parse_header(f.read(64))
            if existing == (size, CHUNK_SIZE):
                return
            log.info("staging index %s was for %s; making a new one for %d bytes", vid, existing, size)
        except (OSError, StagingError):  # an unreadable leftover is replaced below
            log.warning("staging index %s is unreadable; making a new one", vid)
        path.unlink()
    svc.settings.staging_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    StagingIndex.create(path, size, CHUNK_SIZE).close()


def read_staging(svc: Services, vid: str) -> DiskIndex:
    """What the receiver holds durably for a disk."""
    return StagingIndex.read_disk(index_path(svc, vid))


def drop_staged_chunks(svc: Services, vid: str, chunks: list[int]) -> None:
    """Forget chunks of a staging index (found damaged), so that the next run sends them again.

    The file is replaced, not edited: a receiver holding the old one open sees a
    new file and reopens it instead of writing its stale copy back.
    """
    StagingIndex.rewrite_without(index_path(svc, vid), chunks)


def live_staging(svc: Services) -> Iterator[DiskIndex]:
    """Every staging index there is (the roots garbage collection must keep).

    A generator on purpose: the collector reads it under its exclusive lock, so
    no run can checkpoint new entries between this read and the sweep.
    """
    root = svc.settings.staging_dir
    for path in sorted(root.glob(f"*{INDEX_SUFFIX}")) if root.exists() else []:
        try:
            yield StagingIndex.read_disk(path)
        except FileNotFoundError:  # released meanwhile
            continue


def release_staging(svc: Services, job_id: str, transition_instance_id: str | None = None) -> None:
    ti = transition_instance_id or staging_id(job_id)
    root = svc.settings.staging_dir
    if not root.exists():
        return
    for entry in root.iterdir():
        if entry.name.startswith(ti + "-d"):
            _remove(entry)


#: where released entries go to be deleted behind the job's back (a partition's tree of a file-level
#: run holds the partition's files: deleting 100,000 of them took the cutover's Cleaning 10 s and more)
RELEASED = ".released"
_reaping_lock = threading.Lock()
_reaping: set[Path] = set()


def _remove(entry: Path) -> None:
    """Gone from the staging directory at once (a rename); a big entry's contents deleted by a thread."""
    if entry.is_dir() or entry.name.endswith(".img"):  # a partition's tree, its kept image (receiver/filesystems.py)
        trash = entry.parent / RELEASED
        try:
            trash.mkdir(mode=0o700, exist_ok=True)
            os.rename(entry, trash / f"{entry.name}.{secrets.token_hex(4)}")
        except OSError:
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            return
        reap(entry.parent)
    else:
        entry.unlink(missing_ok=True)


def reap(root: Path) -> None:
    """Delete what :func:`_remove` moved aside, on a thread of its own (one per staging directory)."""
    trash = root / RELEASED
    with _reaping_lock:
        if trash in _reaping:
            return
        _reaping.add(trash)

    def run() -> None:
        try:
            while True:
                try:
                    left = list(trash.iterdir())
                except FileNotFoundError:
                    return
                if not left:
                    try:
                        trash.rmdir()  # (a release renaming into it meanwhile deletes its entry itself)
                    except OSError as e:
                        if e.errno == errno.ENOTEMPTY:
                            continue
                    return
                for entry in left:
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        entry.unlink(missing_ok=True)
        finally:
            with _reaping_lock:
                _reaping.discard(trash)

    threading.Thread(target=run, name="staging-reaper", daemon=True).start()


def sweep_staging(svc: Services) -> int:
    """Release staging of jobs that can never run again: gone, Deleting, Finished or Expired.

    Finished matters for CutOverReplicationJob SyncData=false (and expiry) of an
    incremental job: it ends the job without a run, so nothing else releases the
    staging kept between its runs.
    """
    root = svc.settings.staging_dir
    if not root.exists():
        return 0
    if (root / RELEASED).exists():  # what a process that ended left to delete
        reap(root)
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
            _remove(root / name)
            removed += 1
    return removed
