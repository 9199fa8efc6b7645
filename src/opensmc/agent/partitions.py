"""Read MBR and GPT partition tables and sniff filesystems, in pure Python.

The agent must know where each partition starts and ends on a disk (a block
device or a raw disk image file) without parted, blkid or root-only ioctls.
This module reads the on-disk structures with :mod:`struct`:

- **MBR** (label ``"dos"``): four primary entries at byte 446 of sector 0,
  plus logical partitions chained through EBRs inside an extended partition
  (types 0x05, 0x0F, 0x85). Primaries are numbered 1-4 and logicals 5, 6, ...
  as Linux numbers them. The extended container itself is listed too, with
  ``container=True``, so the list matches ``sfdisk -J``.
- **GPT** (label ``"gpt"``): a protective MBR (one 0xEE entry), the header at
  LBA 1 (CRC32 checked) and the entry array (CRC32 checked). If the primary
  header or its entries are corrupt, the backup header in the disk's last LBA
  is used and a warning is recorded. GPT is looked for at 512- and
  4096-byte sectors.

:func:`read_partition_table` returns a :class:`PartitionTable` (label, sector
size, warnings, partitions); :func:`read_partitions` just the list. A disk with
no partition table gives an empty list: the whole disk is one block device
(possibly holding a filesystem; see :func:`detect_filesystem`).

Errors: a table that is recognisably present but unusable (GPT with both
headers corrupt and no usable hybrid MBR, an EBR chain that loops) raises
:class:`PartitionTableError`, a :class:`ValueError`. Nothing else is raised
for bad bytes; ``OSError`` from opening or reading the source passes through.
"""

import os
import struct
import uuid
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, BinaryIO, NamedTuple, Tuple, Union

if TYPE_CHECKING:
    from typing import Literal  # novermin (annotations only)

__all__ = [
    "Partition",
    "PartitionTable",
    "PartitionTableError",
    "Source",
    "detect_filesystem",
    "read_partition_table",
    "read_partitions",
]

Source = Union[str, "os.PathLike[str]", BinaryIO]

#: MBR partition types that hold a chain of logical partitions.
_EXTENDED_TYPES = frozenset({0x05, 0x0F, 0x85})
_GPT_PROTECTIVE = 0xEE
_GPT_SIGNATURE = b"EFI PART"
# A standard GPT has 128 entries of 128 bytes; cap what we accept so a corrupt
# header cannot make us read gigabytes.
_GPT_MAX_ENTRY_BYTES = 1 << 20
# Real disks have at most a few dozen logical partitions; a longer EBR chain is
# corrupt (or a loop we failed to spot).
_MAX_LOGICAL = 256
#: GPT attribute bit 2: "legacy BIOS bootable".
_GPT_ATTR_LEGACY_BOOTABLE = 1 << 2


class PartitionTableError(ValueError):
    """A partition table is present but cannot be used (corrupt beyond repair)."""


class Partition(NamedTuple):
    """One entry of a partition table."""

    #: Partition number as Linux names it (``sda<index>``): GPT entry slot + 1,
    #: MBR primaries 1-4, logicals from 5.
    index: int  # type: ignore[assignment]  # a field named like tuple.index: fine at run time
    #: Offset of the first byte on the disk.
    start: int
    #: Length in bytes.
    size: int
    #: GPT: the type GUID in upper case (``"0FC63DAF-8483-4772-8E79-3D69D8477DE4"``);
    #: MBR: the type byte as lower-case hex without prefix (``"83"``). Both as ``sfdisk -J`` prints them.
    type: str
    #: GPT partition name; empty for MBR.
    name: str = ""
    #: GPT unique partition GUID (upper case); empty for MBR.
    uuid: str = ""
    #: MBR active flag (0x80), or GPT attribute bit 2 (legacy BIOS bootable).
    bootable: bool = False
    #: True for an MBR extended partition: a container of logicals, holding no data itself.
    container: bool = False
    #: Filesystem found by :func:`detect_filesystem`, or None.
    fs_type: "str | None" = None


class PartitionTable(NamedTuple):
    """A disk's partition table as read from its bytes."""

    #: ``"gpt"``, ``"dos"`` (MBR) or None when the disk has no table.
    label: 'Literal["gpt", "dos"] | None'
    sector_size: int
    disk_size: int
    partitions: "list[Partition]" = []
    #: Problems that were worked around (e.g. primary GPT header corrupt, backup used).
    warnings: "list[str]" = []


