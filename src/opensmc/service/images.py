"""Images for their owners: list, describe, and read a disk back verified.

The ``images`` table says which account owns an image and which job run
made it; the image store (:mod:`opensmc.images.store`) holds its bytes and
its manifest. Both the HTTP routes and ``opensmc image … --data-dir`` read
disks through :func:`raw_blocks`, which checks every chunk against its hash
and the whole disk against its SHA-256 while it goes, so nothing unverified
is ever handed out without the reader learning of it.

Disks are numbered by their position in the image (0 = the system disk,
then the data disks in order); ``SourceDiskIndex`` says which source disk
each one was.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from opensmc.clock import as_utc, iso
from opensmc.domain.errors import InvalidParameter, NotFound, SmcError
from opensmc.images.store import DiskManifest, ImageCorrupt, ImageNotFound, ImageStore, Manifest
from opensmc.service.context import Caller, Services
from opensmc.store import images as image_q

#: bytes handed out per block: big enough to keep per-block overhead (a thread hop,
#: a socket write) small, small enough to stream a disk with little memory
BLOCK = 1 << 20

Format = Literal["raw", "qcow2"]


class ImageGone(SmcError):
    """The database lists the image but the image store no longer has it."""

    def __init__(self, image_id: str) -> None:
        super().__init__(
            f"The image {image_id} is recorded but its data is missing from the image store; see the server log.",
            code="Image.DataMissing",
            http_status=410,
        )


def store_of(svc: Services) -> ImageStore:
    return ImageStore(svc.settings.image_location)


# describing ---------------------------------------------------------------------------------------


def disk_doc(position: int, disk: DiskManifest, source_index: int | None, chunks: bool) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "Index": position,
        "SourceDiskIndex": position if source_index is None else source_index,
        "Size": disk.size,
        "Sha256": disk.sha256,
        "ChunkSize": disk.chunk_size,
        "ChunkCount": disk.chunk_count,
        "StoredChunks": disk.stored_chunks,
    }
    if chunks:
        # xxh3-128 of each chunk's blob, null for an all-zero chunk (a hole)
        doc["Chunks"] = disk.chunk_hexes()
    return doc


def image_doc(manifest: Manifest, row: Any | None = None, *, chunks: bool = False) -> dict[str, Any]:
    """An image as the routes and the CLI show it; ``row`` is its ``images`` record, if known."""
    recorded: dict[str, Any] = {}
    if row is not None:
        try:
            recorded = json.loads(row.manifest or "{}")
        except ValueError:
            recorded = {}
    sources = [d.get("index") for d in recorded.get("disks") or []]
    doc: dict[str, Any] = {
        "ImageId": manifest.image_id,
        "Name": row.name if row is not None else None,
        "JobId": row.job_id if row is not None else None,
        "RunId": row.run_id if row is not None else None,
        "State": row.state if row is not None else "Available",
        "CreationTime": iso(as_utc(row.created_at)) if row is not None else _iso_epoch(manifest.created),
        "ChecksumVerified": _checksum_state(recorded, len(manifest.disks)),
        "VerifiedTime": recorded.get("verified_at"),
        "Disks": [
            disk_doc(i, d, sources[i] if i < len(sources) else None, chunks) for i, d in enumerate(manifest.disks)
        ],
    }
    return doc


def _checksum_state(recorded: dict[str, Any], n_disks: int) -> bool | None:
    """The run's own check (``checksum`` replication parameter), else whether every disk was since read back
    whole and matched (``opensmc image verify``, a complete raw download): None while neither happened."""
    run = recorded.get("checksum_verified")
    if run is not None:
        return bool(run)
    verified = set(recorded.get("verified_disks") or [])
    return True if n_disks and verified >= set(range(n_disks)) else None


def record_verified(svc: Services, image_id: str, positions: Iterable[int]) -> None:
    with svc.db.begin() as conn:
        image_q.mark_disks_verified(conn, image_id, positions, svc.clock())


def _iso_epoch(stamp: float) -> str:
    return iso(datetime.fromtimestamp(stamp, UTC))


def _owned_row(svc: Services, caller: Caller, image_id: str) -> Any:
    with svc.db.connect() as conn:
        row = image_q.get_image(conn, image_id, caller.account_id)
    if row is None:  # another account's image is simply not there
        raise NotFound("ImageId", image_id, code="InvalidImageId.NotFound")
    return row


def _manifest(store: ImageStore, image_id: str) -> Manifest:
    try:
        return store.get(image_id)
    except ImageNotFound:
        raise ImageGone(image_id) from None


def list_images(svc: Services, caller: Caller) -> list[dict[str, Any]]:
    """The caller's images, oldest first, with their disks (no chunk lists)."""
    with svc.db.connect() as conn:
        rows = image_q.list_images(conn, caller.account_id)
    store = store_of(svc)
    out = []
    for row in rows:
        try:
            manifest = store.get(row.id)
        except ImageNotFound:
            out.append(
                {
                    "ImageId": row.id,
                    "Name": row.name,
                    "JobId": row.job_id,
                    "State": "DataMissing",
                    "CreationTime": iso(as_utc(row.created_at)),
                    "Disks": [],
                }
            )
            continue
        out.append({**image_doc(manifest, row), "BootTest": _boot_tests(svc, row.id),
                    "OsAdaptation": _adaptation(svc, row.id)})  # fmt: skip
    return out


