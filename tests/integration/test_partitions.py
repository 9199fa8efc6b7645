"""Partition-table and filesystem sniffing against images built by sfdisk and mkfs."""

from __future__ import annotations

import io
import json
import shutil
import struct
import subprocess
import uuid
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opensmc.agent.partitions import (
    PartitionTableError,
    detect_filesystem,
    read_partition_table,
    read_partitions,
)

MIB = 1 << 20
SECTOR = 512

needs_sfdisk = pytest.mark.skipif(shutil.which("sfdisk") is None, reason="sfdisk not installed")
needs_mkfs = pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="mkfs.ext4 not installed")


def make_image(path: Path, size: int, script: str) -> Path:
    """A sparse image of ``size`` bytes partitioned by ``sfdisk`` from ``script``."""
    with open(path, "wb") as fh:
        fh.truncate(size)
    subprocess.run(["sfdisk", "-q", "--no-reread", "--no-tell-kernel", str(path)],
                   input=script, text=True, check=True, capture_output=True)
    return path


def sfdisk_json(path: Path) -> dict[str, object]:
    out = subprocess.run(["sfdisk", "-J", str(path)], check=True, capture_output=True, text=True).stdout
    table: dict[str, object] = json.loads(out)["partitiontable"]
    return table


def put_ext4(image: Path, offset: int, size: int, tmp: Path) -> None:
    """mkfs.ext4 a separate file of the partition's size, then copy it in at ``offset``."""
    fs = tmp / f"fs-{offset}.img"
    with open(fs, "wb") as fh:
        fh.truncate(size)
    subprocess.run(["mkfs.ext4", "-F", "-q", str(fs)], check=True, capture_output=True)
    with open(fs, "rb") as src, open(image, "r+b") as dst:
        pos = 0
        while chunk := src.read(4 * MIB):
            if chunk.count(0) != len(chunk):  # keep the image sparse
                dst.seek(offset + pos)
                dst.write(chunk)
            pos += len(chunk)


def as_tuples(table: dict[str, object]) -> list[tuple[int, int, int, str]]:
    parts = table["partitions"]
    assert isinstance(parts, list)
    return [
        (int(p["node"].rsplit("img", 1)[1]), p["start"] * SECTOR, p["size"] * SECTOR, p["type"])
        for p in parts
    ]


MBR_SCRIPT = """label: dos
start=2048, size=8MiB, type=83, bootable
size=8MiB, type=82
type=5
size=10MiB, type=83
type=8e
"""

GPT_SCRIPT = """label: gpt
size=8MiB, type=U, name="EFI System"
size=20MiB, type=L, name=root
type=S, name=swap
"""


@needs_sfdisk
def test_mbr_primary_extended_logical_match_sfdisk(tmp_path: Path) -> None:
    img = make_image(tmp_path / "mbr.img", 64 * MIB, MBR_SCRIPT)
    table = read_partition_table(img)
    assert table.label == "dos"
    assert table.sector_size == SECTOR
    assert table.disk_size == 64 * MIB
    got = [(p.index, p.start, p.size, p.type) for p in table.partitions]
    assert got == as_tuples(sfdisk_json(img))
    assert [p.index for p in table.partitions] == [1, 2, 3, 5, 6]
    assert [p.container for p in table.partitions] == [False, False, True, False, False]
    assert [p.bootable for p in table.partitions] == [True, False, False, False, False]
    assert table.warnings == []


@needs_sfdisk
def test_gpt_three_partitions_match_sfdisk(tmp_path: Path) -> None:
    img = make_image(tmp_path / "gpt.img", 64 * MIB, GPT_SCRIPT)
    table = read_partition_table(img)
    ref = sfdisk_json(img)
    assert table.label == "gpt"
    assert [(p.index, p.start, p.size, p.type) for p in table.partitions] == as_tuples(ref)
    parts = ref["partitions"]
    assert isinstance(parts, list)
    assert [p.uuid for p in table.partitions] == [p["uuid"] for p in parts]
    assert [p.name for p in table.partitions] == ["EFI System", "root", "swap"]
    assert table.partitions[0].type == "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"


@needs_sfdisk
def test_read_partitions_accepts_a_file_object(tmp_path: Path) -> None:
    img = make_image(tmp_path / "gpt.img", 16 * MIB, "label: gpt\nsize=4MiB\ntype=L\n")
    with open(img, "rb") as fh:
        fh.seek(123)
        parts = read_partitions(fh)
        assert fh.tell() == 123  # the caller's position is restored
    assert [(p.index, p.start, p.size, p.type) for p in parts] == as_tuples(sfdisk_json(img))
    assert len(parts) == 2


