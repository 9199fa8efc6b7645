"""The image store: immutable, deduplicated disk images on the chunk store.

An image is a snapshot (``opensmc.chunkstore.snapshots``): per disk, the
digest of every chunk's blob. Making one writes that list and nothing else,
because the receiver already put every chunk into the store while it
arrived. Images share every blob they have in common, so successive runs of
an incremental job cost what changed (at 16 KiB granularity), and deleting
an image frees, at the next garbage collection, the blobs no other image or
staging index names.

Blob names are xxh3-128, the hash the agent and receiver already compute;
every blob is re-hashed whenever it is read. xxh3 is not collision resistant
against an adversary, so an image's end-to-end proof is the whole-disk
SHA-256 that ``verify`` and ``export`` compute (and that the snapshot holds
when the job ran with ``checksum``): a forged collision can make an image
fail that proof, never pass it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from opensmc.chunkstore.backend import ObjectExists, ObjectNotFound, check_name
from opensmc.chunkstore.check import CheckReport, check
from opensmc.chunkstore.gc import GcReport, collect
from opensmc.chunkstore.location import StoreLocation, backend_for
from opensmc.chunkstore.packs import PackCorrupt
from opensmc.chunkstore.repository import BlobNotFound, Repository, StoreError
from opensmc.chunkstore.snapshots import DiskIndex, delete_snapshot, list_snapshots, load_snapshot, save_snapshot

__all__ = [
    "DiskManifest",
    "ImageCorrupt",
    "ImageError",
    "ImageExists",
    "ImageNotFound",
    "ImageStore",
    "Manifest",
    "VerifyReport",
    "repository_at",
]

GC_WANTED = "gc-wanted"


class ImageError(Exception):
    """Base of the image store's errors."""


class ImageExists(ImageError):
    """An image with this id exists already; images are immutable."""


class ImageNotFound(ImageError):
    """No image with this id."""


class ImageCorrupt(ImageError):
    """Stored data does not match its hash, or is missing."""


@dataclass(frozen=True)
class DiskManifest:
    index: DiskIndex

    @property
    def size(self) -> int:
        return self.index.size

    @property
    def chunk_size(self) -> int:
        return self.index.chunk_size

    @property
    def sha256(self) -> str | None:
        return self.index.sha256

    @property
    def chunk_count(self) -> int:
        return self.index.chunks

    @property
    def stored_chunks(self) -> int:
        return int(self.index.nonzero().size)

    def chunk_hexes(self) -> list[str | None]:
        """Per chunk: its blob's xxh3-128 in hex, or None for zeros."""
        rows = self.index.digests
        return [bytes(r).hex() if r.any() else None for r in rows]

    def hashes(self) -> dict[int, bytes]:
        return self.index.hashes()


@dataclass(frozen=True)
class Manifest:
    image_id: str
    created: float
    disks: tuple[DiskManifest, ...]


@dataclass(slots=True)
class VerifyReport:
    image_id: str
    bad_chunks: list[tuple[int, int]] = field(default_factory=list)  #: (disk, chunk index)
    missing_chunks: list[tuple[int, int]] = field(default_factory=list)
    bad_disks: list[int] = field(default_factory=list)  #: whole-disk SHA-256 differs from the recorded one
    sha256: list[str] = field(default_factory=list)  #: per disk, as computed from the blobs

    @property
    def ok(self) -> bool:
        return not (self.bad_chunks or self.missing_chunks or self.bad_disks)


_repos: dict[str, Repository] = {}
_repos_lock = threading.Lock()


def repository_at(root: StoreLocation | str | os.PathLike[str]) -> Repository:
    """This process's one view of the store at ``root`` (one per process: its packs in flight are its own).

    ``root`` is a directory or a :class:`StoreLocation` (``s3://`` too).
    """
    location = root if isinstance(root, StoreLocation) else StoreLocation(os.fspath(root))
    key = location.key()
    with _repos_lock:
        repo = _repos.get(key)
        if repo is None:
            repo = _repos[key] = Repository(backend_for(location))
        return repo


def _zeros(n: int, cache: dict[int, bytes] = {}) -> bytes:  # noqa: B006 - a deliberate per-size cache
    z = cache.get(n)
    if z is None:
        z = cache[n] = b"\0" * n
    return z


