"""The image store: immutable images built from staging volumes, deduplicated by chunk.

Layout under the store root::

    chunks/ab/cd/abcd…(32 hex)   one file per distinct chunk, named by its xxh3-128,
                                 written once (temporary name, then rename), never changed
    images/<image_id>.json       the manifest: one entry per disk (size, chunk size,
                                 whole-disk SHA-256, and per chunk its hash or null for zeros)
    lock                         flock'ed while images are made or chunks collected

An image costs only the chunks no earlier image has, so successive runs of an
incremental job share everything that did not change. The unit of sharing is
the staging volume's chunk (64 KiB by default): a run that changes 1% of the
disk in scattered 4 KiB writes dirties about 15% of 64 KiB chunks
(PERF_FLOORS.md), and that is what a new image then stores.

Chunks are keyed by xxh3-128, the hash the agent and receiver already use, so
making an image needs no second hash of each chunk. xxh3 is not collision
resistant against an adversary; the whole-disk SHA-256 in each manifest is the
end-to-end check (``verify`` and ``export`` recompute it), so a forged
collision cannot go unnoticed, only make an image fail verification.

Deleting an image removes its manifest and collects (mark and sweep) every
chunk no remaining manifest names, under the store lock so it cannot race an
image being made.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from opensmc.receiver.volume import StagingVolume
from opensmc.wire.frames import digest

__all__ = [
    "DiskManifest",
    "ImageCorrupt",
    "ImageError",
    "ImageExists",
    "ImageNotFound",
    "ImageStore",
    "Manifest",
    "VerifyReport",
    "compare_with_source",
]

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ImageError(Exception):
    """Base of the image store's errors."""


class ImageExists(ImageError):
    """An image with this id exists already; images are immutable."""


class ImageNotFound(ImageError):
    """No image with this id."""


class ImageCorrupt(ImageError):
    """Stored data does not match its hash (or a staging volume does not match its map)."""


@dataclass(frozen=True, slots=True)
class DiskManifest:
    size: int
    chunk_size: int
    sha256: str
    chunks: tuple[str | None, ...]  #: per chunk index: xxh3-128 hex, or None for all zeros

    def hashes(self) -> dict[int, bytes]:
        """The chunk map, in the form the agent reports and the receiver keeps."""
        return {i: bytes.fromhex(h) for i, h in enumerate(self.chunks) if h is not None}


