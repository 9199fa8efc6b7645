"""Processing: a run's staging becomes an immutable image; then Cleaning.

:func:`process` makes the image of every job in Running/Processing, each
on a worker thread that holds the job's lease (the orchestrator's pass goes
on at once: OS adaptation and a boot test take minutes). The image row is
written first (state ``Creating``), so a crash leaves a record of what to
clean up; the row turns ``Available`` in the same transaction
that moves the job to Cleaning, so each run yields exactly one image
however often the step is retried. :func:`clean` then rotates old images,
releases staging when the job finishes and closes the run; it is idempotent,
so a job found in Cleaning after a crash simply finishes.

With OS adaptation (:mod:`opensmc.service.os_adaptation`, on by default)
the disks are first sealed into a temporary snapshot that libguestfs reads
over NBD; the image is then sealed from the adapted system disk, and the
temporary snapshot removed (by :func:`discard_half_made` too, after a crash).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from functools import partial
from typing import Any

from sqlalchemy import Connection

from opensmc.chunkstore.snapshots import DiskIndex
from opensmc.clock import new_id
from opensmc.domain.enums import BusinessStatus
from opensmc.domain.errors import SmcError
from opensmc.faults import crash_point
from opensmc.images.adaptation import AdaptError, harvest, nothing_to_boot
from opensmc.images.adaptation_log import source_id
from opensmc.images.store import ImageCorrupt, ImageError, ImageStore
from opensmc.service import boot_tests, disk_sizes, file_images, leases, os_adaptation, retention
from opensmc.service import jobs as job_service
from opensmc.service.agent_tasks import current_run, replication_parameters
from opensmc.service.context import Services
from opensmc.service.images import remove_image_logs, store_of
from opensmc.service.jobs_params import source_disks
from opensmc.service.staging import (
    disk_layout,
    drop_staged_chunks,
    fail,
    part_volume_id,
    read_staging,
    release_staging,
    selected_disks,
    staging_id,
    volume_id,
)
from opensmc.store import dataplane as q
from opensmc.store import images as image_q

log = logging.getLogger("opensmc.dataplane")


def image_store(svc: Services) -> ImageStore:
    return store_of(svc)


def process(svc: Services) -> int:
    """Start making the image of every job in Processing whose lease this process gets; returns how many.

    Each job's step runs on a worker thread of its own (:func:`leases.start_leased`),
    so the orchestrator's pass never waits for one: sealing alone takes
    milliseconds, but OS adaptation and a boot test take minutes. The job
    stays in Processing until its image is made (adapted), as SMC's does:
    the image a Finished job names is the one to use.
    """
    started = 0
    for job_id, stale in leases.ids_in(svc, BusinessStatus.PROCESSING):
        if leases.start_leased(svc, job_id, BusinessStatus.PROCESSING, stale, partial(_process_guarded, svc, job_id)):
            started += 1
    return started


def _process_guarded(svc: Services, job_id: str) -> None:
    """One job's Processing step, on its worker thread: a failure puts the job InError with its reason."""
    try:
        _process_one(svc, job_id)
    except ImageCorrupt as err:
        fail(
            svc,
            job_id,
            "Image.ChecksumFailed",
            f"checksum verification failed: {err}; start the job again to send the damaged data again",
        )
    except (ImageError, OSError) as err:
        fail(svc, job_id, "Image.CreateFailed", f"Cannot create the image: {err}")
    except SmcError as err:
        fail(svc, job_id, err.code, err.message)


def clean(svc: Services) -> int:
    """Finish every job in Cleaning: rotate images, release staging if it is done; Finished or Waiting."""
    done = 0
    for job_id in leases.each_leased(svc, BusinessStatus.CLEANING):
        try:
            with svc.db.connect() as conn:
                job, _disks = q.job_with_disks(conn, job_id)
            retention.rotate(svc, job)
            crash_point("clean.rotated")
            if job.run_once or job.final_run:
                release_staging(svc, job_id, job.transition_instance_id)
            crash_point("clean.released")
            job_service.mark_cleaned(svc, job_id)
            done += 1
        except SmcError as err:
            fail(svc, job_id, err.code, err.message)
        except (ImageError, OSError) as err:
            fail(svc, job_id, "Image.CleanFailed", f"Cannot clean up after the run: {err}")
    return done