class _Disk:
    """Random-access reads that never come back short (zero padded past the end)."""

    def __init__(self, fh: "BinaryIO", size: int) -> None:
        self._fh = fh
        self.size = size

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length <= 0 or offset >= self.size:
            return bytes(max(length, 0))
        self._fh.seek(offset)
        data = self._fh.read(min(length, self.size - offset))
        # Zero padding keeps every struct.unpack_from in bounds, whatever the input.
        return data + bytes(length - len(data))


@contextmanager
def _open(source: "Source") -> "Iterator[_Disk]":
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb", buffering=0) as raw:
            fh: "BinaryIO" = raw
            yield _Disk(fh, _size_of(fh))
    else:
        here = source.tell()
        try:
            yield _Disk(source, _size_of(source))
        finally:
            source.seek(here)  # the caller's stream, left where the caller had it


def _size_of(fh: "BinaryIO") -> int:
    # seek(0, SEEK_END) works for regular files and block devices alike, where
    # os.fstat reports size 0 for the latter.
    here = fh.tell()
    try:
        return fh.seek(0, os.SEEK_END)
    finally:
        fh.seek(here)


def read_partitions(source: "Source", *, sector_size: "int | None" = None) -> "list[Partition]":
    """Partitions of ``source`` (path or binary file object), in table order; [] if it has no table."""
    return read_partition_table(source, sector_size=sector_size).partitions


def read_partition_table(source: "Source", *, sector_size: "int | None" = None) -> "PartitionTable":
    """Read the partition table of ``source`` and sniff each partition's filesystem.

    ``sector_size`` is the logical sector size when known (block devices:
    ``/sys/block/X/queue/logical_block_size``). Without it, GPT is looked for at
    512 and 4096 bytes and MBR is read with 512-byte sectors.
    """
    with _open(source) as disk:
        table = _read_table(disk, sector_size)
        parts = [p if p.container else p._replace(fs_type=_detect_at(disk, p.start, p.size)) for p in table.partitions]
        return PartitionTable(table.label, table.sector_size, disk.size, parts, table.warnings)


def _read_table(disk: "_Disk", sector_size: "int | None") -> "PartitionTable":
    mbr = disk.read(0, 512)
    has_mbr_sig = mbr[510:512] == b"\x55\xaa"
    entries = _mbr_entries(mbr) if has_mbr_sig else None
    protective = entries is not None and any(e[1] == _GPT_PROTECTIVE for e in entries)

    sizes = [sector_size] if sector_size else [512, 4096]
    if protective or not has_mbr_sig:
        # Without any MBR signature we still accept a GPT: some tools write
        # GPT-only images, and a valid CRC makes a false positive negligible.
        for ss in sizes:
            if disk.read(ss, 8) == _GPT_SIGNATURE or disk.read(disk.size - ss, 8) == _GPT_SIGNATURE:
                return _read_gpt(disk, ss, entries if protective else None)
        if protective:
            raise PartitionTableError("protective MBR (type 0xEE) but no GPT header at LBA 1 or the last LBA")
    if entries is None:
        return PartitionTable(None, sizes[0], disk.size)
    return _read_mbr(disk, entries, sector_size or 512)


# -- MBR ---------------------------------------------------------------------------------------------------

_MbrEntry = Tuple[int, int, int, int]  # (status, type, first LBA, sector count)


def _mbr_entries(sector: bytes) -> "list[_MbrEntry] | None":
    """The four primary entries, or None if the sector is not a partition table."""
    entries: "list[_MbrEntry]" = []
    for i in range(4):
        status, ptype, lba, count = _unpack_mbr_entry(sector, 446 + 16 * i)
        # libblkid's test: a boot indicator other than 0x00/0x80 means these 64
        # bytes are boot code or a filesystem's boot sector, not a table.
        if status not in (0x00, 0x80):
            return None
        entries.append((status, ptype, lba, count))
    if _looks_like_boot_sector(sector):
        # A FAT/NTFS filesystem made on the whole disk also ends in 55 AA.
        return None
    return entries


def _unpack_mbr_entry(buf: bytes, off: int) -> "_MbrEntry":
    status, ptype, lba, count = struct.unpack_from("<B3xB3xII", buf, off)
    return status, ptype, lba, count


def _read_mbr(disk: "_Disk", entries: "list[_MbrEntry]", ss: int) -> "PartitionTable":
    parts: "list[Partition]" = []
    warnings: "list[str]" = []
    extended: "tuple[int, int] | None" = None
    for slot, (status, ptype, lba, count) in enumerate(entries, start=1):
        if ptype == 0 or count == 0:
            continue
        is_ext = ptype in _EXTENDED_TYPES
        parts.append(Partition(slot, lba * ss, count * ss, f"{ptype:x}", bootable=status == 0x80, container=is_ext))
        if is_ext:
            if extended is not None:
                warnings.append(f"second extended partition {slot} ignored")
                continue
            extended = (lba, count)
    if extended is not None:
        parts.extend(_read_logicals(disk, extended[0], ss))
    return PartitionTable("dos", ss, disk.size, parts, warnings)