@dataclass(frozen=True, slots=True)
class Manifest:
    image_id: str
    created: float
    disks: tuple[DiskManifest, ...]

    def to_json(self) -> bytes:
        doc = {
            "version": 1,
            "image_id": self.image_id,
            "created": self.created,
            "disks": [
                {"size": d.size, "chunk_size": d.chunk_size, "sha256": d.sha256, "chunks": list(d.chunks)}
                for d in self.disks
            ],
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        doc = json.loads(raw)
        if doc.get("version") != 1:
            raise ImageError(f"manifest version {doc.get('version')} is not supported")
        disks = tuple(
            DiskManifest(int(d["size"]), int(d["chunk_size"]), str(d["sha256"]), tuple(d["chunks"]))
            for d in doc["disks"]
        )
        return cls(str(doc["image_id"]), float(doc["created"]), disks)


@dataclass(slots=True)
class VerifyReport:
    image_id: str
    bad_chunks: list[tuple[int, int]] = field(default_factory=list)  #: (disk, chunk index)
    missing_chunks: list[tuple[int, int]] = field(default_factory=list)
    bad_disks: list[int] = field(default_factory=list)  #: whole-disk SHA-256 mismatch

    @property
    def ok(self) -> bool:
        return not (self.bad_chunks or self.missing_chunks or self.bad_disks)


def compare_with_source(disk: DiskManifest, source_hashes: Mapping[int, bytes]) -> list[int]:
    """Chunk indexes where the image differs from what the agent reported (checksum=true).

    ``source_hashes`` is the agent's map of the source (``ReplicationResult.hashes``):
    every non-zero chunk's xxh3-128. An empty list proves the image equal to the source.
    """
    image = disk.hashes()
    return sorted(i for i in image.keys() | source_hashes.keys() if image.get(i) != source_hashes.get(i))


def _syncfs(path: Path) -> None:
    # One syncfs makes thousands of new chunk files durable far faster than an fsync each.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        if libc.syncfs(fd) != 0:  # pragma: no cover - only on exotic systems
            os.sync()
    finally:
        os.close(fd)


class ImageStore:
    """A directory of immutable, chunk-deduplicated disk images."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        (self.root / "chunks").mkdir(parents=True, exist_ok=True)
        (self.root / "images").mkdir(exist_ok=True)
        self._zeros: dict[int, bytes] = {}

    # -- paths and locking ----------------------------------------------------------------------

    def _chunk_path(self, hex_hash: str) -> Path:
        return self.root / "chunks" / hex_hash[:2] / hex_hash[2:4] / hex_hash

    def _manifest_path(self, image_id: str) -> Path:
        if not _ID.match(image_id):
            raise ImageError(f"bad image id {image_id!r}")
        return self.root / "images" / f"{image_id}.json"

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.root / "lock", "a") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def _zero(self, n: int) -> bytes:
        z = self._zeros.get(n)
        if z is None:
            z = self._zeros[n] = b"\0" * n
        return z

    # -- images ---------------------------------------------------------------------------------

    def create_image(self, image_id: str, volumes: Sequence[StagingVolume]) -> Manifest:
        """Make an immutable image of ``volumes`` (one disk each), storing only new chunks."""
        path = self._manifest_path(image_id)
        with self._locked():
            if path.exists():
                raise ImageExists(f"image {image_id!r} exists already; images are immutable")
            disks = tuple(self._store_volume(v) for v in volumes)
            _syncfs(self.root)
            manifest = Manifest(image_id, time.time(), disks)
            tmp = path.with_name(f".{image_id}.{os.getpid()}.tmp")
            tmp.write_bytes(manifest.to_json())
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, 0o444)
            os.link(tmp, path)  # fails if the id appeared meanwhile: never overwrite an image
            tmp.unlink()
            _fsync_dir(path.parent)
        return manifest

    def _store_volume(self, vol: StagingVolume) -> DiskManifest:
        cs = vol.chunk_size
        held = vol.hashes()
        sha = hashlib.sha256()
        chunks: list[str | None] = []
        for idx in range(-(-vol.size // cs)):
            n = min(cs, vol.size - idx * cs)
            h = held.get(idx)
            if h is None:
                sha.update(self._zero(n))
                chunks.append(None)
                continue
            data = vol.read(idx * cs, n)
            if digest(data) != h:
                raise ImageCorrupt(f"staging volume {vol.directory}: chunk {idx} does not match its map")
            sha.update(data)
            hex_hash = h.hex()
            chunks.append(hex_hash)
            target = self._chunk_path(hex_hash)
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{hex_hash}.{os.getpid()}.tmp")
                tmp.write_bytes(data)
                os.replace(tmp, target)
        return DiskManifest(vol.size, cs, sha.hexdigest(), tuple(chunks))

    def get(self, image_id: str) -> Manifest:
        try:
            return Manifest.from_json(self._manifest_path(image_id).read_bytes())
        except FileNotFoundError:
            raise ImageNotFound(f"no image {image_id!r}") from None

    def list_images(self) -> list[str]:
        return sorted(p.stem for p in (self.root / "images").glob("*.json"))

    def delete_image(self, image_id: str) -> int:
        """Remove an image and every chunk no other image uses; returns the chunks freed."""
        path = self._manifest_path(image_id)
        with self._locked():
            try:
                path.unlink()
            except FileNotFoundError:
                raise ImageNotFound(f"no image {image_id!r}") from None
            _fsync_dir(path.parent)
            return self._sweep()

    def gc(self) -> int:
        """Collect chunks no manifest names (left by a crash mid-create); returns the count."""
        with self._locked():
            return self._sweep()

    def _sweep(self) -> int:
        live: set[str] = set()
        for image_id in self.list_images():
            for d in self.get(image_id).disks:
                live.update(h for h in d.chunks if h is not None)
        freed = 0
        for p in (self.root / "chunks").glob("*/*/*"):
            if p.name not in live:
                p.unlink()
                freed += not p.name.startswith(".")
        return freed

    def space_used(self) -> int:
        """Bytes the chunk files occupy on disk."""
        return sum(p.stat().st_blocks * 512 for p in (self.root / "chunks").glob("*/*/*"))

    # -- reading back ---------------------------------------------------------------------------

    def _read_chunk(self, hex_hash: str) -> bytes:
        data = self._chunk_path(hex_hash).read_bytes()
        if digest(data).hex() != hex_hash:
            raise ImageCorrupt(f"chunk {hex_hash} does not match its hash")
        return data

    def export(
        self, image_id: str, disk_index: int, fmt: Literal["raw", "qcow2"], out_path: str | os.PathLike[str]
    ) -> None:
        """Write one disk of an image as a sparse raw file or a qcow2 (``qemu-img convert`` of the raw).

        Every chunk is checked against its hash and the result against the
        whole-disk SHA-256; on a mismatch the output is removed and
        :class:`ImageCorrupt` raised.
        """
        disk = self.get(image_id).disks[disk_index]
        out = Path(out_path)
        if fmt == "qcow2":
            if shutil.which("qemu-img") is None:
                raise ImageError("qcow2 export needs qemu-img (Debian package qemu-utils); export raw instead")
            raw = out.with_name(f".{out.name}.raw.tmp")
            try:
                self.export(image_id, disk_index, "raw", raw)
                # qemu-img finds zero runs itself, so holes in the raw stay unallocated in the qcow2.
                subprocess.run(
                    ["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(out)],
                    check=True,
                    capture_output=True,
                )
            finally:
                raw.unlink(missing_ok=True)
            return
        if fmt != "raw":
            raise ValueError(f"export format must be 'raw' or 'qcow2', got {fmt!r}")
        sha = hashlib.sha256()
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, disk.size)  # holes for every zero chunk: the export is sparse
            for idx, h in enumerate(disk.chunks):
                n = min(disk.chunk_size, disk.size - idx * disk.chunk_size)
                if h is None:
                    sha.update(self._zero(n))
                    continue
                data = self._read_chunk(h)
                sha.update(data)
                os.pwrite(fd, data, idx * disk.chunk_size)
            if sha.hexdigest() != disk.sha256:
                raise ImageCorrupt(f"image {image_id} disk {disk_index}: SHA-256 mismatch on export")
            os.fsync(fd)
        except BaseException:
            out.unlink(missing_ok=True)  # never leave a wrong export behind
            raise
        finally:
            os.close(fd)

    def verify(self, image_id: str) -> VerifyReport:
        """Re-read every chunk of an image against its hash and every disk against its SHA-256."""
        report = VerifyReport(image_id)
        for d_idx, disk in enumerate(self.get(image_id).disks):
            sha = hashlib.sha256()
            for idx, h in enumerate(disk.chunks):
                n = min(disk.chunk_size, disk.size - idx * disk.chunk_size)
                if h is None:
                    sha.update(self._zero(n))
                    continue
                try:
                    data = self._chunk_path(h).read_bytes()
                except FileNotFoundError:
                    report.missing_chunks.append((d_idx, idx))
                    continue
                if digest(data).hex() != h:
                    report.bad_chunks.append((d_idx, idx))
                sha.update(data)
            if sha.hexdigest() != disk.sha256:
                report.bad_disks.append(d_idx)
        return report


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
