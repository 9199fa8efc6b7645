"""Snapshots: the immutable images of the store, one object each.

``snapshots/<image id>``, little-endian::

    "OSMSNAP\\x01"            8 bytes: magic and format version 1
    header length            4
    header                   JSON: {"image_id", "created", "disks": [{"size", "chunk_size", "sha256"}]}
    per disk, in order       ceil(size / chunk_size) digests of 16 bytes: the xxh3-128 of
                             each chunk's blob, or 16 zero bytes for a chunk of zeros
    xxh3-128 of all above    16

Sealing an image writes this one object: metadata about chunks, never their
bytes, so it costs 16 bytes per chunk whatever the data. ``sha256`` (the
whole disk's SHA-256) is null unless it was computed when the image was made
(``checksum``); ``verify`` computes it from the blobs.
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass

import numpy as np
import xxhash

from opensmc.chunkstore.backend import Backend, ObjectNotFound
from opensmc.chunkstore.packs import PackCorrupt

__all__ = ["DiskIndex", "Snapshot", "delete_snapshot", "list_snapshots", "load_snapshot", "save_snapshot"]

MAGIC = b"OSMSNAP\x01"
DIGEST = 16
_LEN = struct.Struct("<I")


@dataclass(frozen=True)
class DiskIndex:
    size: int
    chunk_size: int
    digests: np.ndarray  #: shape (chunks, 16), uint8; all-zero rows are zero chunks
    sha256: str | None = None

    @property
    def chunks(self) -> int:
        return int(self.digests.shape[0])

    def chunk_length(self, idx: int) -> int:
        return min(self.chunk_size, self.size - idx * self.chunk_size)

    def nonzero(self) -> np.ndarray:
        """Indexes of the chunks that hold data."""
        return np.flatnonzero(self.digests.any(axis=1))

    def hash_at(self, idx: int) -> bytes | None:
        row = self.digests[idx]
        return bytes(row) if row.any() else None

    def hashes(self) -> dict[int, bytes]:
        """Chunk index -> digest of every chunk with data (the map the agent and receiver speak)."""
        return {int(i): bytes(self.digests[i]) for i in self.nonzero()}


@dataclass(frozen=True)
class Snapshot:
    image_id: str
    created: float
    disks: tuple[DiskIndex, ...]


def chunks_of(size: int, chunk_size: int) -> int:
    return -(-size // chunk_size)


def encode_snapshot(snap: Snapshot) -> bytes:
    return b"".join(encode_snapshot_parts(snap))


def encode_snapshot_parts(snap: Snapshot) -> list[bytes | memoryview]:
    """The snapshot's bytes as parts in order, the digests as views of the disks' arrays.

    For ``Backend.write``: sealing an 8 GiB disk's image copied its 8 MiB of digests
    three times over when the snapshot was joined into one ``bytes`` first."""
    header = {
        "image_id": snap.image_id,
        "created": snap.created,
        "disks": [{"size": d.size, "chunk_size": d.chunk_size, "sha256": d.sha256} for d in snap.disks],
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    parts: list[bytes | memoryview] = [MAGIC, _LEN.pack(len(head)), head]
    for d in snap.disks:
        if d.digests.shape != (chunks_of(d.size, d.chunk_size), DIGEST) or d.digests.dtype != np.uint8:
            raise ValueError("a disk's digests must be a (chunks, 16) uint8 array")
        parts.append(np.ascontiguousarray(d.digests).data.cast("B"))
    digest = xxhash.xxh3_128()
    for part in parts:
        digest.update(part)
    parts.append(digest.digest())
    return parts


def decode_snapshot(raw: bytes) -> Snapshot:
    if not raw.startswith(MAGIC):
        raise PackCorrupt("snapshot magic missing (not a snapshot, or a newer format)")
    if len(raw) < len(MAGIC) + _LEN.size + DIGEST or xxhash.xxh3_128_digest(raw[:-DIGEST]) != raw[-DIGEST:]:
        raise PackCorrupt("snapshot does not match its hash")
    (n,) = _LEN.unpack_from(raw, len(MAGIC))
    pos = len(MAGIC) + _LEN.size
    header = json.loads(raw[pos : pos + n])
    pos += n
    disks = []
    for d in header["disks"]:
        count = chunks_of(int(d["size"]), int(d["chunk_size"]))
        end = pos + count * DIGEST
        if end > len(raw) - DIGEST:
            raise PackCorrupt("snapshot is shorter than its header says")
        digests = np.frombuffer(raw, np.uint8, count * DIGEST, pos).reshape(count, DIGEST)
        disks.append(DiskIndex(int(d["size"]), int(d["chunk_size"]), digests, d.get("sha256")))
        pos = end
    return Snapshot(str(header["image_id"]), float(header["created"]), tuple(disks))


def save_snapshot(backend: Backend, image_id: str, disks: list[DiskIndex], created: float | None = None) -> Snapshot:
    """Write an image; an existing one is never replaced (:class:`~.backend.ObjectExists`)."""
    snap = Snapshot(image_id, time.time() if created is None else created, tuple(disks))
    backend.write(f"snapshots/{image_id}", encode_snapshot_parts(snap), exclusive=True)
    return snap


def load_snapshot(backend: Backend, image_id: str) -> Snapshot:
    """:class:`~.backend.ObjectNotFound` if there is none."""
    return decode_snapshot(backend.read(f"snapshots/{image_id}"))


def list_snapshots(backend: Backend) -> list[str]:
    return [n.removeprefix("snapshots/") for n in backend.list("snapshots/")]


def delete_snapshot(backend: Backend, image_id: str) -> bool:
    """Remove an image's snapshot (its blobs go at the next garbage collection); False if it was gone."""
    try:
        backend.size(f"snapshots/{image_id}")
    except ObjectNotFound:
        return False
    backend.delete(f"snapshots/{image_id}")
    return True
