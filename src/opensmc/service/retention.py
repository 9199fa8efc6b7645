"""Which images a job keeps, and giving the space of the others back.

:func:`rotate` keeps at most MaxNumberOfImageToKeep images of an incremental
job (the oldest go first); a deleted image loses its snapshot and the logs kept
beside it (OS adaptation, boot tests), and
:func:`collect_garbage` (each orchestrator pass, when something was deleted)
frees the blobs that no image and no staging index names any more.
"""

from __future__ import annotations

import logging
from typing import Any

from opensmc.images.store import ImageNotFound
from opensmc.service.context import Services
from opensmc.service.images import remove_image_logs, store_of, sweep_image_logs
from opensmc.service.staging import live_staging
from opensmc.store import images as image_q

log = logging.getLogger("opensmc.dataplane")


def rotate(svc: Services, job: Any) -> None:
    """Keep at most MaxNumberOfImageToKeep images of an incremental job (oldest go first)."""
    keep = int(job.max_images or 0)
    if job.run_once or keep <= 0:
        return
    with svc.db.connect() as conn:
        existing = image_q.images_of_job(conn, job.id)
    store = store_of(svc)
    for row in existing[: max(0, len(existing) - keep)]:
        # The snapshot first: a crash in between leaves a row whose image is gone (shown as
        # such, removed again next time), never a snapshot nobody knows about.
        try:
            store.delete_image(row.id)
        except ImageNotFound:
            log.warning("image %s was already gone from the image store", row.id)
        remove_image_logs(svc, row.id)  # its OS adaptation log and boot tests, before the row that names them
        with svc.db.begin() as conn:
            image_q.remove_image(conn, row.id)


def collect_garbage(svc: Services) -> bool:
    """Run the store's garbage collection if an image was deleted since the last one; True if it ran.

    It does not wait: while a run writes (or an export reads) it is deferred to a later pass.
    """
    store = store_of(svc)
    if not store.gc_wanted():
        return False
    report = store.gc(live_staging(svc))
    if report.deferred:
        return False
    for err in report.errors:
        log.error("gc: %s", err)
    swept = sweep_image_logs(svc)  # log folders a crash left without their image
    if swept:
        log.info("gc: removed the logs of %d deleted image(s)", swept)
    return True
