"""Copying a whole chunk store to another backend (`opensmc store copy`): a data dir's store onto S3, say.

Every object is copied as it is: names and bytes are the same on every
backend (docs/store-format.md §1), so the copy is a store in its own right.
The order makes an interrupted copy harmless and a second run finish it:
``config`` first (a destination holding another store's config is refused),
then packs, their indexes, snapshots, and ``generation`` last; an object the
destination already holds with the same size is skipped (names of packs and
indexes are their content's hash, snapshots are written once). The source's
``gc`` lock is held shared throughout, so no garbage collection deletes a
pack between the listing and its copy. Backend-private objects (locks,
probes, temporary files: names with a dot) are not objects and are not copied.
Run it with the servers stopped, or packs written meanwhile are missed (a
second run picks them up).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from opensmc.chunkstore.backend import Backend, ObjectNotFound, locked
from opensmc.chunkstore.repository import GC_LOCK

#: the order objects are copied in: a snapshot only after the packs of its blobs
ORDER = ("config", "data/", "index/", "snapshots/", "generation")


class CopyRefused(Exception):
    """The destination holds another store."""


@dataclass
class CopyReport:
    copied: int = 0
    skipped: int = 0
    bytes: int = 0


def _rank(name: str) -> int:
    for i, head in enumerate(ORDER):
        if name == head or (head.endswith("/") and name.startswith(head)):
            return i
    return len(ORDER) - 1  # anything newer than this version goes just before generation


def copy_store(src: Backend, dst: Backend, progress: Callable[[str], None] | None = None) -> CopyReport:
    report = CopyReport()
    with locked(src, GC_LOCK, exclusive=False):
        names = sorted(src.list(""), key=lambda n: (_rank(n), n))
        if "config" in names and dst.exists("config") and dst.read("config") != src.read("config"):
            raise CopyRefused(f"{dst.describe()} holds another store (its config differs); copy into an empty place")
        for name in names:
            size = src.size(name)
            try:
                if dst.size(name) == size and name != "generation":
                    report.skipped += 1
                    continue
            except ObjectNotFound:
                pass
            dst.write(name, src.read(name))
            report.copied += 1
            report.bytes += size
            if progress is not None:
                progress(name)
    return report