def describe_image(svc: Services, caller: Caller, image_id: str, *, chunks: bool = True) -> dict[str, Any]:
    row = _owned_row(svc, caller, image_id)
    return {
        **image_doc(_manifest(store_of(svc), image_id), row, chunks=chunks),
        "BootTest": _boot_tests(svc, image_id),
        "OsAdaptation": _adaptation(svc, image_id),
    }


def _boot_tests(svc: Services, image_id: str) -> list[dict[str, object]]:
    from opensmc.images.boot import boot_doc, results_dir

    return boot_doc(results_dir(svc.settings.data_dir), image_id)


def _adaptation(svc: Services, image_id: str) -> list[dict[str, object]]:
    from opensmc.images.adaptation_log import adaptation_doc, results_dir

    return adaptation_doc(results_dir(svc.settings.data_dir), image_id)


# what is kept beside an image --------------------------------------------------------------------


def _log_roots(svc: Services) -> list[Path]:
    from opensmc.images.adaptation_log import results_dir as adaptation_dir
    from opensmc.images.boot import results_dir as boot_dir

    return [adaptation_dir(svc.settings.data_dir), boot_dir(svc.settings.data_dir)]


def remove_image_logs(svc: Services, image_id: str) -> None:
    """Delete the OS adaptation log and the boot tests kept beside an image (``<data dir>/os-adaptation/<id>``,
    ``<data dir>/boot-tests/<id>``): called when the image is deleted, before its row goes, so that a
    crash in between leaves a row whose next deletion removes them again."""
    for root in _log_roots(svc):
        folder = root / image_id
        if folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)


def sweep_image_logs(svc: Services) -> int:
    """Delete the log folders of images that no row names any more (left by a crash, or by a version that
    did not delete them); returns how many went.

    An image's row always exists before its folders (``Creating`` while it is made), so the folders are
    listed first and the rows read after: a folder made meanwhile is never taken for an orphan.
    """
    folders = [
        folder
        for root in _log_roots(svc)
        if root.is_dir()
        # only image folders ("m-…"): the roots hold notes of their own (boot-tests/.kvm-stalls)
        for folder in root.iterdir()
        if folder.name.startswith("m-") and folder.is_dir()
    ]
    if not folders:
        return 0
    with svc.db.connect() as conn:
        recorded = image_q.recorded_ids(conn)
    gone = [folder for folder in folders if folder.name not in recorded]
    for folder in gone:
        shutil.rmtree(folder, ignore_errors=True)
    return len(gone)


