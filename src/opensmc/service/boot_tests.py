"""A job's ``boot_test: true``: boot every new image in Processing, keep the verdict; NotPassed warnings.

:func:`after_sealing` is called by Processing (``sealing._process_one``) once
the image is Available. It boots the system disk (:mod:`opensmc.images.boot`)
and records the verdict in the run's record (``job_runs.detail``
``boot_test``). A failed boot does not fail the job: like SMC's migration
test, it is a warning (a workgroup's ``NotPassed``), the image stays for the
operator to look at. A test that cannot run (no QEMU here) is recorded as
``not-run`` with the reason, and logged.

The test runs on the job's Processing worker thread (``sealing``, one guest
at a time per process: ``os_adaptation.guest_slot``), holding the job's
lease, which keeps the job in Cleaning until it ends; ``boot_test_timeout``
(seconds, default 300) is capped at 480. Other jobs do not wait for it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, func, select, update

from opensmc.images.boot import BootTestError, boot_test, latest_verdicts, results_dir
from opensmc.images.store import ImageError
from opensmc.service.agent_tasks import replication_parameters
from opensmc.service.context import Services
from opensmc.service.images import store_of
from opensmc.store.tables import images, job_runs, jobs

log = logging.getLogger("opensmc.dataplane")

DEFAULT_TIMEOUT = 300.0
MAX_TIMEOUT = 480.0  # a job waits in Cleaning for its test: minutes at most, with room for QEMU's start


def wanted(job: Any) -> bool:
    return replication_parameters(job.replication_parameters).get("boot_test") is True


def after_sealing(svc: Services, job: Any, run_id: int | None, image_id: str) -> dict[str, Any] | None:
    """Boot-test the new image when the job asks for it; returns what was recorded (None: not asked)."""
    if not wanted(job):
        return None
    params = replication_parameters(job.replication_parameters)
    timeout = min(float(params.get("boot_test_timeout") or DEFAULT_TIMEOUT), MAX_TIMEOUT)
    try:
        verdict = boot_test(
            store_of(svc), image_id, results_dir(svc.settings.data_dir), timeout=timeout
        )
        record: dict[str, Any] = {
            "image_id": image_id, "verdict": verdict.verdict, "stage": verdict.stage, "reason": verdict.reason,
            "log": verdict.log, "seconds": verdict.seconds, "accel": verdict.accel,
        }  # fmt: skip
    except (BootTestError, ImageError, OSError) as exc:
        # The job has moved on to Cleaning already: a test that cannot run is noted, never a job failure.
        record = {"image_id": image_id, "verdict": "not-run", "reason": str(exc)}
    log.info("job %s image %s: boot test %s: %s", job.id, image_id, record["verdict"], record["reason"])
    if run_id is not None:
        with svc.db.begin() as conn:
            row = conn.execute(select(job_runs.c.detail).where(job_runs.c.id == run_id)).first()
            try:
                detail = json.loads(row.detail or "{}") if row is not None else {}
            except ValueError:
                detail = {}
            detail["boot_test"] = record
            conn.execute(update(job_runs).where(job_runs.c.id == run_id).values(detail=json.dumps(detail)))
    return record


def not_passed(svc: Services, conn: Connection, source_ids: Sequence[str]) -> list[str]:
    """The sources whose latest image's latest boot test of its system disk failed (SMC's NotPassed)."""
    out: list[str] = []
    root = results_dir(svc.settings.data_dir)
    for source_id in source_ids:
        row = conn.execute(
            select(images.c.id)
            .join(jobs, jobs.c.id == images.c.job_id)
            .where(jobs.c.source_id == source_id, images.c.state == "Available")
            # a job's runs can finish within one second of created_at: the later run is the latest
            .order_by(images.c.created_at.desc(), func.coalesce(images.c.run_id, 0).desc(), images.c.id.desc())
            .limit(1)
        ).first()
        if row is None:
            continue
        test = latest_verdicts(root, str(row.id)).get(0)
        if test is not None and test.get("passed") is False:
            out.append(source_id)
    return out
