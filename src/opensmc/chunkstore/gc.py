"""Garbage collection: mark every blob a snapshot or staging index names, sweep the rest.

The collector takes the ``gc`` lock exclusively (without waiting: if a run is
writing, or an export reading, it reports ``deferred`` and the caller tries
again later), so no writer can deduplicate against a blob while it decides
the blob is dead. Packs with no live blob are deleted; packs whose dead bytes
exceed ``repack_ratio`` are rewritten with their live blobs only (the new
pack is durable before the old one goes). The ``generation`` object is bumped
before anything is deleted, so every writer reloads its index first, and
again once the sweep is done: a process may open the store (and read its
indexes, which needs no lock) while the sweep deletes some of them, and only
a generation it has not seen makes its next session reload. A ``gc-running``
object marks a sweep in progress, so that one interrupted by a crash is
finished with that second bump by the next collection, even if it has
nothing left to delete.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from opensmc.chunkstore.backend import LockBusy, ObjectNotFound
from opensmc.chunkstore.packs import BlobEntry, PackBuilder, PackCorrupt, decode_blob, parse_index
from opensmc.chunkstore.repository import GC_LOCK, Repository
from opensmc.chunkstore.snapshots import DiskIndex, list_snapshots, load_snapshot
from opensmc.faults import crash_point

__all__ = ["GC_RUNNING", "GcReport", "collect", "live_hashes"]

log = logging.getLogger("opensmc.chunkstore")

#: present while a sweep deletes (see the module docstring)
GC_RUNNING = "gc-running"


@dataclass
class GcReport:
    deferred: bool = False  #: a run or a reader held the store; nothing was done
    packs_deleted: int = 0
    packs_repacked: int = 0
    blobs_freed: int = 0
    bytes_freed: int = 0
    errors: list[str] = field(default_factory=list)


def live_hashes(disks: Iterable[DiskIndex]) -> set[bytes]:
    live: set[bytes] = set()
    for d in disks:
        rows = d.digests[d.digests.any(axis=1)]
        live.update(np.ascontiguousarray(rows).view(np.dtype("V16")).ravel().tolist())
    return live


def collect(repo: Repository, staging: Iterable[DiskIndex], *, repack_ratio: float = 0.3) -> GcReport:
    """Delete what nothing names. ``staging``: the durable staging indexes (they are roots too)."""
    report = GcReport()
    backend = repo.backend
    try:
        held = backend.lock(GC_LOCK, exclusive=True, blocking=False)
    except LockBusy:
        report.deferred = True
        return report
    try:
        roots = list(staging)
        for image_id in list_snapshots(backend):
            roots.extend(load_snapshot(backend, image_id).disks)
        live = live_hashes(roots)
        indexes: dict[str, list[BlobEntry]] = {}
        named = repo.packs()
        for pack in named:
            try:
                indexes[pack] = parse_index(backend.read(f"index/{pack}"))
            except (ObjectNotFound, PackCorrupt) as err:
                report.errors.append(f"index of pack {pack}: {err}")
        # A pack is left alone when every blob in it is live and in no other pack; live blobs
        # already held by a pack that stays are dead here (a copy left by an interrupted repack).
        kept: set[bytes] = set()
        plans: list[str] = []
        for pack, entries in indexes.items():
            if all(e.hash in live for e in entries):
                kept.update(e.hash for e in entries)
            else:
                plans.append(pack)
        # Packs that no index object names: left by a crash between writing a pack and its
        # index. No writer is mid-pack while we hold the lock exclusively, so they are garbage.
        # (A damaged index is another matter: that pack is reported and left alone.)
        orphans = [n for n in backend.list("data/") if n.rpartition("/")[2] not in set(named)]
        interrupted = backend.exists(GC_RUNNING)
        if not plans and not orphans:
            if interrupted:
                _finish_sweep(repo)
            return report
        backend.write(GC_RUNNING, b"")
        repo.bump_generation()
        repo.refresh_after_gc()
        crash_point("gc.marked")
        for name in orphans:
            backend.delete(name)
            report.packs_deleted += 1
        moved: set[bytes] = set()
        for pack in plans:
            entries = indexes[pack]
            name = f"data/{pack[:2]}/{pack}"
            keep = [e for e in entries if e.hash in live and e.hash not in kept and e.hash not in moved]
            dead = sum(e.stored_length for e in entries) - sum(e.stored_length for e in keep)
            total = sum(e.stored_length for e in entries) or 1
            if keep and dead / total < repack_ratio:
                kept.update(e.hash for e in keep)
                continue
            if keep:
                builder = PackBuilder()
                try:
                    raw = backend.read(name)
                    for e in keep:
                        plain = decode_blob(e, raw[e.offset : e.offset + e.stored_length])
                        builder.add(e.hash, plain, compress=e.codec != 0)
                except (ObjectNotFound, PackCorrupt) as err:
                    report.errors.append(f"pack {pack} not repacked: {err}")
                    kept.update(e.hash for e in keep)
                    continue
                new, data, index = builder.finish()
                backend.write(f"data/{new[:2]}/{new}", data)
                backend.write(f"index/{new}", index)
                moved.update(e.hash for e in keep)
                report.packs_repacked += 1
            else:
                report.packs_deleted += 1
            backend.delete(f"index/{pack}")  # the index first: no index ever names a missing pack
            backend.delete(name)
            crash_point("gc.sweeping")
            report.blobs_freed += len(entries) - len(keep)
            report.bytes_freed += dead
        _finish_sweep(repo)
        log.info(
            "gc: %d pack(s) deleted, %d repacked, %d blob(s) / %d bytes freed",
            report.packs_deleted,
            report.packs_repacked,
            report.blobs_freed,
            report.bytes_freed,
        )
        return report
    finally:
        held.release()


def _finish_sweep(repo: Repository) -> None:
    """A new generation for views loaded during the sweep; then the sweep is over."""
    repo.bump_generation()
    repo.backend.delete(GC_RUNNING)
    repo.refresh_after_gc()