def _read_logicals(disk: "_Disk", ext_lba: int, ss: int) -> "list[Partition]":
    """Follow the EBR chain: entry 0 is a logical (relative to its EBR), entry 1 the next EBR (relative to
    the extended partition's start)."""
    logicals: "list[Partition]" = []
    seen: "set[int]" = set()
    ebr = ext_lba
    number = 5
    while True:
        if ebr in seen:
            raise PartitionTableError(f"EBR chain loops back to LBA {ebr}")
        if len(seen) >= _MAX_LOGICAL:
            raise PartitionTableError(f"EBR chain longer than {_MAX_LOGICAL} entries")
        seen.add(ebr)
        sector = disk.read(ebr * ss, 512)
        if sector[510:512] != b"\x55\xaa":
            break  # end of chain (an empty extended partition has no valid EBR)
        status, ptype, lba, count = _unpack_mbr_entry(sector, 446)
        if ptype != 0 and count != 0:
            logicals.append(Partition(number, (ebr + lba) * ss, count * ss, f"{ptype:x}", bootable=status == 0x80))
            number += 1
        _, ntype, nlba, _count = _unpack_mbr_entry(sector, 462)
        if ntype not in _EXTENDED_TYPES or nlba == 0:
            break
        ebr = ext_lba + nlba
    return logicals


# -- GPT ---------------------------------------------------------------------------------------------------

_GPT_HEADER = struct.Struct("<8sIII4xQQQQ16sQIII")


class _GptHeader(NamedTuple):
    my_lba: int
    entries_lba: int
    num_entries: int
    entry_size: int
    entries_crc: int


def _parse_gpt_header(disk: "_Disk", lba: int, ss: int) -> "tuple[_GptHeader | None, str]":
    """The header at ``lba`` if valid, else (None, reason)."""
    raw = disk.read(lba * ss, ss)
    (sig, _rev, hsize, hcrc, my_lba, _alt, _first, _last, _guid, entries_lba, num, esize, ecrc) = (
        _GPT_HEADER.unpack_from(raw, 0)
    )
    if sig != _GPT_SIGNATURE:
        return None, f"no GPT signature at LBA {lba}"
    if not 92 <= hsize <= ss:
        return None, f"GPT header at LBA {lba} has invalid size {hsize}"
    check = bytearray(raw[:hsize])
    check[16:20] = bytes(4)  # the CRC is computed with its own field zeroed
    if zlib.crc32(check) != hcrc:
        return None, f"GPT header CRC mismatch at LBA {lba}"
    if my_lba != lba:
        return None, f"GPT header at LBA {lba} claims to be at LBA {my_lba}"
    if esize < 128 or esize % 8 or num * esize > _GPT_MAX_ENTRY_BYTES:
        return None, f"GPT header at LBA {lba} has an implausible entry array ({num} x {esize})"
    return _GptHeader(my_lba, entries_lba, num, esize, ecrc), ""


def _read_gpt(disk: "_Disk", ss: int, hybrid: "list[_MbrEntry] | None") -> "PartitionTable":
    last_lba = disk.size // ss - 1
    warnings: "list[str]" = []
    for lba in (1, last_lba):
        header, problem = _parse_gpt_header(disk, lba, ss)
        if header is not None:
            array = disk.read(header.entries_lba * ss, header.num_entries * header.entry_size)
            if zlib.crc32(array) == header.entries_crc:
                if lba != 1:
                    warnings.append("using the backup GPT header at the last LBA")
                parts = _gpt_entries(array, header, ss)
                return PartitionTable("gpt", ss, disk.size, parts, warnings)
            problem = f"GPT partition entries CRC mismatch (header at LBA {lba})"
        warnings.append(problem)
    # Both copies are bad. A hybrid MBR (real entries beside the 0xEE one) is a
    # usable second opinion; a plain protective MBR describes nothing.
    usable = [e for e in hybrid or [] if e[1] not in (0, _GPT_PROTECTIVE) and e[3] != 0]
    if usable and hybrid is not None:
        table = _read_mbr(disk, hybrid, ss)
        real = [p for p in table.partitions if p.type != f"{_GPT_PROTECTIVE:x}"]
        return PartitionTable("dos", ss, disk.size, real, [*warnings, "fell back to the hybrid MBR"])
    raise PartitionTableError("corrupt GPT: " + "; ".join(warnings))


