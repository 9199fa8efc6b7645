"""Which images a job keeps: at most MaxNumberOfImageToKeep, the oldest go first."""

from __future__ import annotations

import logging
from typing import Any

from opensmc.images.store import ImageError, ImageStore
from opensmc.service.context import Services
from opensmc.store import images as image_q

log = logging.getLogger("opensmc.dataplane")


def rotate(svc: Services, job: Any) -> None:
    """Keep at most MaxNumberOfImageToKeep images of an incremental job (oldest go first)."""
    keep = int(job.max_images or 0)
    if job.run_once or keep <= 0:
        return
    with svc.db.connect() as conn:
        existing = image_q.images_of_job(conn, job.id)
    store = ImageStore(svc.settings.images_dir)
    for row in existing[: max(0, len(existing) - keep)]:
        with svc.db.begin() as conn:
            image_q.remove_image(conn, row.id)
        try:
            store.delete_image(row.id)
        except ImageError:
            log.warning("image %s was already gone from the image store", row.id)
