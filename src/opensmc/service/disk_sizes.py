"""Disks of the size the job asked for: ``SystemDiskSize``, ``DataDisk.N.Size``, ``Disks.*.Size`` (GiB).

An image disk made from a source disk is the source's bytes, then zeros up
to the size the job asked for when that is larger. In the chunk store this
is metadata: the snapshot lists the source's chunk digests and then zero
digests, which name no blob. Only when the source's size is not a multiple
of the chunk size does one blob get written: its short last chunk padded with
zeros to a whole chunk (a disk's chunks are all whole but its last).

Creating or modifying a job already refuses a size smaller than the source
disk (block replication copies the whole disk, ``jobs_params.check_min_size``);
a source that has grown past the asked size since is refused here, when the
image is sealed, with a message that says what to change. Growing the last
partition and file system into the new space belongs to OS adaptation, not
here: the guest sees a larger disk with its old partition table.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import xxhash

from opensmc.chunkstore.snapshots import DiskIndex, chunks_of
from opensmc.domain.errors import SmcError
from opensmc.images.store import ImageStore

GIB = 1024**3


def asked_sizes(job: Any, disks: list[dict[str, Any]]) -> list[int | None]:
    """Per selected disk (``staging.selected_disks``), the size in bytes the job asks for, or None."""
    spec = json.loads(job.disk_spec or "{}")
    new_model = spec.get("Disks") or {}
    out: list[int | None] = []
    for disk in disks:
        index = int(disk["index"])
        gib: int | None = None
        if index == 0:
            gib = int(job.system_disk_size or 0) or (new_model.get("System") or {}).get("Size")
        else:
            for item in spec.get("DataDisks") or []:
                if int(item.get("Index", -1)) == index and item.get("Size"):
                    gib = int(item["Size"])
            for item in new_model.get("Data") or []:
                if str(item.get("DiskId", "")) in (str(index), str(disk.get("path", ""))) and item.get("Size"):
                    gib = int(item["Size"])
        out.append(int(gib) * GIB if gib else None)
    return out


def grow(store: ImageStore, disk: DiskIndex, size: int, what: str) -> DiskIndex:
    """``disk`` followed by zeros up to ``size`` bytes (``disk`` itself when it is that size or larger: refused).

    Call it inside ``store.repo.session()``: the padded last chunk, if one is
    needed, is a new blob that must stay until the snapshot naming it exists.
    """
    if size == disk.size:
        return disk
    if size < disk.size:
        raise SmcError(
            f"The {what} is {disk.size} bytes, more than the {size // GIB} GiB the job asks for: block "
            f"replication copies the whole disk. Raise the job's size to at least {-(-disk.size // GIB)} GiB "
            "(ModifyReplicationJobAttribute) and start it again.",
            code="ReplicationJob.DiskSizeTooSmall",
            http_status=400,
        )
    digests = np.zeros((chunks_of(size, disk.chunk_size), 16), dtype=np.uint8)
    digests[: disk.chunks] = disk.digests
    tail = disk.size % disk.chunk_size
    last = disk.chunks - 1
    h = disk.hash_at(last) if tail and disk.chunks else None
    if h is not None:
        padded = store.read_chunk(h) + bytes(disk.chunk_size - tail)
        digest = xxhash.xxh3_128_digest(padded)
        store.repo.put(digest, padded, compress=True)
        store.repo.flush()  # durable before a snapshot names it (store-format.md §7)
        digests[last] = np.frombuffer(digest, dtype=np.uint8)
    # The source's SHA-256 is not the grown disk's; checksum (sealing._prove) computes the new one.
    return DiskIndex(size, disk.chunk_size, digests, None)


def grow_all(store: ImageStore, job: Any, disks: list[dict[str, Any]], staged: list[DiskIndex]) -> list[DiskIndex]:
    """Every staged disk at the size the job asked for (unchanged where it asked for none)."""
    out = []
    for disk, asked, index in zip(disks, asked_sizes(job, disks), staged, strict=True):
        what = "system disk" if int(disk["index"]) == 0 else f"data disk {disk['index']}"
        out.append(index if asked is None else grow(store, index, asked, f"source's {what}"))
    return out
