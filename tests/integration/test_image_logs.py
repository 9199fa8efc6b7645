"""The OS adaptation log and boot tests kept beside an image go with the image.

``<data dir>/os-adaptation/<image id>/`` and ``<data dir>/boot-tests/<image id>/``
are deleted when MaxNumberOfImageToKeep rotates the image away or a half-made
image is discarded, and the garbage collection's pass removes folders whose
image no row names (a crash between the two, or an older version's leftovers).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

from opensmc.images.adaptation_log import keep
from opensmc.images.adaptation_log import results_dir as adaptation_dir
from opensmc.images.boot import KVM_NOTE
from opensmc.images.boot import results_dir as boot_dir
from opensmc.service import retention, sealing
from opensmc.service.context import Caller, Services
from opensmc.service.images import store_of, sweep_image_logs
from opensmc.store import images as image_q


def _image(services: Services, caller: Caller, image_id: str, run_id: int, state: str = "Available") -> None:
    with services.db.begin() as conn:
        image_q.add_image(conn, image_id=image_id, account_id=caller.account_id, job_id="j-logs", run_id=run_id,
                          name=image_id, manifest="{}", now=datetime(2026, 12, 1, tzinfo=UTC), state=state)  # fmt: skip


def _logs(services: Services, image_id: str) -> list[Path]:
    """An adaptation log and a boot test of disk 0, as Processing and ``image boot-test`` leave them."""
    data = services.settings.data_dir
    adaptation = keep(adaptation_dir(data), image_id, 0, {"image_id": image_id, "adapted": True, "changes": []})
    boot = boot_dir(data) / image_id
    boot.mkdir(parents=True)
    (boot / "latest-disk0.json").write_text('{"disk": 0, "passed": true}')
    return [adaptation.parent, boot]


def test_rotation_deletes_the_logs_of_the_images_it_deletes(services: Services, caller: Caller) -> None:
    ids = ["m-logsold00000000000001", "m-logsold00000000000002", "m-logsnew00000000000003"]
    folders = {}
    for run_id, image_id in enumerate(ids, start=1):
        _image(services, caller, image_id, run_id)
        folders[image_id] = _logs(services, image_id)
    job = SimpleNamespace(id="j-logs", max_images=1, run_once=False)
    retention.rotate(services, job)  # the store never had these images: each is "already gone", logged
    with services.db.connect() as conn:
        assert [r.id for r in image_q.images_of_job(conn, "j-logs")] == ids[-1:]
    for image_id in ids[:-1]:
        assert not any(f.exists() for f in folders[image_id]), image_id
    assert all(f.is_dir() for f in folders[ids[-1]])


def test_a_discarded_half_made_image_leaves_no_log(services: Services, caller: Caller) -> None:
    image_id = "m-logshalf0000000000001"
    _image(services, caller, image_id, 1, state=image_q.CREATING)
    folders = _logs(services, image_id)
    sealing.discard_half_made(services, store_of(services), "j-logs")
    assert not any(f.exists() for f in folders)
    with services.db.connect() as conn:
        assert image_q.recorded_ids(conn) == set()


def test_the_sweep_removes_only_the_folders_of_images_no_row_names(services: Services, caller: Caller) -> None:
    kept, being_made, orphan = "m-logskept0000000000001", "m-logsmade0000000000002", "m-logsgone0000000000003"
    _image(services, caller, kept, 1)
    _image(services, caller, being_made, 2, state=image_q.CREATING)
    for image_id in (kept, being_made, orphan):
        _logs(services, image_id)
    note = boot_dir(services.settings.data_dir) / KVM_NOTE
    note.write_text("KVM stalled\n")
    assert sweep_image_logs(services) == 2  # the orphan's two folders
    data = services.settings.data_dir
    for root in (adaptation_dir(data), boot_dir(data)):
        assert sorted(p.name for p in root.iterdir() if p.is_dir()) == sorted([kept, being_made])
    assert note.exists()
    assert sweep_image_logs(services) == 0