@needs_sfdisk
@needs_mkfs
def test_ext4_inside_a_partition_is_detected(tmp_path: Path) -> None:
    img = make_image(tmp_path / "gpt.img", 64 * MIB, GPT_SCRIPT)
    root = read_partitions(img)[1]
    put_ext4(img, root.start, root.size, tmp_path)
    # The copy landed where the table says: e2fsck finds a clean filesystem at that offset.
    subprocess.run(["e2fsck", "-fn", f"{img}?offset={root.start}"], check=True, capture_output=True)
    parts = read_partitions(img)
    assert [p.fs_type for p in parts] == [None, "ext4", None]
    assert detect_filesystem(img, root.start, root.size) == "ext4"


@pytest.mark.skipif(shutil.which("mkswap") is None, reason="mkswap not installed")
def test_swap_detected(tmp_path: Path) -> None:
    img = tmp_path / "swap.img"
    with open(img, "wb") as fh:
        fh.truncate(4 * MIB)
    subprocess.run(["mkswap", str(img)], check=True, capture_output=True)
    assert detect_filesystem(img) == "swap"
    assert read_partitions(img) == []


@pytest.mark.parametrize(
    ("offset", "magic", "expected"),
    [
        (0, b"XFSB", "xfs"),
        (65536 + 64, b"_BHRfS_M", "btrfs"),
        (3, b"NTFS    ", "ntfs"),
        (512, b"LABELONE" + bytes(16) + b"LVM2 001", "LVM2_member"),
        (0, b"LUKS\xba\xbe", "crypto_LUKS"),
    ],
)
def test_magic_detection(offset: int, magic: bytes, expected: str) -> None:
    buf = bytearray(128 * 1024)
    buf[offset:offset + len(magic)] = magic
    assert detect_filesystem(io.BytesIO(bytes(buf))) == expected


def _fat32_boot_sector() -> bytearray:
    buf = bytearray(1 * MIB)
    buf[0:3] = b"\xeb\x58\x90"
    buf[3:11] = b"mkfs.fat"
    struct.pack_into("<H", buf, 11, 512)
    buf[82:90] = b"FAT32   "
    # Bytes 446-509 stay zero: valid-looking MBR status bytes, so only the FAT check can reject it.
    buf[510:512] = b"\x55\xaa"
    return buf


def test_fat_on_whole_disk_is_not_a_partition_table() -> None:
    buf = _fat32_boot_sector()
    assert read_partitions(io.BytesIO(bytes(buf))) == []
    assert detect_filesystem(io.BytesIO(bytes(buf))) == "vfat"


@needs_mkfs
def test_ext_versions(tmp_path: Path) -> None:
    for kind in ("ext2", "ext3", "ext4"):
        img = tmp_path / f"{kind}.img"
        with open(img, "wb") as fh:
            fh.truncate(8 * MIB)
        subprocess.run([f"mkfs.{kind}", "-F", "-q", str(img)], check=True, capture_output=True)
        assert detect_filesystem(img) == kind


def test_empty_and_tiny_disks_have_no_table(tmp_path: Path) -> None:
    assert read_partitions(io.BytesIO(b"")) == []
    assert read_partitions(io.BytesIO(bytes(100))) == []
    blank = tmp_path / "blank.img"
    with open(blank, "wb") as fh:
        fh.truncate(8 * MIB)
    table = read_partition_table(blank)
    assert (table.label, table.partitions, table.disk_size) == (None, [], 8 * MIB)


# -- corruption ------------------------------------------------------------------------------------------


@needs_sfdisk
def test_corrupt_primary_gpt_header_falls_back_to_backup(tmp_path: Path) -> None:
    img = make_image(tmp_path / "gpt.img", 64 * MIB, GPT_SCRIPT)
    good = read_partitions(img)
    with open(img, "r+b") as fh:
        fh.seek(SECTOR + 40)  # first_usable_lba: inside the CRC-covered header
        fh.write(b"\xff")
    table = read_partition_table(img)
    assert table.label == "gpt"
    assert table.partitions == good
    assert any("CRC mismatch at LBA 1" in w for w in table.warnings)
    assert any("backup GPT header" in w for w in table.warnings)


@needs_sfdisk
def test_corrupt_primary_entries_fall_back_to_backup(tmp_path: Path) -> None:
    img = make_image(tmp_path / "gpt.img", 64 * MIB, GPT_SCRIPT)
    good = read_partitions(img)
    with open(img, "r+b") as fh:
        fh.seek(2 * SECTOR + 32)  # first LBA of entry 1
        fh.write(b"\x01")
    table = read_partition_table(img)
    assert table.partitions == good
    assert any("entries CRC mismatch" in w for w in table.warnings)


@needs_sfdisk
def test_both_gpt_headers_corrupt_is_a_clear_error(tmp_path: Path) -> None:
    img = make_image(tmp_path / "gpt.img", 64 * MIB, GPT_SCRIPT)
    with open(img, "r+b") as fh:
        fh.seek(SECTOR + 40)
        fh.write(b"\xff")
        fh.seek(64 * MIB - SECTOR + 40)
        fh.write(b"\xff")
    with pytest.raises(PartitionTableError, match="CRC mismatch"):
        read_partitions(img)