def _process_one(svc: Services, job_id: str) -> None:
    started = time.monotonic()
    with svc.db.connect() as conn:
        job, disks_json = q.job_with_disks(conn, job_id)
    _s, _b, run_id = current_run(svc, job_id)
    ti = job.transition_instance_id or staging_id(job_id)
    disks = selected_disks(job, disks_json)
    store = image_store(svc)
    discard_half_made(svc, store, job_id)
    image_id = new_id("m-")
    # The row comes first (state Creating): a crash from here on leaves a record of what to clean up.
    with svc.db.begin() as conn:
        image_q.add_image(
            conn,
            image_id=image_id,
            account_id=job.account_id,
            job_id=job_id,
            run_id=run_id,
            name=_image_name(conn, job, run_id),
            manifest="{}",
            now=svc.clock(),
            state=image_q.CREATING,
        )
    crash_point("process.recorded")
    checksum = bool(replication_parameters(job.replication_parameters).get("checksum"))
    system = next(i for i, d in enumerate(disks) if int(d["index"]) == 0)
    adapting = os_adaptation.wanted(svc, job)
    adapted: dict[str, Any] | None = None
    try:
        # Under the store's gc lock: the blobs the staging indexes name stay until the
        # snapshot that names them exists. No data is read or copied (without checksum).
        with store.repo.session():
            vids = [volume_id(ti, d["index"]) for d in disks]
            staged = [read_staging(svc, vid) for vid in vids]
            # Partitions copied file by file: the disk is composed anew (service/file_images.py).
            staged = [
                _with_file_parts(svc, store, job, disks_json, d, vid, s)
                for d, vid, s in zip(disks, vids, staged, strict=True)
            ]
            # The sizes the job asked for (source bytes, then zero chunks): before the proof, which hashes them.
            staged = disk_sizes.grow_all(store, job, disks, staged)
            verified: bool | None = None
            if checksum:
                staged, verified = _prove(svc, store, image_id, vids, staged)
            skipped = nothing_to_boot(store, staged[system]) if adapting else None
            if skipped is not None:
                adapting = False
                adapted = os_adaptation.record_skipped(svc, image_id, system, skipped)
            if not adapting:
                manifest = store.create_image(image_id, staged)
            else:
                # The disks as they came, for libguestfs to read over NBD (and to hold their blobs meanwhile).
                store.create_image(source_id(image_id), staged)
        if adapting:
            crash_point("process.adapting")
            with os_adaptation.guest_slot(job_id):
                result = os_adaptation.run(svc, store, job_id, source_id(image_id), system)
            try:
                with store.repo.session():
                    if result.adapted:
                        try:
                            adapted_disk = harvest(store, staged[system], result)
                            staged[system] = _with_sha256(store, adapted_disk) if checksum else adapted_disk
                        except (AdaptError, ImageError, OSError) as exc:  # the image is the source's bytes then
                            result.adapted = False
                            result.warnings.append(f"the adapted disk could not be stored: {exc}")
                    manifest = store.create_image(image_id, staged)
            finally:
                result.cleanup()
            adapted = os_adaptation.record(svc, image_id, system, result)
            _drop_source_snapshot(store, image_id)
    except BaseException:
        discard_half_made(svc, store, job_id)
        raise
    crash_point("process.sealed")
    doc = {
        "disks": [
            {"index": d["index"], "size": m.size, "sha256": m.sha256, "chunk_size": m.chunk_size}
            for d, m in zip(disks, manifest.disks, strict=True)
        ],
        "checksum_verified": verified,
    }

    def publish(conn: Connection) -> None:
        image_q.set_image(conn, image_id, state="Available", manifest=json.dumps(doc))
        if run_id is not None:
            q.set_run_checksum(conn, run_id, verified)
        if adapted is not None:
            os_adaptation.publish(conn, job_id, run_id, adapted)

    job_service.mark_processed(svc, job_id, image_id, also=publish)
    log.info(
        "job %s: image %s sealed in %.3f s (%d chunks%s)",
        job_id,
        image_id,
        time.monotonic() - started,
        sum(d.chunks for d in staged),
        ", every blob re-read" if checksum else "",
    )
    # ReplicationParameters boot_test: boot the new image; its verdict goes into the run's record. The job
    # is in Cleaning already, and finishes once this worker lets its lease go (after the test).
    if boot_tests.wanted(job):
        with os_adaptation.guest_slot(job_id):
            boot_tests.after_sealing(svc, job, run_id, image_id)


