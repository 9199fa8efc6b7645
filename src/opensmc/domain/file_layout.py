"""Where each partition lands on the image disk when some are copied file by file.

A partition copied block by block keeps its size; one copied file by file
(``Block=false``) gets a new filesystem of the size the job asks for
(``SizeBytes``), which may be smaller or larger than the source partition. So
the partitions after a resized one move: each keeps its distance from the one
before it, rounded up to a whole MiB, so that a moved block partition stays
aligned (the image is made of 16 KiB chunks, and a shift by whole MiB moves
whole chunks: metadata, not bytes). The disk's first partition never moves:
everything before it (the MBR and its gap with GRUB's core image, the GPT) is
copied block by block and keeps its place.

:func:`plan` is pure: the source facts and the job's choices in, a
:class:`Layout` out, or :class:`LayoutError` whose message says what to change.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MiB = 1024 * 1024
GIB = 1024**3
#: the smallest filesystem a partition copied file by file is given
MIN_FILE_PART = 16 * MiB
#: what the end of a GPT disk holds after the last usable sector: the backup entries and header
GPT_TAIL_SECTORS = 33
#: filesystems a partition copied file by file may hold (the receiver rebuilds them with mke2fs)
FILE_LEVEL_FS = ("ext2", "ext3", "ext4")


class LayoutError(ValueError):
    """The partitions do not fit, or cannot be copied file by file; the message says what to change."""


@dataclass(frozen=True)
class PartMove:
    device: str
    number: int
    file_level: bool
    src_offset: int
    src_size: int
    dst_offset: int
    dst_size: int
    fs_type: str | None


@dataclass(frozen=True)
class Layout:
    src_size: int
    size: int  #: the image disk's size
    label: str | None
    sector_size: int
    parts: tuple[PartMove, ...]

    @property
    def moved(self) -> bool:
        """Does any partition change its place or size (so the partition table is rewritten)?"""
        return any(p.dst_offset != p.src_offset or p.dst_size != p.src_size for p in self.parts)

    def file_parts(self) -> list[PartMove]:
        return [p for p in self.parts if p.file_level]


def _ceil_mib(n: int) -> int:
    return -(-n // MiB) * MiB


def plan(
    disk: Mapping[str, Any],
    file_sizes: Mapping[str, int | None],
    asked_size: int | None,
    what: str,
) -> Layout:
    """The image layout of a source disk (its discovery facts) with ``file_sizes`` copied file by file.

    ``file_sizes``: device id -> the target size in bytes (None: the source partition's size).
    ``asked_size``: the image disk's size the job asks for (None: the source disk's size).
    """
    src_size = int(disk.get("size_bytes") or 0)
    label = disk.get("label")
    ss = int(disk.get("sector_size") or 512)
    raw = [p for p in (disk.get("parts") or disk.get("partitions") or []) if isinstance(p, dict)]
    parts = sorted(raw, key=lambda p: int(p.get("offset", 0)))
    known = {str(p.get("device")) for p in parts}
    unknown = sorted(set(file_sizes) - known)
    if unknown:
        raise LayoutError(
            f"The source {what} has no partition {', '.join(unknown)}; it has {', '.join(sorted(known))}."
        )
    for p in parts:
        dev = str(p.get("device"))
        if dev not in file_sizes:
            continue
        fs = p.get("fs_type")
        if fs not in FILE_LEVEL_FS:
            raise LayoutError(
                f"Partition {dev} of the {what} holds {fs or 'no filesystem OpenSMC recognises'}: file-level "
                f"copying (Block=false) rebuilds {', '.join(FILE_LEVEL_FS)} filesystems only. Set its Block to true."
            )
        if int(p.get("number", 0)) == 0:
            raise LayoutError(
                f"The {what} has no partition table (its filesystem is the whole disk): copy it block by block "
                "(Block=true)."
            )
        if label == "dos" and int(p.get("number", 0)) > 4:
            raise LayoutError(
                f"Partition {dev} of the {what} is a logical partition: file-level copying is done for primary "
                "and GPT partitions only. Set its Block to true."
            )
    moves: list[PartMove] = []
    shift = 0
    prev_src_end = prev_dst_end = None
    for p in parts:
        dev = str(p.get("device"))
        src_off, src_len = int(p.get("offset", 0)), int(p.get("size_bytes", 0))
        file_level = dev in file_sizes
        dst_len = src_len
        if file_level:
            asked = file_sizes[dev]
            dst_len = src_len if asked is None else int(asked) // MiB * MiB
            if dst_len < MIN_FILE_PART:
                raise LayoutError(
                    f"Partition {dev} of the {what}: SizeBytes {asked} is too small; a partition copied file by "
                    f"file gets at least {MIN_FILE_PART // MiB} MiB."
                )
        if prev_src_end is not None and prev_dst_end is not None:
            # keep the gap to the previous partition; move by whole MiB (see the module's docstring)
            shift = (
                _ceil_mib(prev_dst_end - prev_src_end)
                if prev_dst_end > prev_src_end
                else -((prev_src_end - prev_dst_end) // MiB * MiB)
            )
        dst_off = src_off + shift
        if label == "dos" and int(p.get("number", 0)) > 4 and dst_off != src_off:
            raise LayoutError(
                f"Partition {dev} of the {what} is a logical partition and would have to move: OpenSMC does not "
                "move logical partitions. Keep the partitions before it at their size."
            )
        moves.append(
            PartMove(dev, int(p.get("number", 0)), file_level, src_off, src_len, dst_off, dst_len, p.get("fs_type"))
        )
        prev_src_end, prev_dst_end = src_off + src_len, dst_off + dst_len
    end = max((m.dst_offset + m.dst_size for m in moves), default=0)
    needed = end + (GPT_TAIL_SECTORS * ss if label == "gpt" else 0)
    size = asked_size if asked_size is not None else src_size
    if needed > size:
        raise LayoutError(
            f"The {what}'s partitions need {needed} bytes ({-(-needed // GIB)} GiB) as the job sizes them, more "
            f"than the {size} bytes of the target disk: make the target disk at least {-(-needed // GIB)} GiB, "
            "or give the partitions copied file by file smaller SizeBytes."
        )
    return Layout(src_size, size, label, ss, tuple(moves))
