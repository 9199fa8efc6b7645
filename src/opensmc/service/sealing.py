"""Processing: a run's staging becomes an immutable image; then Cleaning.

:func:`process` makes the image of every job in Running/Processing. The
image row is written first (state ``Creating``), so a crash leaves a record
of what to clean up; the row turns ``Available`` in the same transaction
that moves the job to Cleaning, so each run yields exactly one image
however often the step is retried. :func:`clean` then rotates old images,
releases staging when the job finishes and closes the run; it is idempotent,
so a job found in Cleaning after a crash simply finishes.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from sqlalchemy import Connection

from opensmc.clock import new_id
from opensmc.domain.enums import BusinessStatus
from opensmc.domain.errors import SmcError
from opensmc.images.store import ImageCorrupt, ImageError, ImageStore, compare_with_source
from opensmc.receiver.volume import StagingVolume
from opensmc.service import jobs as job_service
from opensmc.service import leases, retention
from opensmc.service.agent_tasks import current_run, replication_parameters
from opensmc.service.context import Services
from opensmc.service.staging import fail, release_staging, selected_disks, staging_id, volume_id
from opensmc.store import dataplane as q
from opensmc.store import images as image_q

log = logging.getLogger("opensmc.dataplane")


def image_store(svc: Services) -> ImageStore:
    return ImageStore(svc.settings.images_dir)


def process(svc: Services) -> int:
    """Make the image of every job in Processing; returns how many moved on to Cleaning."""
    done = 0
    for job_id in leases.each_leased(svc, BusinessStatus.PROCESSING):
        try:
            _process_one(svc, job_id)
            done += 1
        except (ImageError, OSError) as err:
            fail(svc, job_id, "Image.CreateFailed", f"Cannot create the image: {err}")
        except SmcError as err:
            fail(svc, job_id, err.code, err.message)
    return done


def clean(svc: Services) -> int:
    """Finish every job in Cleaning: rotate images, release staging if it is done; Finished or Waiting."""
    done = 0
    for job_id in leases.each_leased(svc, BusinessStatus.CLEANING):
        try:
            with svc.db.connect() as conn:
                job, _disks = q.job_with_disks(conn, job_id)
            retention.rotate(svc, job)
            if job.run_once or job.final_run:
                release_staging(svc, job_id, job.transition_instance_id)
            job_service.mark_cleaned(svc, job_id)
            done += 1
        except SmcError as err:
            fail(svc, job_id, err.code, err.message)
        except (ImageError, OSError) as err:
            fail(svc, job_id, "Image.CleanFailed", f"Cannot clean up after the run: {err}")
    return done


def _process_one(svc: Services, job_id: str) -> None:
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
    volumes = [StagingVolume.open(svc.settings.staging_dir / volume_id(ti, d["index"])) for d in disks]
    try:
        try:
            manifest = store.create_image(image_id, volumes)
        except ImageCorrupt as err:
            # Staging data damaged at rest: forget the bad chunks so that the next
            # StartReplicationJob sends them again, and say so.
            bad = sum(len(v.scrub()) for v in volumes)
            raise ImageError(
                f"{err}; {bad} damaged chunk(s) were dropped from the staging volume and will be sent "
                "again: start the job again"
            ) from err
        verified: bool | None = None
        if replication_parameters(job.replication_parameters).get("checksum"):
            # The volume maps hold the hashes the agent computed on the source and the
            # receiver checked frame by frame; the image must match them chunk for chunk,
            # and its stored chunks must re-hash to the manifest.
            mismatched = [
                i for d, v in zip(manifest.disks, volumes, strict=True) for i in compare_with_source(d, v.hashes())
            ]
            report = store.verify(image_id)
            verified = not mismatched and report.ok
            if not verified:
                raise ImageError(f"checksum verification failed: {len(mismatched)} chunk(s) differ, report {report}")
    except BaseException:
        discard_half_made(svc, store, job_id)
        raise
    finally:
        for v in volumes:
            v.close()
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

    job_service.mark_processed(svc, job_id, image_id, also=publish)


def discard_half_made(svc: Services, store: ImageStore, job_id: str) -> None:
    """Remove images of this job that a failed or killed attempt left in state Creating."""
    with svc.db.connect() as conn:
        leftovers = image_q.creating_of_job(conn, job_id)
    for image_id in leftovers:
        try:
            store.delete_image(image_id)
        except ImageError:
            pass  # the store never got as far as this image
        with svc.db.begin() as conn:
            image_q.remove_image(conn, image_id)
        log.info("removed half-made image %s of job %s", image_id, job_id)


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