class ImageStore:
    """Images as snapshots in a chunk store (a local directory by default, or S3)."""

    def __init__(self, root: StoreLocation | str | os.PathLike[str]) -> None:
        self.location = root if isinstance(root, StoreLocation) else StoreLocation(os.fspath(root))
        try:
            self.repo = repository_at(root)
        except StoreError as e:
            raise ImageError(str(e)) from None
        self.backend = self.repo.backend

    # -- images ---------------------------------------------------------------------------------

    def create_image(self, image_id: str, disks: Sequence[DiskIndex]) -> Manifest:
        """Seal ``disks`` (staging indexes, as :class:`DiskIndex`) into an immutable image."""
        check_name(f"snapshots/{image_id}")
        try:
            snap = save_snapshot(self.backend, image_id, list(disks))
        except ObjectExists:
            raise ImageExists(f"image {image_id!r} exists already; images are immutable") from None
        return Manifest(snap.image_id, snap.created, tuple(DiskManifest(d) for d in snap.disks))

    def get(self, image_id: str) -> Manifest:
        try:
            check_name(f"snapshots/{image_id}")
            snap = load_snapshot(self.backend, image_id)
        except (ObjectNotFound, ValueError):
            raise ImageNotFound(f"no image {image_id!r}") from None
        except PackCorrupt as e:
            raise ImageCorrupt(f"image {image_id}: {e}") from None
        return Manifest(snap.image_id, snap.created, tuple(DiskManifest(d) for d in snap.disks))

    def list_images(self) -> list[str]:
        return list_snapshots(self.backend)

    def delete_image(self, image_id: str) -> None:
        """Remove an image; its blobs no other image needs go at the next :meth:`gc`."""
        if not delete_snapshot(self.backend, image_id):
            raise ImageNotFound(f"no image {image_id!r}")
        self.want_gc()

    def want_gc(self) -> None:
        """Ask for a garbage collection at the next orchestrator pass."""
        self.backend.write(GC_WANTED, b"1")

    def gc_wanted(self) -> bool:
        return self.backend.exists(GC_WANTED)

    def gc(self, staging: Iterable[DiskIndex]) -> GcReport:
        """Collect blobs nothing names (``staging``: every live staging index is a root).

        Pass a generator that reads the staging indexes: it is consumed under the
        collector's lock, after which no run can add entries the sweep would miss.
        """
        report = collect(self.repo, staging)
        if not report.deferred and not report.errors:
            self.backend.delete(GC_WANTED)
        return report

    def check(self, *, read_data: bool = True) -> CheckReport:
        return check(self.repo, read_data=read_data)

    def space_used(self) -> int:
        """Bytes the packs occupy."""
        return sum(self.backend.size(n) for n in self.backend.list("data/"))

    # -- reading back ---------------------------------------------------------------------------

    def read_chunk(self, blob_hash: bytes) -> bytes:
        try:
            return self.repo.get(blob_hash)
        except BlobNotFound as e:
            raise ImageCorrupt(str(e)) from None
        except PackCorrupt as e:
            raise ImageCorrupt(f"blob {blob_hash.hex()}: {e}") from None

    def export(
        self,
        image_id: str,
        disk_index: int,
        fmt: Literal["raw", "qcow2"],
        out_path: str | os.PathLike[str],
        progress: Callable[[int, int], None] | None = None,
    ) -> str:
        """Write one disk as a sparse raw file or a qcow2; returns the disk's SHA-256.

        Every blob is checked against its hash, and the disk against its recorded
        SHA-256 when the image has one; on a mismatch the output is removed and
        :class:`ImageCorrupt` raised. ``progress(done, total)`` is called as it goes.
        """
        disk = self.get(image_id).disks[disk_index]
        out = Path(out_path)
        if fmt == "qcow2":
            if shutil.which("qemu-img") is None:
                raise ImageError("qcow2 export needs qemu-img (Debian package qemu-utils); export raw instead")
            raw = out.with_name(f".{out.name}.raw.tmp")
            try:
                qcow_sha = self.export(image_id, disk_index, "raw", raw, progress)
                # qemu-img finds zero runs itself, so holes in the raw stay unallocated in the qcow2.
                subprocess.run(
                    ["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(out)],
                    check=True,
                    capture_output=True,
                )
            finally:
                raw.unlink(missing_ok=True)
            return qcow_sha
        if fmt != "raw":
            raise ValueError(f"export format must be 'raw' or 'qcow2', got {fmt!r}")
        hasher = hashlib.sha256()
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        idx = disk.index
        try:
            os.ftruncate(fd, disk.size)  # holes for every zero chunk: the export is sparse
            with self.repo.session():
                for i in range(idx.chunks):
                    h = idx.hash_at(i)
                    n = idx.chunk_length(i)
                    if h is None:
                        hasher.update(_zeros(n))
                    else:
                        data = self.read_chunk(h)
                        if len(data) != n:
                            raise ImageCorrupt(f"image {image_id} disk {disk_index}: chunk {i} has a wrong size")
                        hasher.update(data)
                        os.pwrite(fd, data, i * idx.chunk_size)
                    if progress is not None and (i % 256 == 255 or i == idx.chunks - 1):
                        progress(min(disk.size, (i + 1) * idx.chunk_size), disk.size)
            digest = hasher.hexdigest()
            if disk.sha256 is not None and digest != disk.sha256:
                raise ImageCorrupt(f"image {image_id} disk {disk_index}: SHA-256 mismatch on export")
            os.fsync(fd)
        except BaseException:
            out.unlink(missing_ok=True)  # never leave a wrong export behind
            raise
        finally:
            os.close(fd)
        return digest

    def verify(self, image_id: str) -> VerifyReport:
        """Re-read every blob of an image against its hash; compute each disk's SHA-256."""
        report = VerifyReport(image_id)
        with self.repo.session():
            for d_idx, disk in enumerate(self.get(image_id).disks):
                sha = hashlib.sha256()
                idx = disk.index
                for i in range(idx.chunks):
                    h = idx.hash_at(i)
                    n = idx.chunk_length(i)
                    if h is None:
                        sha.update(_zeros(n))
                        continue
                    try:
                        data = self.repo.get(h)
                    except BlobNotFound:
                        report.missing_chunks.append((d_idx, i))
                        sha.update(_zeros(n))
                        continue
                    except PackCorrupt:
                        report.bad_chunks.append((d_idx, i))
                        sha.update(_zeros(n))
                        continue
                    sha.update(data)
                digest = sha.hexdigest()
                report.sha256.append(digest)
                if disk.sha256 is not None and digest != disk.sha256:
                    report.bad_disks.append(d_idx)
        return report
