"""Which byte ranges of a source disk a job copies block by block, and which partitions file by file.

A job copies whole disks block by block, except the partitions it marks
``Block=false`` (``SystemDiskPart.N``, ``DataDisk.N.Part.M``,
``Disks.*.Part.N``): those are copied file by file (``agent/files.py``) and
get a new filesystem in the image (``domain/file_layout.py``), so the block
pass leaves them out. The partition table, the gaps between partitions and
every other partition are copied byte for byte.

Ranges are aligned to the transfer chunk size: an excluded partition gives up
only the chunks that lie wholly inside it, so a neighbour's bytes are never
dropped.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def file_level_sizes(
    spec: Mapping[str, Any], disk_index: int, source_parts: Sequence[Mapping[str, Any]], disk_path: str = ""
) -> dict[str, int | None]:
    """Device id -> the target size the job gives it (SizeBytes; None: as at the source), for Block=false parts.

    ``disk_path``: the data disk's path, which ``Disks.Data.N.DiskId`` may name instead of its index.
    """
    out: dict[str, int | None] = {}
    if disk_index == 0:
        lists: Iterable[Any] = [spec.get("SystemDiskParts") or []]
        path_lists: Iterable[Any] = [((spec.get("Disks") or {}).get("System") or {}).get("Parts") or []]
    else:
        lists = [d.get("Parts") or [] for d in spec.get("DataDisks") or [] if d.get("Index") == disk_index]
        names = {str(disk_index), disk_path} - {""}
        path_lists = [
            d.get("Parts") or []
            for d in (spec.get("Disks") or {}).get("Data") or []
            if str(d.get("DiskId", "")) in names
        ]
    for parts in lists:
        for part in parts:
            if part.get("Block") is False and part.get("Device"):
                out[str(part["Device"])] = _size(part)
    by_path = {
        str(p.get(k)): str(p.get("device"))
        for p in source_parts
        for k in ("mount_point", "path")
        if p.get(k) and p.get("device")
    }
    for parts in path_lists:
        for part in parts:
            if part.get("Block") is False and str(part.get("Path")) in by_path:
                out[by_path[str(part["Path"])]] = _size(part)
    return out


def _size(part: Mapping[str, Any]) -> int | None:
    size = part.get("SizeBytes")
    return int(size) if isinstance(size, int) and size > 0 else None


def copy_ranges(
    disk_size: int, source_parts: Sequence[Mapping[str, Any]], excluded: set[str], chunk_size: int
) -> list[tuple[int, int]]:
    """(offset, length) ranges to copy, chunk-aligned (the last may end at the disk's end), in order."""
    holes: list[tuple[int, int]] = []
    for part in source_parts:
        if str(part.get("device")) not in excluded:
            continue
        start = int(part.get("offset", 0))
        end = start + int(part.get("size_bytes", 0))
        first = -(-start // chunk_size) * chunk_size  # round up: keep a neighbour's chunk
        last = (end // chunk_size) * chunk_size  # round down
        if last > first:
            holes.append((first, last))
    holes.sort()
    ranges: list[tuple[int, int]] = []
    pos = 0
    for start, end in holes:
        if start > pos:
            ranges.append((pos, start - pos))
        pos = max(pos, end)
    if pos < disk_size:
        ranges.append((pos, disk_size - pos))
    return ranges