def open_disk(svc: Services, caller: Caller, image_id: str, position: int) -> tuple[ImageStore, Manifest]:
    """Check the caller owns the image and it has disk ``position``; return the store and manifest."""
    _owned_row(svc, caller, image_id)
    store = store_of(svc)
    manifest = _manifest(store, image_id)
    check_position(manifest, position)
    return store, manifest


def check_position(manifest: Manifest, position: int) -> None:
    if not 0 <= position < len(manifest.disks):
        raise NotFound("DiskIndex", str(position), code="InvalidDiskIndex.NotFound")


def parse_format(value: str | None) -> Format:
    fmt = (value or "raw").lower()
    if fmt == "raw":
        return "raw"
    if fmt == "qcow2":
        return "qcow2"
    raise InvalidParameter("format", "It must be raw or qcow2.")


# reading back -------------------------------------------------------------------------------------


def raw_blocks(
    store: ImageStore, manifest: Manifest, position: int, on_verified: Callable[[], None] | None = None
) -> Iterator[tuple[int, bytes, bool]]:
    """``(offset, data, is_zero)`` blocks of a disk, in order, each verified before it is yielded.

    Every blob is checked against its xxh3-128 name as it is read; the whole
    disk against its recorded SHA-256 (when the image has one) before the last
    block is yielded. On any mismatch (or a missing blob) :class:`ImageCorrupt`
    is raised, so a reader never receives the end of a wrong disk.
    ``on_verified`` runs once the reader has taken every block: the disk was
    proved whole.
    """
    disk = manifest.disks[position].index
    cs = disk.chunk_size
    sha = hashlib.sha256()
    per_block = max(1, BLOCK // cs)
    n_chunks = disk.chunks
    with store.repo.session():
        for first in range(0, n_chunks, per_block):
            last = min(first + per_block, n_chunks)
            parts: list[bytes] = []
            zero = True
            for idx in range(first, last):
                n = disk.chunk_length(idx)
                h = disk.hash_at(idx)
                if h is None:
                    parts.append(bytes(n))
                    continue
                zero = False
                try:
                    data = store.read_chunk(h)  # re-hashes the blob
                except ImageCorrupt as exc:
                    raise ImageCorrupt(f"image {manifest.image_id} disk {position}: chunk {idx}: {exc}") from None
                if len(data) != n:
                    raise ImageCorrupt(f"image {manifest.image_id} disk {position}: chunk {idx} has a wrong size")
                parts.append(data)
            block = b"".join(parts)
            sha.update(block)
            if last == n_chunks and disk.sha256 is not None and sha.hexdigest() != disk.sha256:
                raise ImageCorrupt(f"image {manifest.image_id} disk {position}: SHA-256 mismatch")
            yield first * cs, block, zero
    if on_verified is not None:
        on_verified()


def _sweep_stale(tmp_dir: Path, age: float = 6 * 3600) -> None:
    # A download the client dropped before its body started leaves its file behind.
    cutoff = time.time() - age
    for p in tmp_dir.glob("*.qcow2"):
        try:
            if p.stat().st_mtime < cutoff:
                p.unlink()
        except OSError:
            pass


def export_qcow2_temp(svc: Services, store: ImageStore, image_id: str, position: int) -> Path:
    """Export a disk as qcow2 to a temporary file in the data dir; the caller deletes it."""
    if shutil.which("qemu-img") is None:
        raise SmcError(
            "qcow2 export needs qemu-img on the server (Debian package qemu-utils); "
            "download format=raw, or install qemu-utils.",
            code="OperationDenied.NoQemuImg",
            http_status=400,
        )
    tmp_dir = svc.settings.data_dir / "tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    _sweep_stale(tmp_dir)
    fd, name = tempfile.mkstemp(prefix=f"{image_id}-d{position}-", suffix=".qcow2", dir=tmp_dir)
    os.close(fd)
    out = Path(name)
    try:
        store.export(image_id, position, "qcow2", out)
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    return out
