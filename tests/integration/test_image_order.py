"""A job's images are ordered by run, so rotation never deletes the newest image.

Found by tests/e2e/test_phase_kills.py: two runs that finished within one
second got the same created_at, the random image ids decided the order, and
MaxNumberOfImageToKeep=1 deleted the run that had just been made.
"""

from __future__ import annotations

from datetime import UTC, datetime

from opensmc.service.context import Caller, Services
from opensmc.store import images as image_q


def test_images_of_a_job_are_oldest_run_first_within_one_second(services: Services, caller: Caller) -> None:
    now = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)
    with services.db.begin() as conn:
        # The later run's id sorts first, and both were made in the same second.
        made = (("m-zzzzzzzzzzzzzzzzzzzz", 1), ("m-aaaaaaaaaaaaaaaaaaaa", 2), ("m-mmmmmmmmmmmmmmmmmmmm", 3))
        for image_id, run_id in made:
            image_q.add_image(conn, image_id=image_id, account_id=caller.account_id, job_id="j-1", run_id=run_id,
                              name=image_id, manifest="{}", now=now)  # fmt: skip
    with services.db.connect() as conn:
        assert [r.run_id for r in image_q.images_of_job(conn, "j-1")] == [1, 2, 3]