def _with_file_parts(
    svc: Services, store: ImageStore, job: Any, disks_json: str, disk: dict[str, Any], vid: str, staged: DiskIndex
) -> DiskIndex:
    if not disk.get("files"):
        return staged
    index = int(disk["index"])
    facts = {**source_disks(disks_json)[index], "index": index}
    layout = disk_layout(job, facts, {str(f["device"]): int(f["target_size"]) for f in disk["files"]})
    parts: dict[str, DiskIndex] = {}
    for f in disk["files"]:
        try:
            parts[str(f["device"])] = read_staging(svc, part_volume_id(vid, str(f["device"])))
        except FileNotFoundError:
            raise ImageError(
                f"partition {f['device']} was to be copied file by file, but the receiver holds no filesystem "
                "built for it: start the job again"
            ) from None
    return file_images.compose(store, layout, staged, parts)


def _prove(
    svc: Services, store: ImageStore, image_id: str, vids: list[str], staged: list[DiskIndex]
) -> tuple[list[DiskIndex], bool]:
    """``checksum``: re-read every blob the run's disks name and compute each disk's SHA-256.

    Each blob must re-hash to the digest the receiver recorded for it, which is
    the digest of bytes whose frame matched the hash the agent computed on the
    source; the SHA-256s go into the image, so every later export and verify
    checks the whole disk against them. A blob that fails is dropped from the
    staging index and forgotten by the store, so the next run sends it again.
    """
    out: list[DiskIndex] = []
    damaged: list[str] = []
    for position, (vid, disk) in enumerate(zip(vids, staged, strict=True)):
        sha = hashlib.sha256()
        bad: list[int] = []
        for i in range(disk.chunks):
            h = disk.hash_at(i)
            if h is None:
                sha.update(bytes(disk.chunk_length(i)))
                continue
            try:
                sha.update(store.read_chunk(h))
            except ImageCorrupt:
                bad.append(i)
                store.repo.forget(h)
        if bad:
            drop_staged_chunks(svc, vid, bad)
            damaged.append(f"disk {position}: chunk {', '.join(map(str, bad[:5]))}{' …' if len(bad) > 5 else ''}")
        out.append(DiskIndex(disk.size, disk.chunk_size, disk.digests, sha.hexdigest()))
    if damaged:
        raise ImageCorrupt(
            f"data damaged in the image store ({'; '.join(damaged)}); the damaged chunks were dropped "
            "from staging and will be sent again"
        )
    log.info("image %s: every blob re-read and proven", image_id)
    return out, True


def discard_half_made(svc: Services, store: ImageStore, job_id: str) -> None:
    """Remove images of this job that a failed or killed attempt left in state Creating."""
    with svc.db.connect() as conn:
        leftovers = image_q.creating_of_job(conn, job_id)
    for image_id in leftovers:
        try:
            store.delete_image(image_id)
        except ImageError:
            pass  # the store never got as far as this image
        _drop_source_snapshot(store, image_id)
        remove_image_logs(svc, image_id)  # an adaptation log written before the crash
        with svc.db.begin() as conn:
            image_q.remove_image(conn, image_id)
        log.info("removed half-made image %s of job %s", image_id, job_id)


def _drop_source_snapshot(store: ImageStore, image_id: str) -> None:
    """Remove the temporary snapshot OS adaptation read (its blobs the image shares stay)."""
    try:
        store.delete_image(source_id(image_id))
    except ImageError:
        pass  # not adapted, or removed already


def _with_sha256(store: ImageStore, disk: DiskIndex) -> DiskIndex:
    """``checksum``: the adapted disk's SHA-256, from its blobs (each re-hashed as it is read)."""
    sha = hashlib.sha256()
    for i in range(disk.chunks):
        h = disk.hash_at(i)
        sha.update(bytes(disk.chunk_length(i)) if h is None else store.read_chunk(h))
    return DiskIndex(disk.size, disk.chunk_size, disk.digests, sha.hexdigest())


def _image_name(conn: Any, job: Any, run_id: int | None) -> str:
    # ImageName, or "<job name>-run<N>"; if taken, `_<JobId>` is appended, as SMC does.
    base = job.image_name or f"{job.name}-run{run_id or 0}"
    if not image_q.name_taken(conn, job.account_id, base):
        return str(base)
    name = f"{base}_{job.id}"
    n = 2
    while image_q.name_taken(conn, job.account_id, name):
        name = f"{base}_{job.id}_{n}"
        n += 1
    return name
