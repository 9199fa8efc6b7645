"""OS adaptation in Processing: a Linux system disk made bootable on KVM (virtio), as a new image's chunks.

On by default for the system disk of a source that is not Windows;
``ReplicationParameters`` ``{"os_adaptation": false}`` turns it off.
:mod:`opensmc.service.sealing` seals the run's disks into a temporary
snapshot (:func:`~opensmc.images.adaptation_log.source_id`), calls
:func:`run`, then seals the image from the adapted system disk (the chunks
libguestfs changed, :func:`~opensmc.images.adaptation.harvest`) and the
other disks as they came. A guest that is not recognised, or an adaptation
that fails or takes too long, never fails the job: the image is the source's
bytes, the run's record (``job_runs.detail`` ``os_adaptation``) and the job's
StatusInfo carry the warning, and the log says what was tried.

It runs on the job's Processing worker thread (:func:`opensmc.service.leases.start_leased`),
never in the orchestrator's pass, one guest at a time per server process (:func:`guest_slot`).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, select, update

from opensmc.images.adaptation import Adaptation, adapt
from opensmc.images.adaptation_log import keep, results_dir
from opensmc.images.boot import KVM_NOTE
from opensmc.images.boot import results_dir as boot_results_dir
from opensmc.images.store import ImageStore
from opensmc.service.agent_tasks import replication_parameters
from opensmc.service.context import Services
from opensmc.service.jobs import status_info
from opensmc.store.tables import job_runs, jobs, sources

log = logging.getLogger("opensmc.dataplane")

#: StatusInfo's code when a run's image could not be adapted (a warning: the job does not fail)
NOT_ADAPTED = "OsAdaptation.NotAdapted"


#: guests (a libguestfs appliance, a boot test's QEMU) this server process runs at once: each is a VM that
#: takes a core or more under TCG, so further jobs' adaptations and boot tests queue here, each on its worker
GUESTS = 1
_slots = threading.BoundedSemaphore(GUESTS)


@contextmanager
def guest_slot(job_id: str) -> Iterator[None]:
    """Hold one of :data:`GUESTS` while a guest runs for this job (the job's worker waits for it, leased)."""
    if not _slots.acquire(blocking=False):
        log.info("job %s: waiting for another job's adaptation or boot test to end (%d at a time)", job_id, GUESTS)
        _slots.acquire()
    try:
        yield
    finally:
        _slots.release()


def wanted(svc: Services, job: Any) -> bool:
    """Adapt this job's system disk: unless ``os_adaptation`` is false or the source runs Windows."""
    if replication_parameters(job.replication_parameters).get("os_adaptation", True) is False:
        return False
    with svc.db.connect() as conn:
        platform = conn.execute(select(sources.c.platform).where(sources.c.id == job.source_id)).scalar()
    return not str(platform or "").lower().startswith("windows")


def run(svc: Services, store: ImageStore, job_id: str, source_id: str, disk: int) -> Adaptation:
    """Adapt disk ``disk`` of the temporary snapshot ``source_id``; never raises for the guest's sake."""
    data_dir = svc.settings.data_dir
    result = adapt(store, source_id, disk, data_dir / "tmp", boot_results_dir(data_dir) / KVM_NOTE)
    log.info(
        "job %s: OS adaptation %s (%s) in %.0f s: %d changes%s",
        job_id, "done" if result.adapted else "NOT done", result.guest or "unknown guest", result.seconds,
        len(result.changes), f"; {'; '.join(result.warnings)}" if result.warnings else "",
    )  # fmt: skip
    return result


def record(svc: Services, image_id: str, disk: int, result: Adaptation) -> dict[str, Any]:
    """Keep the adaptation's log beside the store; what the run's record holds."""
    doc = {"image_id": image_id, "disk": disk, **result.to_json()}
    path = keep(results_dir(svc.settings.data_dir), image_id, disk, doc)
    return {**doc, "log": str(path), "changes": len(result.changes)}


def record_skipped(svc: Services, image_id: str, disk: int, reason: str) -> dict[str, Any]:
    """A system disk with nothing to adapt (it has no bootloader): recorded, not a warning on the job."""
    return {**record(svc, image_id, disk, Adaptation(warnings=[reason])), "skipped": True}


def publish(conn: Connection, job_id: str, run_id: int | None, summary: dict[str, Any]) -> None:
    """In the transaction that makes the image Available: the run's record, and the warning if not adapted."""
    if run_id is not None:
        row = conn.execute(select(job_runs.c.detail).where(job_runs.c.id == run_id)).first()
        try:
            detail = json.loads(row.detail or "{}") if row is not None else {}
        except ValueError:
            detail = {}
        detail["os_adaptation"] = summary
        conn.execute(update(job_runs).where(job_runs.c.id == run_id).values(detail=json.dumps(detail)))
    if not summary.get("adapted") and not summary.get("skipped"):
        message = (
            f"The image {summary['image_id']} is not adapted for KVM: {'; '.join(summary.get('warnings') or [])}. "
            f"It holds the source's bytes and boots where the source's hardware did; see {summary.get('log')}."
        )
        conn.execute(update(jobs).where(jobs.c.id == job_id).values(status_info=status_info(NOT_ADAPTED, message)))