def _gpt_entries(array: bytes, header: "_GptHeader", ss: int) -> "list[Partition]":
    parts: "list[Partition]" = []
    for slot in range(header.num_entries):
        off = slot * header.entry_size
        type_raw = array[off : off + 16]
        if type_raw == bytes(16):
            continue  # unused slot
        uniq = array[off + 16 : off + 32]
        first, last, attrs = struct.unpack_from("<QQQ", array, off + 32)
        if last < first:
            continue  # not a partition any tool would create; skip rather than report a negative size
        name = array[off + 56 : off + 128].decode("utf-16-le", errors="replace").split("\x00", 1)[0]
        parts.append(
            Partition(
                index=slot + 1,
                start=first * ss,
                size=(last - first + 1) * ss,
                type=str(uuid.UUID(bytes_le=type_raw)).upper(),
                name=name,
                uuid=str(uuid.UUID(bytes_le=uniq)).upper(),
                bootable=bool(attrs & _GPT_ATTR_LEGACY_BOOTABLE),
            )
        )
    return parts


# -- filesystems -------------------------------------------------------------------------------------------

# ext feature bits, from the kernel's fs/ext4/ext4.h; libblkid decides ext2/3/4 the same way.
_EXT3_COMPAT_HAS_JOURNAL = 0x0004
_EXT3_INCOMPAT_JOURNAL_DEV = 0x0008
_EXT3_INCOMPAT_SUPPORTED = 0x0002 | 0x0004 | 0x0010  # FILETYPE | RECOVER | META_BG
_EXT3_RO_COMPAT_SUPPORTED = 0x0001 | 0x0002 | 0x0004  # SPARSE_SUPER | LARGE_FILE | BTREE_DIR


def _looks_like_boot_sector(sector: bytes) -> bool:
    return _fat_or_ntfs(sector) is not None


def _fat_or_ntfs(sector: bytes) -> "str | None":
    if sector[3:11] == b"NTFS    ":
        return "ntfs"
    if sector[510:512] != b"\x55\xaa":
        return None
    bytes_per_sector = struct.unpack_from("<H", sector, 11)[0]
    if bytes_per_sector not in (512, 1024, 2048, 4096):
        return None
    if sector[54:59] in (b"FAT12", b"FAT16") or sector[82:87] == b"FAT32":
        return "vfat"
    return None


def detect_filesystem(source: "Source", offset: int = 0, size: "int | None" = None) -> "str | None":
    """Filesystem at ``offset`` of ``source`` from its superblock magic, or None.

    Names follow blkid: ext2, ext3, ext4, xfs, btrfs, vfat, ntfs, swap,
    LVM2_member, crypto_LUKS.
    """
    with _open(source) as disk:
        return _detect_at(disk, offset, disk.size - offset if size is None else size)


def _detect_at(disk: "_Disk", offset: int, size: int) -> "str | None":
    def at(rel: int, length: int) -> bytes:
        # Never look past the partition: the next one's superblock is not ours.
        if rel + length > size:
            return bytes(length)
        return disk.read(offset + rel, length)

    head = at(0, 512)
    if head[0:4] == b"XFSB":
        return "xfs"
    if head[0:6] == b"LUKS\xba\xbe":
        return "crypto_LUKS"
    boot = _fat_or_ntfs(head)
    if boot is not None:
        return boot
    ext = at(1024, 128)
    if ext[56:58] == b"\x53\xef":
        compat, incompat, ro_compat = struct.unpack_from("<III", ext, 92)
        if incompat & _EXT3_INCOMPAT_JOURNAL_DEV:
            return "jbd"
        if incompat & ~_EXT3_INCOMPAT_SUPPORTED or ro_compat & ~_EXT3_RO_COMPAT_SUPPORTED:
            return "ext4"
        return "ext3" if compat & _EXT3_COMPAT_HAS_JOURNAL else "ext2"
    if at(65536 + 64, 8) == b"_BHRfS_M":
        return "btrfs"
    # LVM2 writes its label in one of the first four sectors.
    for sector in range(4):
        label = at(sector * 512, 32)
        if label[0:8] == b"LABELONE" and label[24:32] == b"LVM2 001":
            return "LVM2_member"
    # The swap signature ends the first page, whatever the page size was.
    for page in (4096, 8192, 16384, 65536):
        if at(page - 10, 10) in (b"SWAPSPACE2", b"SWAP-SPACE"):
            return "swap"
    return None