def test_ebr_loop_is_an_error() -> None:
    buf = bytearray(4 * MIB)
    buf[510:512] = b"\x55\xaa"
    struct.pack_into("<B3xB3xII", buf, 446, 0, 0x05, 2048, 4096)  # extended at LBA 2048
    ebr = 2048 * SECTOR
    buf[ebr + 510:ebr + 512] = b"\x55\xaa"
    struct.pack_into("<B3xB3xII", buf, ebr + 446, 0, 0x83, 63, 100)
    struct.pack_into("<B3xB3xII", buf, ebr + 462, 0, 0x05, 0 + 1, 100)  # next EBR at extended+1 ...
    nxt = (2048 + 1) * SECTOR
    buf[nxt + 510:nxt + 512] = b"\x55\xaa"
    struct.pack_into("<B3xB3xII", buf, nxt + 446, 0, 0x83, 63, 10)
    struct.pack_into("<B3xB3xII", buf, nxt + 462, 0, 0x05, 1, 100)  # ... which points at itself
    with pytest.raises(PartitionTableError, match="loops"):
        read_partitions(io.BytesIO(bytes(buf)))


# -- robustness ------------------------------------------------------------------------------------------


def _parse_or_documented_error(data: bytes) -> None:
    try:
        parts = read_partitions(io.BytesIO(data))
    except PartitionTableError:
        return
    assert isinstance(parts, list)
    for p in parts:
        assert p.start >= 0 and p.size >= 0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4096))
def test_random_bytes_never_crash(data: bytes) -> None:
    _parse_or_documented_error(data)


@settings(max_examples=300, deadline=None)
@given(
    st.binary(min_size=64, max_size=64),
    st.booleans(),
    st.binary(min_size=0, max_size=1024),
)
def test_random_tables_with_valid_signatures_never_crash(entries: bytes, gpt: bool, rest: bytes) -> None:
    sector0 = bytearray(512)
    sector0[446:510] = entries
    sector0[510:512] = b"\x55\xaa"
    tail = (b"EFI PART" + rest) if gpt else rest
    _parse_or_documented_error(bytes(sector0) + tail)


@pytest.fixture(scope="module")
def small_gpt(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    if shutil.which("sfdisk") is None:
        pytest.skip("sfdisk not installed")
    img = make_image(tmp_path_factory.mktemp("gpt") / "small.img", 2 * MIB,
                     "label: gpt\nsize=256KiB\nsize=256KiB\ntype=L\n")
    return img.read_bytes()


@needs_sfdisk
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 34 * 512 - 1), st.integers(0, 255)), min_size=1, max_size=8))
def test_mutated_gpt_never_crashes(small_gpt: bytes, flips: list[tuple[int, int]]) -> None:
    buf = bytearray(small_gpt)
    for pos, value in flips:
        buf[pos] = value
    _parse_or_documented_error(bytes(buf))


def _handmade_gpt(ss: int, sectors: int, parts: list[tuple[int, int]]) -> bytes:
    """A minimal GPT (protective MBR, primary and backup headers, 128 entries) with ``ss``-byte sectors."""
    linux = uuid.UUID("0FC63DAF-8483-4772-8E79-3D69D8477DE4").bytes_le
    entries = bytearray(128 * 128)
    for i, (first, last) in enumerate(parts):
        struct.pack_into("<16s16sQQQ", entries, i * 128, linux, uuid.uuid4().bytes_le, first, last, 0)
    entries_crc = zlib.crc32(entries)
    entry_sectors = len(entries) // ss
    buf = bytearray(sectors * ss)
    struct.pack_into("<B3xB3xII", buf, 446, 0, 0xEE, 1, min(sectors - 1, 0xFFFFFFFF))
    buf[510:512] = b"\x55\xaa"
    last = sectors - 1
    for my, alt, table in ((1, last, 2), (last, 1, last - entry_sectors)):
        hdr = bytearray(92)
        struct.pack_into("<8sIII4xQQQQ16sQIII", hdr, 0, b"EFI PART", 0x10000, 92, 0, my, alt,
                         2 + entry_sectors, last - entry_sectors - 1, uuid.uuid4().bytes_le,
                         table, 128, 128, entries_crc)
        struct.pack_into("<I", hdr, 16, zlib.crc32(hdr))
        buf[my * ss:my * ss + 92] = hdr
        buf[table * ss:table * ss + len(entries)] = entries
    return bytes(buf)


def test_gpt_with_4096_byte_sectors_is_found() -> None:
    data = _handmade_gpt(4096, 1024, [(256, 511), (512, 1000)])
    table = read_partition_table(io.BytesIO(data))
    assert table.label == "gpt"
    assert table.sector_size == 4096
    expected = [(256 * 4096, 256 * 4096), (512 * 4096, 489 * 4096)]
    assert [(p.start, p.size) for p in table.partitions] == expected
    # Told the sector size, the reader looks only there.
    assert read_partition_table(io.BytesIO(data), sector_size=4096).partitions == table.partitions
